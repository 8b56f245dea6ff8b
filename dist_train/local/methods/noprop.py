"""NoProp: each stage learns to denoise a noised label embedding, given the input x.

Li, Teh, Pascanu, "NoProp: Training Neural Networks without Back-propagation or Forward-propagation",
arXiv 2503.24322. Discrete-time variant (NoProp-DT).

WHY: a stage of the usual local methods needs the previous stage's activations. A NoProp stage
needs only (x, y, t): its input z_{t-1} is *sampled* from the known noising process q(z_{t-1} | y),
not computed by the stage before it. So all K stages train at once with no traffic between ranks;
only inference chains them, sending z_t from stage t to stage t+1.

T diffusion steps, independent of the number of stages K: stage k owns the T/K consecutive steps
t = kT/K + 1 .. (k+1)T/K, each with its own denoising network û_t(z_{t-1}, x) (the paper's one
block per step). The objective is the paper's NoProp-DT loss (arXiv 2503.24322, Eq. 8):

    L = E_{q(z_T|y)}[-log p̂(y | z_T)] + D_KL(q(z_0|y) || p(z_0))
        + (T/2) η E_{t~U{1..T}}[ (SNR(t) - SNR(t-1)) ||û_t(z_{t-1}, x) - u_y||² ],   SNR(t) = ᾱ_t / (1 - ᾱ_t),

with z_{t-1} ~ q(z_{t-1} | y) = N(sqrt(ᾱ_{t-1}) u_y, (1 - ᾱ_{t-1}) I). Stage k minimises its own part:
the expectation over t written out as the sum over its own steps, (η/2)(SNR(t) - SNR(t-1))·||û_t - u_y||²
(squared norm over the embedding, mean over examples), plus, on the last stage, the classifier's
cross-entropy on z_T ~ q(z_T | y). With ᾱ_0 = 0, q(z_0 | y) = N(0, I) = p(z_0), so the KL term is 0.
  * Label embedding U [C, width]: fixed random directions of norm sqrt(width) (every entry about unit
    size, the scale of the unit-variance noise), generated from one seed so every rank builds the
    same U with no communication. `learn_embedding` makes U a parameter, as the paper may: each stage
    holds a copy, and their gradients are summed over the stages before every update (an all-reduce
    of C x width floats per step, counted), so the copies stay equal.
  * Schedule: ᾱ_t = cap · sin²(π t / 2T), t = 0..T (cosine). ᾱ_0 = 0 exactly, so z_0 is pure noise and
    inference starts from its mean (zeros) without knowing y; ᾱ_T = cap < 1 keeps SNR(T) finite.
  * Step network: h = embed(x) + W_z z_{t-1} -> the stage's blocks (a fresh copy per step beyond the
    first) -> readout û_t.
  * Inference: z_0 = 0, z_t = the mean of q(z_t | z_{t-1}, u = û_t) (see `posterior_coefficients`),
    through every step of every stage; the last stage's classifier maps z_T to logits.
Named simplifications: inference takes the posterior mean instead of sampling (repeatable evaluation);
a stage trains all its steps on every batch (the paper samples one t per update); the KL term is left
out because it is identically 0 under this schedule.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.local.method import LocalMethod, StageInfo
from dist_train.local.methods._common import GlobalAvgPool, check_info, fresh_copy
from pydantic import Field

from dist_train.config.options import Options
from dist_train.errors import UserError
from dist_train.local.channels import Channel
from dist_train.local.stage import StageModule
from dist_train.models.loss import cross_entropy

# Any fixed constant; what matters is that it does not depend on the stage or rank, so every stage
# regresses onto the same U.
BASE_SEED = 0x40B0
MAX_ALPHA_BAR = 0.99


def label_embedding(num_classes: int, width: int) -> torch.Tensor:
    """The fixed U [C, width]: random directions, each row of norm sqrt(width) (unit-size entries)."""
    g = torch.Generator(device="cpu").manual_seed(BASE_SEED)
    u = torch.randn(num_classes, width, generator=g)
    return u / u.norm(dim=1, keepdim=True) * math.sqrt(width)


def alpha_bar_schedule(num_steps: int, cap: float = MAX_ALPHA_BAR) -> torch.Tensor:
    """alpha_bar_t for t = 0..T, float64 [T+1]: 0 at t = 0, strictly increasing, cap at t = T."""
    t = torch.arange(num_steps + 1, dtype=torch.float64)
    ab = cap * torch.sin(math.pi / 2 * t / num_steps) ** 2
    ab[0] = 0.0  # exactly, not sin(0)^2 up to rounding: z_0 must carry no label information
    return ab


def posterior_coefficients(alpha_bar: torch.Tensor, t: int) -> tuple[float, float]:
    """(a_t, b_t) with E[z_t | z_{t-1}, u] = a_t u + b_t z_{t-1}.

    The noising process runs from t to t-1: z_{t-1} = sqrt(alpha) z_t + sqrt(1 - alpha) eps with
    alpha = ab_{t-1} / ab_t, which maps q(z_t | u) onto q(z_{t-1} | u). Bayes with the prior
    q(z_t | u) = N(sqrt(ab_t) u, 1 - ab_t) gives a Gaussian posterior of variance
    (1 - ab_t)(1 - alpha) / (1 - ab_{t-1}) and mean
        sqrt(ab_t)(1 - alpha) / (1 - ab_{t-1}) * u  +  sqrt(alpha)(1 - ab_t) / (1 - ab_{t-1}) * z_{t-1}.
    With ab_0 = 0: a_1 = sqrt(ab_1), b_1 = 0 (z_0 is pure noise). If u_hat = u and
    z_{t-1} = sqrt(ab_{t-1}) u then z_t = sqrt(ab_t) u: a perfect predictor lands on the mean.
    """
    ab_t, ab_prev = float(alpha_bar[t]), float(alpha_bar[t - 1])
    alpha = ab_prev / ab_t
    a = math.sqrt(ab_t) * (1.0 - alpha) / (1.0 - ab_prev)
    b = math.sqrt(alpha) * (1.0 - ab_t) / (1.0 - ab_prev)
    return a, b


class NoPropStage(nn.Module):
    """One denoising step: forward(x, z_{t-1}) -> u_hat, the same shape as u_y.

    Owns its own copy of the input embedding (every stage sees x itself, never an activation), the
    model's blocks in its range, a projection of z into the hidden and a readout to label space.
    The last stage also owns the classifier on z_T.
    """

    def __init__(self, model: nn.Module, blocks: range, info: StageInfo, fresh: bool = False, with_classifier: bool = False):
        super().__init__()
        check_info(info)
        w = info.width
        self.model_name = info.model_name
        # deepcopy, not model.embed itself: stages train independently (maybe on different ranks),
        # so each needs its own encoder; the copy starts from the model's own initialisation.
        self.encoder = copy.deepcopy(model.embed)
        self.blocks = nn.ModuleList(model.blocks[i] for i in blocks)
        if fresh:  # a later step of the same stage: same architecture, its own initialisation
            self.encoder, self.blocks = fresh_copy(self.encoder), fresh_copy(self.blocks)
        # z enters additively after the embedding: a per-position (GPT) / per-example (MLP, CNN
        # broadcast over H, W) shift of the hidden, the cheapest way to condition the blocks on z.
        self.z_proj = nn.Linear(w, w)
        if info.model_name == "gpt":
            # The GPT residual stream is unnormalised (pre-LN blocks); normalise before the
            # readout as the model's own head does.
            self.readout = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, w))
        elif info.model_name == "cnn":
            self.readout = nn.Sequential(GlobalAvgPool(), nn.Linear(w, w))
        else:
            self.readout = nn.Linear(w, w)
        self.classifier: Optional[nn.Module] = None
        if with_classifier:
            # z_T is a label-space vector ([B, T, W] or [B, W]), which the GPT and MLP heads take as
            # is. The CNN head pools over H, W first and cannot take [B, W]; its pool and flatten
            # have no parameters, so its final Linear(width, classes) is the whole trainable head.
            self.classifier = model.head[-1] if info.model_name == "cnn" else model.head

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """û_t(z_{t-1}, x): the step's prediction of u_y."""
        h = self.encoder(x)
        zp = self.z_proj(z)
        h = h + (zp[:, :, None, None] if self.model_name == "cnn" else zp)
        for block in self.blocks:
            h = block(h)
        return self.readout(h)

