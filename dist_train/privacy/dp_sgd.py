"""DP-SGD as a gradient transform (Abadi et al. 2016, Algorithm 1), distributed.

One logical step, as `../shared/specs/privacy.md` defines it:
1. Poisson sampling: every training example joins the logical batch with probability q = B / N
   (B = train.batch_size, the *expected* global batch), drawn identically on every rank from
   (train.seed, step); each rank takes the selected examples of its own shard, split into physical
   micro-batches of at most privacy.max_physical_batch. A rank may draw none.
2. Per-example clipping by book-keeping (one backward pass, `BookKeeper`): this rank's
   sum_i min(1, C / (||g_i|| + 1e-6)) g_i over its examples.
3. Noise once per coordinate across the world: the data-parallel rank 0 adds N(0, sigma^2 C^2) to its
   sum before the all-reduce (SUM), so the reduced gradient carries exactly one draw (the other
   spec options, noise by shard owner or sigma/sqrt(W) per rank, are not used).
4. Divide by the expected batch size B (never the realised one: the realised size is private).
5. The base optimizer (privacy.base_optimizer) steps on that gradient. Muon / NorMuon reduce their
   matrices themselves (a mean over ranks, to each matrix's owner): those gradients leave here
   unreduced, scaled by W / B, so the owner's mean is the same (sum + noise) / B, with no second
   all-reduce.

Every step is one release of the sampled Gaussian mechanism; the ledger (Opacus accountant) counts
logical steps, is saved in every checkpoint, and training stops before epsilon would exceed
privacy.target_epsilon — also when resuming. The privacy unit is one training example of the data
set: for a byte corpus that is one window of block_size bytes (overlapping windows share bytes, so
a byte-level guarantee would need group privacy; named here as a simplification).

Noise generator: seeded from (train.seed, step) by default, so runs and resumes reproduce exactly;
privacy.secure_rng reseeds from the OS CSPRNG (`secrets`) every step. Both still sample Gaussians in
floating point, which leaves the floating-point attack of arXiv 2107.10138 open (a named limitation).
"""

from __future__ import annotations

import math
import secrets
from typing import Optional

import torch
import torch.distributed as dist

from dist_train.config.schema import Config
from dist_train.data.sampler import derive_seed
from dist_train.errors import UserError
from dist_train.optim.transform import GradientTransform
from dist_train.privacy.accounting import PrivacyLedger, calibrate_noise
from dist_train.privacy.bookkeeping import BookKeeper, fix_batchnorm
from dist_train.privacy.sampling import PoissonSampler, physical_batches

_NOISE_TAG = 0x4E4F4953


def resolve_noise(cfg: Config, population: int) -> tuple[float, float, float]:
    """(sample rate q = B / N, delta, noise multiplier sigma) of a dp_sgd run over `population`
    training examples: sigma as given, or calibrated (safe side) to spend at most the target epsilon
    in train.steps steps."""
    p = cfg.privacy
    if cfg.train.batch_size > population:
        raise UserError(f"train.batch_size: {cfg.train.batch_size} is above the {population} training examples "
                        "(dp_sgd samples each example with probability batch_size / N)")
    q = cfg.train.batch_size / population
    delta = p.delta if p.delta is not None else 0.1 / population
    if delta >= 1.0 / population:
        raise UserError(f"privacy.delta: {delta:g} is not below 1/N = {1.0 / population:.3g} "
                        f"(N = {population} training examples); such a delta protects nobody")
    if p.noise_multiplier is not None:
        return q, delta, float(p.noise_multiplier)
    return q, delta, calibrate_noise(p.target_epsilon, delta, q, cfg.train.steps, p.accountant)


def describe(cfg: Config, population: int, dp: int) -> str:
    """One line for `dist-train plan`."""
    p = cfg.privacy
    q, delta, sigma = resolve_noise(cfg, population)
    noise = (f"sigma {sigma:.4g} (calibrated: epsilon <= {p.target_epsilon:g} in {cfg.train.steps} steps)"
             if p.noise_multiplier is None else f"sigma {sigma:.4g}")
    budget = f", stops before epsilon > {p.target_epsilon:g}" if p.target_epsilon is not None else ""
    return (f"DP-SGD over {p.base_optimizer}: Poisson q = {q:.3g} (expected batch {cfg.train.batch_size}, "
            f"~{cfg.train.batch_size / dp:.0f}/rank in micro-batches <= {p.max_physical_batch}), clip C = {p.max_grad_norm:g}, "
            f"{noise}, delta {delta:.3g}, {p.accountant} accountant{budget}")


