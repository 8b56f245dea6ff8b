"""DP-SGD as a gradient transform (Abadi et al. 2016, Algorithm 1), distributed.

One logical step (Abadi et al. 2016 with Poisson sampling; per-example norms by book-keeping, Bu et al.,
arXiv 2210.00038):
1. Poisson sampling: every training example joins the logical batch with probability q = B / N
   (B = train.batch_size, the *expected* global batch), drawn identically on every rank from
   (train.seed, step); each rank takes the selected examples of its own shard, split into physical
   micro-batches of at most privacy.max_physical_batch. A rank may draw none.
2. Per-example clipping by book-keeping (one backward pass, `BookKeeper`): this rank's
   sum_i min(1, C / (||g_i|| + 1e-6)) g_i over its examples.
3. Noise once per coordinate across the world: the data-parallel rank 0 adds N(0, sigma^2 C^2) to its
   sum before the all-reduce (SUM), so the reduced gradient carries exactly one draw; under FSDP2
   each sum is reduce-scattered and the owner of each row shard adds the noise to its rows (the
   third option, sigma/sqrt(W) from independent streams on every rank, is not used). Under HSDP
   (rows sharded inside a shard group, replicated across R groups) the sum is reduce-scattered in
   each shard group, the row shard's owner in the first replica group alone adds the noise, and an
   all-reduce across the replicas completes the sum over every dp rank: one draw, on every copy.
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
from torch.distributed.tensor import DTensor

from dist_train.config.schema import Config
from dist_train.data.sampler import derive_seed
from dist_train.errors import UserError
from dist_train.optim.matrix import row_sharded
from dist_train.optim.transform import GradientTransform
from dist_train.privacy.accounting import PrivacyLedger, calibrate_noise
from dist_train.privacy.bookkeeping import BookKeeper, fix_batchnorm
from dist_train.privacy.sampling import PoissonSampler, physical_batches

_NOISE_TAG = 0x4E4F4953


def resolve_noise(cfg: Config, population: int) -> tuple[float, float, float]:
    """(sample rate q = B / N, delta, noise multiplier sigma) of a dp_sgd run over `population`
    training examples: sigma as given, or calibrated (safe side) to spend at most the target epsilon
    in train.steps steps (see `accounted_sigma` for local-learning stages)."""
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
    k = math.sqrt(cfg.parallel.stages)
    return q, delta, k * calibrate_noise(p.target_epsilon, delta, q, cfg.train.steps, p.accountant)


def accounted_sigma(cfg: Config, sigma: float) -> float:
    """The noise multiplier the accountant sees per step. End-to-end: sigma. With K local-learning
    stages, each stage clips its own examples' gradients to C and adds N(0, sigma^2 C^2) to its own
    parameters, all on the SAME Poisson sample of the step: the K releases together are one sampled
    Gaussian mechanism whose sensitivity is C*sqrt(K) (one example moves each block by at most C)
    with noise sigma*C per coordinate, i.e. noise multiplier sigma / sqrt(K) — which is what is
    accounted (tighter than composing K separate releases, and exact for this mechanism). What
    crosses between stages (activations, targets) stays inside the training job and is not released."""
    return sigma / math.sqrt(cfg.parallel.stages)


def describe(cfg: Config, population: int, dp: int) -> str:
    """One line for `dist-train plan`."""
    p = cfg.privacy
    q, delta, sigma = resolve_noise(cfg, population)
    noise = (f"sigma {sigma:.4g} (calibrated: epsilon <= {p.target_epsilon:g} in {cfg.train.steps} steps)"
             if p.noise_multiplier is None else f"sigma {sigma:.4g}")
    budget = f", stops before epsilon > {p.target_epsilon:g}" if p.target_epsilon is not None else ""
    if cfg.parallel.stages > 1:
        budget += (f"; {cfg.parallel.stages} stages clip and noise their own updates on one sample: accounted "
                   f"as sigma / sqrt({cfg.parallel.stages}) = {accounted_sigma(cfg, sigma):.4g}")
    return (f"DP-SGD over {p.base_optimizer}: Poisson q = {q:.3g} (expected batch {cfg.train.batch_size}, "
            f"~{cfg.train.batch_size / dp:.0f}/rank in micro-batches <= {p.max_physical_batch}), clip C = {p.max_grad_norm:g}, "
            f"{noise}, delta {delta:.3g}, {p.accountant} accountant{budget}")


# torch 2.13 renamed reduce_scatter_tensor (older releases only have the old name).
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _sharded(p) -> bool:
    return isinstance(p, DTensor)


class _RowShards:
    """Where a sharded parameter's rows live: its mesh's last dimension shards them (FSDP2's
    Shard(0)), a first one, if any, replicates them (HSDP's (Replicate(), Shard(0)))."""

    def __init__(self, p):
        mesh = p.device_mesh
        if not row_sharded(p.placements) or mesh.ndim > 2:
            raise UserError(f"optim.name: dp_sgd reduces its noised sums over row shards (FSDP2 Shard(0), or HSDP "
                            f"(Replicate(), Shard(0))); a parameter placed as {tuple(p.placements)} is not supported")
        self.group = mesh.get_group(mesh.ndim - 1)
        self.world = mesh.size(mesh.ndim - 1)
        self.replicas = mesh.get_group(0) if mesh.ndim == 2 and mesh.size(0) > 1 else None
        # The first replica group's copy of each row shard carries the noise; the others add none.
        self.noise = mesh.ndim == 1 or mesh.get_local_rank(0) == 0


class DPSGD(GradientTransform):
    name = "dp_sgd"
    plain = False
    backends = ("ddp", "fsdp", "none")  # it clips per example and reduces the noised sum itself

    @classmethod
    def build(cls, cfg: Config, data, ctx, model: torch.nn.Module) -> "DPSGD":
        return cls(cfg, data, ctx, model)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        p = cfg.privacy
        if p.noise_multiplier is None and p.target_epsilon is None:
            raise ValueError("privacy: dp_sgd needs privacy.noise_multiplier or privacy.target_epsilon")
        if p.noise_multiplier == 0 and p.target_epsilon is not None:
            raise ValueError(f"privacy.noise_multiplier: 0 (no noise) gives no finite epsilon, but "
                             f"privacy.target_epsilon is {p.target_epsilon}")
        if cfg.parallel.activation_checkpointing.mode != "none":
            raise ValueError("parallel.activation_checkpointing: dp_sgd keeps each layer's input for its "
                             "per-example norms already; recomputation would capture every layer twice")
        if cfg.train.grad_accum != 1:
            raise ValueError("train.grad_accum: dp_sgd splits its Poisson batches by privacy.max_physical_batch; "
                             "leave grad_accum at 1")

    @classmethod
    def check(cls, cfg: Config, world_size: int) -> None:
        # No batch-divisibility rule: the batch is an expected (Poisson) size.
        from dist_train.registry import LOCAL_METHODS

        stages = cfg.parallel.stages
        if stages > 1 and not LOCAL_METHODS.get(cfg.local.method).per_example_losses:
            raise UserError(f"local.method: dp_sgd inside local-learning stages is offered for methods whose "
                            f"local loss is per example (dgl); {cfg.local.method} is not supported")
        if stages > 1 and cfg.local.asynchronous:
            raise UserError("local.asynchronous: replayed batches would be extra releases the accountant does not "
                            "see; set it to false with dp_sgd")
        if stages > 1 and cfg.parallel.backend == "fsdp":
            raise UserError("parallel.backend: dp_sgd inside local-learning stages runs under ddp (or one replica)")
        if cfg.parallel.backend not in cls.backends:
            raise UserError(f"optim.name: dp_sgd clips per example and reduces the noised sum itself; "
                            f"parallel.backend {cfg.parallel.backend} is not supported (use ddp, fsdp or none)")

    @classmethod
    def plan_micro_batch(cls, cfg: Config, micro: int) -> int:
        return min(cfg.privacy.max_physical_batch, max(1, micro))  # Poisson batches split into physical ones

    @classmethod
    def state_bytes(cls, cfg, model, num_outputs, backend, dp, adamw_bytes):
        # The clipping and noise keep no state; the base optimizer does.
        from dist_train.registry import OPTIMIZERS

        base = OPTIMIZERS.get(cfg.privacy.base_optimizer)
        cfg_base = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"name": cfg.privacy.base_optimizer})})
        total, text = base.state_bytes(cfg_base, model, num_outputs, backend, dp, adamw_bytes)
        return total, text if base.name in ("muon", "normuon") else f"{cfg.optim.name}" + text[len(base.name):]

    @classmethod
    def plan_rows(cls, cfg: Config, plan) -> None:
        plan.set("batch", f"{cfg.train.batch_size} expected (Poisson), physical micro-batches of at most "
                          f"{cfg.privacy.max_physical_batch} per rank")
        plan.set("privacy", describe(cfg, plan.data.num_samples("train"), plan.dp), before="steps")

    def __init__(self, cfg: Config, data, ctx, model: torch.nn.Module):
        super().__init__(cfg)
        p = cfg.privacy
        self.ctx = ctx
        self.population = data.num_samples("train")
        self.batch = cfg.train.batch_size
        self.sample_rate, self.delta, self.sigma = resolve_noise(cfg, self.population)
        self.accounted = accounted_sigma(cfg, self.sigma)
        self.clip = p.max_grad_norm
        self.ledger = PrivacyLedger(self.delta, p.accountant, p.target_epsilon)
        if self.sigma > 0 and self.ledger.would_exceed(self.accounted, self.sample_rate):
            raise UserError(f"privacy.target_epsilon: {p.target_epsilon} is spent by a single step at noise multiplier "
                            f"{self.sigma:g} (epsilon {self.ledger.epsilon_if(self.accounted, self.sample_rate):.4g}); "
                            "raise privacy.noise_multiplier or leave it unset to calibrate it")
        if p.fix_model:
            fix_batchnorm(model)
        self.keeper: Optional[BookKeeper] = None
        self.physical_size = p.max_physical_batch
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
        self.rank = backend.mesh.get_local_rank() if self.group is not None else 0
        # Seeds differ per rank (FSDP2 shard owners, and local-learning stages: independent noise).
        self.global_rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.lockstep = self.group is not None and any(_sharded(p) for p in self.keeper.params)
        self.rows = {p: _RowShards(p) for p in self.keeper.params if _sharded(p) and self.group is not None}
        self.noise_rank = self.rank == 0
        self.delegated = [self.keeper.names[p] in self._delegated for p in self.keeper.params]

    def sampler(self, data):
        self._sampler = PoissonSampler(self.population, self.sample_rate, self.cfg.train.seed)
        return self._sampler

    # --- one step -------------------------------------------------------------------------
    def stop_reason(self) -> Optional[str]:
        if self.sigma > 0 and self.ledger.would_exceed(self.accounted, self.sample_rate):
            return (f"privacy budget: one more step would take epsilon above privacy.target_epsilon = "
                    f"{self.cfg.privacy.target_epsilon} (spent {self.ledger.epsilon():.4f} at delta "
                    f"{self.delta:g} after {self.ledger.steps} steps); training stops here")
        return None

    def micro_batches(self, indices: torch.Tensor) -> list[torch.Tensor]:
        parts = physical_batches(indices, self.cfg.privacy.max_physical_batch)
        if self.lockstep:
            # FSDP2 all-gathers inside every forward: all ranks must run as many micro-batches. The
            # sampler knows every rank's draw, so the count needs no communication; ranks with fewer
            # examples run empty micro-batches.
            step, cap = self._sampler.step - 1, self.cfg.privacy.max_physical_batch
            most = max(-(-self._sampler.rank_indices(step, r, self.world).numel() // cap) for r in range(self.world))
            parts += [indices[:0]] * (max(most, 1) - len(parts))
        return parts

    def backward(self, backend, loss: torch.Tensor, examples: int, is_last: bool, batch=None) -> None:
        # The loss is the micro-batch mean over examples (each example's own mean over its
        # positions); x examples makes it the sum over examples, so each captured output
        # gradient is exactly one example's.
        (loss * examples).backward()
        self.keeper.accumulate(examples)

    def __call__(self, backend) -> float:
        # This rank's clipped sums, full shapes (a parameter no example touched: zeros of its full
        # shape, since zeros_like of a sharded parameter would be a DTensor).
        grads = [torch.zeros(g.shape, dtype=g.dtype, device=g.to_local().device) if _sharded(g) else g
                 for g in self.keeper.take()]
        device = grads[0].device if grads else torch.device("cpu")
        stats = torch.tensor([self.keeper.examples, self.keeper.clipped, self.keeper.norm_sum],
                             dtype=torch.float64, device=device)
        self.keeper.reset_stats()
        gen = self._generator(device)
        sq = torch.zeros((), dtype=torch.float64, device=device)  # squared norm of the result, local part
        replicated = [i for i, p in enumerate(self.keeper.params) if not self.delegated[i] and not _sharded(p)]
        if self.noise_rank and self.sigma > 0:  # one draw per coordinate: on dp rank 0 ...
            for i in (i for i, p in enumerate(self.keeper.params) if not _sharded(p)):
                grads[i].add_(self._noise(grads[i].shape, gen), alpha=self.sigma * self.clip)
        if self.group is not None:
            dist.all_reduce(stats, group=self.group)
            if replicated:
                flat = torch.cat([grads[i].reshape(-1) for i in replicated])  # one collective for them all
                dist.all_reduce(flat, group=self.group)
                for i, g in zip(replicated, torch.split(flat, [grads[i].numel() for i in replicated])):
                    grads[i] = g
        for i, p in enumerate(self.keeper.params):
            if _sharded(p):  # ... or, for an FSDP2 shard, by the rank that owns it, after the reduce-scatter
                rows = self.rows.get(p)
                local = self._reduce_scatter(grads[i], p, rows)
                if self.sigma > 0 and (rows is None or rows.noise):
                    local.add_(self._noise(local.shape, gen), alpha=self.sigma * self.clip)
                if rows is not None and rows.replicas is not None:  # HSDP: the other replica groups' sums
                    dist.all_reduce(local, group=rows.replicas)
                local.div_(self.batch)
                if rows is None or rows.noise:  # one copy of each row shard counts
                    sq += local.double().pow(2).sum()
                p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            elif self.delegated[i]:
                # This rank's sum (rank 0's with the noise), scaled so that the owner's mean over the
                # ranks is (sum over ranks + noise) / B, as for the others.
                p.grad = grads[i].view_as(p).mul_(self.world / self.batch)
            else:
                p.grad = grads[i].view_as(p).div_(self.batch)
                if self.noise_rank or self.group is None:  # identical on every rank: count it once
                    sq += p.grad.double().pow(2).sum()
        if self.group is not None:
            dist.all_reduce(sq, group=self.group)
        if self.sigma > 0:
            self.ledger.record(self.accounted, self.sample_rate)
        self.step_index += 1
        examples, clipped, norm_sum = stats.tolist()
        self._last = {"dp_examples": examples, "dp_clip_fraction": clipped / examples if examples else 0.0,
                      "dp_mean_example_norm": norm_sum / examples if examples else 0.0}
        # The norm of the privatised gradient (Muon's matrices, reduced later by their owners, excluded).
        return math.sqrt(float(sq))

    def _noise(self, shape, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32)

    def _reduce_scatter(self, full: torch.Tensor, p, shards: Optional[_RowShards]) -> torch.Tensor:
        """This rank's dim-0 shard of the sum over its shard group of `full` (FSDP2 shards rows as
        torch.chunk does: ceil(n / W) rows per rank, the last ones shorter or empty). One process:
        `full` itself."""
        if shards is None:
            return full[:p.to_local().shape[0]].contiguous()
        rows = -(-full.shape[0] // shards.world)
        padded = full.new_zeros((rows * shards.world, *full.shape[1:]))
        padded[:full.shape[0]] = full
        out = full.new_empty((rows, *full.shape[1:]))
        _reduce_scatter_single(out, padded, group=shards.group)
        return out[:p.to_local().shape[0]].contiguous()

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = torch.Generator(device=device)
        if self.cfg.privacy.secure_rng:
            gen.manual_seed(secrets.randbits(63))
        else:  # per rank: FSDP2 shard owners draw their own coordinates
            gen.manual_seed(derive_seed(self.cfg.train.seed, self.step_index, self.global_rank, _NOISE_TAG))
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
        if self.sigma > 0 and self.ledger.would_exceed(self.accounted, self.sample_rate):
            raise UserError(f"privacy.target_epsilon: the budget is spent: epsilon {self.ledger.epsilon():.4f} after "
                            f"{self.ledger.steps} steps, and one more step would exceed {self.cfg.privacy.target_epsilon}; "
                            "nothing trained")