class NoPropStageModule(StageModule):
    """Stage k of K: diffusion steps t = kT/K + 1 .. (k+1)T/K, one network each, and the label
    embedding U. Reads x itself, receives nothing in training; at inference it refines the z the
    previous stage produced (z_0 = 0 on the first stage) through its steps."""

    reads_data = True
    receives_activations = False

    def __init__(self, model: nn.Module, blocks: range, method: "NoProp", info: StageInfo):
        super().__init__(info)
        self.method = method
        self.steps = method.stage_steps(info)
        last = self.last
        self.nets = nn.ModuleList(NoPropStage(model, blocks, info, fresh=i > 0,
                                              with_classifier=last and i == len(self.steps) - 1)
                                  for i in range(len(self.steps)))
        u = label_embedding(info.num_classes, info.width)
        if method.learn_embedding:
            self.label_embedding = nn.Parameter(u)
        else:
            # Persistent: moves with .to() and is saved with the stage, so a checkpoint keeps the
            # targets it was trained on even if the seed constant changes.
            self.register_buffer("label_embedding", u)

    @property
    def blocks(self) -> nn.ModuleList:
        return nn.ModuleList(b for net in self.nets for b in net.blocks)

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.nets)

    @property
    def classifier(self) -> Optional[nn.Module]:
        return self.nets[-1].classifier

    def target(self, y: torch.Tensor) -> torch.Tensor:
        """u_y = U[y]: [B, T, W] for GPT next-byte ids [B, T], [B, W] for labels [B]."""
        return F.embedding(y, self.label_embedding)

    def forward(self, x: Optional[torch.Tensor] = None, received: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None, on_activation=None):
        if y is not None:
            return self.method.loss(self, x, y)
        z = received if received is not None else self.method.initial_z(x, self.info)
        for net, t in zip(self.nets, self.steps):
            z = self.method.denoise(net, x, z, t, self.info)
        return self.classifier(z) if self.last else z

    def channels(self, ctx) -> list:
        return [EmbeddingSync(self, ctx)] if self.method.learn_embedding else []