class DPSGD(GradientTransform):
    name = "dp_sgd"

    def __init__(self, cfg: Config, data, ctx, model: torch.nn.Module):
        super().__init__(cfg)
        p = cfg.privacy
        self.ctx = ctx
        self.population = data.num_samples("train")
        self.batch = cfg.train.batch_size
        self.sample_rate, self.delta, self.sigma = resolve_noise(cfg, self.population)
        self.clip = p.max_grad_norm
        self.ledger = PrivacyLedger(self.delta, p.accountant, p.target_epsilon)
        if p.fix_model:
            fix_batchnorm(model)
        self.keeper: Optional[BookKeeper] = None
        self._delegated: set[str] = set()
        self.step_index = 0
        self._last: dict = {}

    # --- set-up ---------------------------------------------------------------------------
    def optimizer_spec(self, model, mesh, num_outputs):
        from dist_train.optim.build import optimizer_spec

        base = optimizer_spec(self.cfg.optim.model_copy(update={"name": self.cfg.privacy.base_optimizer}),
                              model, mesh, num_outputs=num_outputs)
        # Muon / NorMuon reduce-scatter their matrices' gradients to the owners themselves, as a mean
        # over ranks: those stay unreduced here (see __call__), so they travel once, to their owner.
        self._delegated = set(base.self_reduced)
        # Every other gradient is reduced here, after the noise: a DDP wrapper has nothing left to do.
        base.self_reduced = [n for n, q in model.named_parameters() if q.requires_grad]
        return base

    def attach(self, backend) -> None:
        self.keeper = BookKeeper(backend.module, self.clip)
        self.group = backend.mesh.get_group() if backend.mesh is not None and backend.dp_size > 1 else None
        self.world = backend.dp_size if self.group is not None else 1
        self.noise_rank = (backend.mesh.get_local_rank() == 0) if self.group is not None else True
        self.delegated = [self.keeper.names[p] in self._delegated for p in self.keeper.params]

    def sampler(self, data):
        return PoissonSampler(self.population, self.sample_rate, self.cfg.train.seed)

    # --- one step -------------------------------------------------------------------------
    def stop_reason(self) -> Optional[str]:
        if self.sigma > 0 and self.ledger.would_exceed(self.sigma, self.sample_rate):
            return (f"privacy budget: one more step would take epsilon above privacy.target_epsilon = "
                    f"{self.cfg.privacy.target_epsilon} (spent {self.ledger.epsilon():.4f} at delta "
                    f"{self.delta:g} after {self.ledger.steps} steps); training stops here")
        return None

    def micro_batches(self, indices: torch.Tensor) -> list[torch.Tensor]:
        return physical_batches(indices, self.cfg.privacy.max_physical_batch)

    def backward(self, backend, loss: torch.Tensor, examples: int, is_last: bool) -> None:
        # The loss is the micro-batch mean over examples (each example's own mean over its
        # positions); x examples makes it the sum over examples, so each captured output
        # gradient is exactly one example's.
        (loss * examples).backward()
        self.keeper.accumulate(examples)

    def __call__(self, backend) -> float:
        grads = self.keeper.take()
        if self.noise_rank and self.sigma > 0:
            gen = self._generator(grads[0].device if grads else torch.device("cpu"))
            for g in grads:
                g.add_(torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype), alpha=self.sigma * self.clip)
        stats = torch.tensor([self.keeper.examples, self.keeper.clipped, self.keeper.norm_sum],
                             dtype=torch.float64, device=grads[0].device if grads else None)
        self.keeper.reset_stats()
        mine = [i for i, d in enumerate(self.delegated) if not d]
        if self.group is not None:
            flat = torch.cat([grads[i].reshape(-1) for i in mine])  # one collective for the whole model
            dist.all_reduce(flat, group=self.group)
            dist.all_reduce(stats, group=self.group)
            for i, g in zip(mine, torch.split(flat, [grads[i].numel() for i in mine])):
                grads[i] = g
        for p, g, delegated in zip(self.keeper.params, grads, self.delegated):
            # A delegated matrix still holds this rank's sum (rank 0's with the noise); the owner's
            # mean over the ranks then gives (sum over ranks + noise) / B, as for the others.
            p.grad = g.view_as(p).mul_(self.world / self.batch if delegated else 1.0 / self.batch)
        if self.sigma > 0:
            self.ledger.record(self.sigma, self.sample_rate)
        self.step_index += 1
        examples, clipped, norm_sum = stats.tolist()
        self._last = {"dp_examples": examples, "dp_clip_fraction": clipped / examples if examples else 0.0,
                      "dp_mean_example_norm": norm_sum / examples if examples else 0.0}
        # The norm of the privatised gradient (Muon's matrices, reduced later by their owners, excluded).
        return math.sqrt(sum(float(grads[i].double().pow(2).sum()) for i in mine))

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = torch.Generator(device=device)
        if self.cfg.privacy.secure_rng:
            gen.manual_seed(secrets.randbits(63))
        else:
            gen.manual_seed(derive_seed(self.cfg.train.seed, self.step_index, _NOISE_TAG))
        return gen

    def epsilon(self) -> Optional[float]:
        return self.ledger.epsilon() if self.sigma > 0 else None  # sigma = 0: no finite guarantee

    def metrics(self) -> dict:
        return {"epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.sigma,
                **self._last}

    def step_scalars(self) -> dict:
        return {"epsilon": self.epsilon()}

    # --- checkpoint -----------------------------------------------------------------------
    def checkpointing(self):
        return self.keeper.trainable()

    def state_dict(self) -> dict:
        return {"ledger": self.ledger.state_dict(), "step": self.step_index, "sigma": self.sigma}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state is None or "ledger" not in state:
            raise UserError("checkpoint: no privacy accountant state in it (was it saved by a run without "
                            "optim.name dp_sgd?); a private run cannot resume without knowing what was spent")
        self.ledger.load_state_dict(state["ledger"])
        self.step_index = int(state["step"])
        if self.sigma > 0 and self.ledger.would_exceed(self.sigma, self.sample_rate):
            raise UserError(f"privacy.target_epsilon: the budget is spent: epsilon {self.ledger.epsilon():.4f} after "
                            f"{self.ledger.steps} steps, and one more step would exceed {self.cfg.privacy.target_epsilon}; "
                            "nothing trained")
