"""NoProp: each stage learns to denoise a noised label embedding, given the input x.

Li, Teh, Pascanu, "NoProp: Training Neural Networks without Back-propagation or Forward-propagation",
arXiv 2503.24322. Discrete-time variant (NoProp-DT).

WHY: a stage of the usual local methods needs the previous stage's activations. A NoProp stage
needs only (x, y, t): its input z_{t-1} is *sampled* from the known noising process q(z_{t-1} | y),
not computed by the stage before it. So all K stages train at once with no traffic between ranks;
only inference chains them, sending z_t from stage t to stage t+1.

Here stage k (0-based) of K is diffusion step t = k+1 of T = K:
  * Label embedding: a FIXED random U [C, width], rows scaled to norm sqrt(width) so every entry of
    u_y = U[y] has about unit size, the same scale as the unit-variance noise (the SNR schedule then
    means what it says, and the MSE starts O(1)). The paper may learn U jointly with the blocks; that
    would make every stage depend on every other stage's U gradient (traffic), so U is fixed: it is
    generated on the CPU from one seed, independent of the stage index, so every rank builds the same
    U with no communication.
  * Schedule: alpha_bar_t = cap * sin^2(pi t / 2T), t = 0..T (cosine-style). alpha_bar_0 = 0 exactly,
    so z_0 is pure noise and inference can start from its mean (zeros) without knowing y;
    alpha_bar_T = cap < 1 keeps z_T noisy enough that the classifier on it sees a spread of inputs.
    q(z_t | y) = N(sqrt(ab_t) u_y, (1 - ab_t) I).
  * Stage t: h = embed(x) + W_z z_{t-1} -> its blocks -> readout u_hat; loss = MSE(u_hat, u_y).
    The last stage also owns the classifier p(y | z_T), trained by cross-entropy on z_T ~ q(z_T | y).
  * Inference: z_0 = 0, z_t = mean of q(z_t | z_{t-1}, u = u_hat_t) (see `posterior_coefficients`),
    logits = classifier(z_T).
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.local.method import LocalMethod, StageInfo
from dist_train.local.methods._common import GlobalAvgPool, check_info
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

    def __init__(self, model: nn.Module, blocks: range, info: StageInfo):
        super().__init__()
        check_info(info)
        w = info.width
        self.model_name = info.model_name
        # Persistent, as tpSGD's projection: moves with .to() and is saved with the stage, so a
        # checkpoint keeps the targets it was trained on even if the seed constant changes.
        self.register_buffer("label_embedding", label_embedding(info.num_classes, w))
        # deepcopy, not model.embed itself: stages train independently (maybe on different ranks),
        # so each needs its own encoder; the copy starts from the model's own initialisation.
        self.encoder = copy.deepcopy(model.embed)
        self.blocks = nn.ModuleList(model.blocks[i] for i in blocks)
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
        if info.index == info.num_stages - 1:
            # z_T is a label-space vector ([B, T, W] or [B, W]), which the GPT and MLP heads take as
            # is. The CNN head pools over H, W first and cannot take [B, W]; its pool and flatten
            # have no parameters, so its final Linear(width, classes) is the whole trainable head.
            self.classifier = model.head[-1] if info.model_name == "cnn" else model.head

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        zp = self.z_proj(z)
        h = h + (zp[:, :, None, None] if self.model_name == "cnn" else zp)
        for block in self.blocks:
            h = block(h)
        return self.readout(h)

    def target(self, y: torch.Tensor) -> torch.Tensor:
        """u_y = U[y]: [B, T, W] for GPT next-byte ids [B, T], [B, W] for labels [B]."""
        return F.embedding(y, self.label_embedding)


class NoPropStageModule(StageModule):
    """NoProp as the stage loop sees it: reads x itself, receives nothing in training; at inference
    it refines the z the previous stage produced (z_0 on the first stage)."""

    reads_data = True
    receives_activations = False

    def __init__(self, model: nn.Module, blocks: range, method: "NoProp", info: StageInfo):
        super().__init__(info)
        self.net = NoPropStage(model, blocks, info)
        self.method = method

    @property
    def blocks(self) -> nn.ModuleList:
        return self.net.blocks

    def forward(self, x: Optional[torch.Tensor] = None, received: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None, on_activation=None):
        if y is not None:
            return self.method.loss(self.net, x, y, self.info)
        z = received if received is not None else self.method.initial_z(x, self.info)
        z = self.method.denoise(self.net, x, z, self.info)
        return self.method.logits(self.net, z, self.info) if self.last else z


class NoProp(LocalMethod):
    name = "noprop"

    def __init__(self, steps: Optional[int] = None, eta: float = 0.1, max_alpha_bar: float = MAX_ALPHA_BAR,
                 learn_embedding: bool = False):
        self.steps, self.eta, self.learn_embedding = steps, eta, learn_embedding
        self.max_alpha_bar = max_alpha_bar

    def schedule(self, info: StageInfo) -> torch.Tensor:
        return alpha_bar_schedule(info.num_stages, self.max_alpha_bar)

    def build_head(self, info: StageInfo) -> nn.Module:
        raise NotImplementedError("noprop has no auxiliary heads: its stages are built with build_stage")

    def local_loss(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   x: Optional[torch.Tensor], info: StageInfo) -> torch.Tensor:
        raise NotImplementedError("noprop has no activation-based local loss: use NoProp.loss(stage, x, y, info)")

    def build_stage(self, model: nn.Module, blocks: range, info: StageInfo) -> NoPropStageModule:
        return NoPropStageModule(model, blocks, self, info)

    def sample_z(self, u: torch.Tensor, ab: float) -> torch.Tensor:
        """z ~ q(z | y) = N(sqrt(ab) u_y, (1 - ab) I), from torch's global RNG (seeded by the caller)."""
        return math.sqrt(ab) * u + math.sqrt(1.0 - ab) * torch.randn_like(u)

    def loss(self, stage: NoPropStage, x: torch.Tensor, y: torch.Tensor, info: StageInfo) -> torch.Tensor:
        """MSE(u_hat, u_y) of step t = index+1; the last stage adds CE of classifier(z_T) vs y.

        The paper weights step t's MSE by eta * (SNR(t) - SNR(t-1)). Each stage has its own Adam
        optimizer, which is invariant to a constant scale of its loss, so the weight is dropped.
        The KL(q(z_0 | y) || p(z_0)) term is constant with a fixed U (ab_0 = 0: q(z_0 | y) = N(0, I)),
        so it is dropped too.
        """
        ab = self.schedule(info)
        t = info.index + 1
        u = stage.target(y)  # float32
        z_prev = self.sample_z(u, float(ab[t - 1]))
        # float32 MSE: under bf16 autocast squared errors lose visible precision.
        loss = F.mse_loss(stage(x, z_prev).float(), u)
        if stage.classifier is not None:
            # z_T comes from q(z_T | y), not from the chain: training the classifier needs no traffic.
            z_t = self.sample_z(u, float(ab[info.num_stages]))
            loss = loss + cross_entropy(stage.classifier(z_t), y)
        return loss

    def initial_z(self, x: torch.Tensor, info: StageInfo) -> torch.Tensor:
        """z_0 for inference: the mean of q(z_0) = N(0, I), i.e. zeros of u_y's shape (float32)."""
        shape = (*x.shape[:2], info.width) if info.model_name == "gpt" else (x.size(0), info.width)
        return torch.zeros(shape, dtype=torch.float32, device=x.device)

    def denoise(self, stage: NoPropStage, x: torch.Tensor, z_prev: torch.Tensor, info: StageInfo) -> torch.Tensor:
        """z_t = E[z_t | z_{t-1}, u = u_hat]: deterministic, so evaluation is repeatable."""
        a, b = posterior_coefficients(self.schedule(info), info.index + 1)
        z_prev = z_prev.float()
        return a * stage(x, z_prev).float() + b * z_prev

    def logits(self, stage: NoPropStage, z_last: torch.Tensor, info: StageInfo) -> torch.Tensor:
        """Class / next-byte logits from z_T; only the last stage has the classifier."""
        if stage.classifier is None:
            raise ValueError(f"noprop: stage {info.index} of {info.num_stages} has no classifier (only the last does)")
        return stage.classifier(z_last)