class NoPropOptions(Options):
    steps: Optional[int] = Field(None, ge=1, description="NoProp: diffusion steps T (a multiple of parallel.stages; each stage owns T/K denoising blocks); default: T = K.")
    eta: float = Field(0.1, gt=0, description="NoProp: eta, the weight of the SNR-weighted denoising loss (paper's Eq. 8).")
    max_alpha_bar: float = Field(0.99, gt=0, lt=1, description="NoProp: alpha_bar at the last step T (cosine schedule from 0).")
    learn_embedding: bool = Field(False, description="NoProp: learn the label embedding U jointly (its gradient is summed over the stages each step: a small all-reduce) instead of keeping it fixed.")


class NoProp(LocalMethod):
    name = "noprop"
    options = NoPropOptions

    @classmethod
    def check(cls, cfg, world_size: int) -> None:
        stages, t = cfg.parallel.stages, cfg.local.options("noprop")["steps"]
        if t is not None and t % stages:
            raise UserError(f"local.noprop.steps: {t} diffusion steps cannot be shared evenly by {stages} "
                            "stages (use a multiple of parallel.stages)")
        if cfg.local.asynchronous:
            raise UserError("local.asynchronous: noprop stages never wait for each other, so there is nothing "
                            "to replay; set it to false")

    @classmethod
    def plan_stages(cls, cfg, ranges: list[range]) -> tuple[list[str], str]:
        own, last = cfg.local.options("noprop"), len(ranges) - 1
        per = (own["steps"] or cfg.parallel.stages) // cfg.parallel.stages  # each stage denoises T/K steps
        parts = [f"{per} x (own embed + blocks {r.start}-{r.stop - 1} + denoiser)" + (" + head" if i == last else "")
                 for i, r in enumerate(ranges)]
        return parts, "no activations in training" + (", label-embedding all-reduce per step"
                                                       if own["learn_embedding"] else "")

    def __init__(self, steps: Optional[int] = None, eta: float = 0.1, max_alpha_bar: float = MAX_ALPHA_BAR,
                 learn_embedding: bool = False):
        if steps is not None and steps < 1:
            raise UserError(f"local.noprop.steps: must be >= 1, got {steps}")
        if eta <= 0 or not 0 < max_alpha_bar < 1:
            raise UserError(f"local.noprop: eta must be > 0 and max_alpha_bar in (0, 1), got {eta}, {max_alpha_bar}")
        self.steps, self.eta, self.learn_embedding = steps, eta, learn_embedding
        self.max_alpha_bar = max_alpha_bar

    def total_steps(self, info: StageInfo) -> int:
        t = self.steps or info.num_stages
        if t % info.num_stages:
            raise UserError(f"local.noprop.steps: {t} diffusion steps cannot be shared evenly by "
                            f"{info.num_stages} stages (use a multiple of parallel.stages)")
        return t

    def stage_steps(self, info: StageInfo) -> range:
        """The diffusion steps t (1-based) stage `info.index` owns."""
        per = self.total_steps(info) // info.num_stages
        return range(info.index * per + 1, (info.index + 1) * per + 1)

    def schedule(self, info: StageInfo) -> torch.Tensor:
        return alpha_bar_schedule(self.total_steps(info), self.max_alpha_bar)

    def snr_weight(self, info: StageInfo, t: int) -> float:
        """(η/2)·(SNR(t) − SNR(t−1)): the weight of step t's squared error in Eq. 8 (with the
        expectation over uniform t times T written out as a sum)."""
        ab = self.schedule(info)
        snr = lambda a: float(a) / (1.0 - float(a))  # noqa: E731
        return 0.5 * self.eta * (snr(ab[t]) - snr(ab[t - 1]))

    def build_head(self, info: StageInfo) -> nn.Module:
        raise NotImplementedError("noprop has no auxiliary heads: its stages are built with build_stage")

    def local_loss(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   x: Optional[torch.Tensor], info: StageInfo) -> torch.Tensor:
        raise NotImplementedError("noprop has no activation-based local loss: its stage module computes it")

    def build_stage(self, model: nn.Module, blocks: range, info: StageInfo) -> NoPropStageModule:
        return NoPropStageModule(model, blocks, self, info)

    def sample_z(self, u: torch.Tensor, ab: float) -> torch.Tensor:
        """z ~ q(z | y) = N(sqrt(ab) u_y, (1 - ab) I), from torch's global RNG (seeded by the caller)."""
        return math.sqrt(ab) * u + math.sqrt(1.0 - ab) * torch.randn_like(u)

    def loss(self, stage: NoPropStageModule, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ_t (η/2)(SNR(t) − SNR(t−1))·||û_t(z_{t−1}, x) − u_y||² over the stage's steps, plus (last
        stage) −log p̂(y | z_T) with z_T ~ q(z_T | y). Neither needs the previous stage."""
        info = stage.info
        ab = self.schedule(info)
        u = stage.target(y).float()
        loss = torch.zeros((), device=u.device)
        for net, t in zip(stage.nets, stage.steps):
            z_prev = self.sample_z(u.detach(), float(ab[t - 1]))
            # float32 squared error: under bf16 autocast squared errors lose visible precision.
            sq = (net(x, z_prev).float() - u).pow(2).sum(dim=-1).mean()
            loss = loss + self.snr_weight(info, t) * sq
        if stage.classifier is not None:
            # z_T comes from q(z_T | y), not from the chain: training the classifier needs no traffic.
            z_t = self.sample_z(u.detach(), float(ab[-1]))
            loss = loss + cross_entropy(stage.classifier(z_t), y)
        return loss

    def initial_z(self, x: torch.Tensor, info: StageInfo) -> torch.Tensor:
        """z_0 for inference: the mean of q(z_0) = N(0, I), i.e. zeros of u_y's shape (float32)."""
        shape = (*x.shape[:2], info.width) if info.model_name == "gpt" else (x.size(0), info.width)
        return torch.zeros(shape, dtype=torch.float32, device=x.device)

    def denoise(self, net: NoPropStage, x: torch.Tensor, z_prev: torch.Tensor, t: int, info: StageInfo) -> torch.Tensor:
        """z_t = E[z_t | z_{t-1}, u = û_t]: deterministic, so evaluation is repeatable."""
        a, b = posterior_coefficients(self.schedule(info), t)
        z_prev = z_prev.float()
        return a * net(x, z_prev).float() + b * z_prev


class EmbeddingSync(Channel):
    """learn_embedding: every stage holds a copy of U. Its gradient is summed over the stages before
    each update (the gradient of the whole objective with respect to the one shared U), and the
    copies are averaged after the update (each stage clips its own gradient norm, so the updates may
    differ slightly; the average keeps one U). Two all-reduces of C x width floats per step."""

    name = "noprop_embedding"

    def __init__(self, stage: NoPropStageModule, ctx):
        self.stage, self.ctx = stage, ctx
        self.bytes = 0

    def before_update(self) -> None:
        g = self.stage.label_embedding.grad
        if g is None:
            g = torch.zeros_like(self.stage.label_embedding)
        # Replicas of a stage already hold the same (averaged) gradient: sum over all ranks, then
        # divide by the replicas per stage.
        self.ctx.link.all_reduce(g)
        g.div_(self.ctx.layout.dp_size)
        self.stage.label_embedding.grad = g
        self._count(g)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        u = self.stage.label_embedding
        self.ctx.link.all_reduce(u.data)
        u.data.div_(self.ctx.link.ranks)
        self._count(u)

    def _count(self, t: torch.Tensor) -> None:
        world = self.ctx.link.ranks
        self.bytes += int(2 * (world - 1) / world * t.numel() * t.element_size())

    def metrics(self) -> dict:
        return {"embedding_sync_bytes": self.bytes}
