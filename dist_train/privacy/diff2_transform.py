"""`optim.name: diff2` — DIFF2 (Murata & Suzuki, ICML 2023) as the trainer's gradient transform.

The workers are the data-parallel ranks. Every step is one round on each worker's whole local data
(`FullDataSampler`: the training set split into contiguous shards, as evenly as it goes; train.batch_size
must name the whole set). The transform hands the loop's batch to `dist_train.privacy.diff2.Diff2`,
which computes the round's released direction v_r (restart rounds: clipped gradients at C1 =
privacy.max_grad_norm; other rounds: clipped gradient differences at C2 x ||x_r - x_(r-1)||; the mean
over workers by one all-reduce, the Gaussian drawn once from (train.seed, round)), and writes v_r as
the gradient; the optimizer is plain SGD (no momentum, no weight decay), so the step is the paper's
GD subroutine x_(r+1) = x_r - lr v_r, with lr from the run's schedule (a constant schedule is the
paper's; any schedule is post-processing and costs no privacy).

Noise: privacy.diff2.noise = calibrated (default: the closed form scaled down to exactly
privacy.target_epsilon by privacy.accountant, `calibrated_sigmas`) or closed_form, over R =
train.steps rounds and n = the smallest worker's examples; or explicit sigma1 / sigma2. epsilon is
fixed by R: it is logged as spent after each round, and a resume must keep R, T and the noise.
The model's forward in the loop gives the logged loss (without autograd: `builds_graph`); the
per-example gradients come from torch.func (small models, as in the paper).
"""

from __future__ import annotations

from typing import Optional

import torch

from dist_train.config.schema import Config
from dist_train.errors import UserError
from dist_train.optim.transform import GradientTransform
from dist_train.privacy.diff2 import Diff2, calibrated_sigmas, closed_form_sigmas, diff2_epsilon


class FullDataSampler:
    """Each round, every worker's whole shard: contiguous, sizes differing by at most one."""

    def __init__(self, population: int):
        self.population, self.round = population, 0

    def next_indices(self, rank: int = 0, world: int = 1) -> torch.Tensor:
        self.round += 1
        return torch.tensor_split(torch.arange(self.population), world)[rank]

    def state_dict(self) -> dict:
        return {"round": self.round}

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state["round"])


def resolve_diff2(cfg: Config, population: int, workers: int) -> dict:
    """The run's noise and guarantee: sigma1, sigma2, delta, n (smallest shard), planned epsilon."""
    p, d = cfg.privacy, cfg.privacy.diff2
    if cfg.train.batch_size != population:
        raise UserError(f"train.batch_size: diff2 trains on the whole training set every round; set it to "
                        f"{population} (the training examples), not {cfg.train.batch_size}")
    n = population // workers
    if n < 1:
        raise UserError(f"optim.name: diff2 needs at least one example per worker ({population} examples, {workers} workers)")
    delta = p.delta if p.delta is not None else 0.1 / population
    if delta >= 1.0 / population:
        raise UserError(f"privacy.delta: {delta:g} is not below 1/N = {1.0 / population:.3g} "
                        f"(N = {population} training examples); such a delta protects nobody")
    rounds, period = cfg.train.steps, d.period
    if d.sigma1 is not None:
        s1, s2 = float(d.sigma1), float(d.sigma2)
    elif d.noise == "closed_form":
        s1, s2 = closed_form_sigmas(p.target_epsilon, delta, n, workers, rounds, period)
    else:
        s1, s2 = calibrated_sigmas(p.target_epsilon, delta, n, workers, rounds, period, p.accountant)
    epsilon = diff2_epsilon(s1, s2, n, workers, rounds, period, delta, p.accountant)
    if p.target_epsilon is not None and epsilon > p.target_epsilon:
        raise UserError(f"privacy.diff2: sigma1 {s1:g}, sigma2 {s2:g} spend epsilon {epsilon:.4g} over {rounds} rounds, "
                        f"above privacy.target_epsilon {p.target_epsilon:g}")
    return {"sigma1": s1, "sigma2": s2, "delta": delta, "n": n, "epsilon": epsilon}


def describe(cfg: Config, population: int, workers: int) -> str:
    """One line for `dist-train plan`."""
    r = resolve_diff2(cfg, population, workers)
    d = cfg.privacy.diff2
    return (f"DIFF2 over {workers} worker(s) x >= {r['n']} examples, full data every round, T = {d.period}, "
            f"C1 = {cfg.privacy.max_grad_norm:g}, C2 = {d.c2:g}, sigma1 {r['sigma1']:.4g}, sigma2 {r['sigma2']:.4g} "
            f"({'explicit' if d.sigma1 is not None else d.noise}); epsilon {r['epsilon']:.4g} at delta {r['delta']:.3g} "
            f"after {cfg.train.steps} rounds ({cfg.privacy.accountant})")


class Diff2Transform(GradientTransform):
    name = "diff2"
    plain = False
    builds_graph = False  # the round differentiates through torch.func; the loop's loss is only logged

    @classmethod
    def build(cls, cfg: Config, data, ctx, model: torch.nn.Module) -> "Diff2Transform":
        return cls(cfg, data, ctx, model)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        p, d = cfg.privacy, cfg.privacy.diff2
        if (d.sigma1 is None) != (d.sigma2 is None):
            raise ValueError("privacy.diff2: give both sigma1 and sigma2, or neither (calibrated from target_epsilon)")
        if d.sigma1 is None and p.target_epsilon is None:
            raise ValueError("privacy: diff2 needs privacy.target_epsilon or privacy.diff2.sigma1 and sigma2")
        if cfg.parallel.stages != 1:
            raise ValueError("parallel.stages: diff2 trains end to end (its workers are the data-parallel ranks)")
        if cfg.train.grad_accum != 1:
            raise ValueError("train.grad_accum: diff2 takes each worker's whole data in one pass; leave it at 1")
        if cfg.parallel.activation_checkpointing.mode != "none":
            raise ValueError("parallel.activation_checkpointing: diff2 computes per-example gradients with "
                             "torch.func; there is no backward pass to checkpoint")
        if cfg.parallel.compile:
            raise ValueError("parallel.compile: diff2 computes per-example gradients with torch.func over the whole "
                             "model, which compiled blocks are not offered under; use parallel.compile=false")

    @classmethod
    def check(cls, cfg: Config, world_size: int) -> None:
        # No batch-divisibility rule: a round takes the whole training set, split as evenly as it goes.
        if cfg.parallel.dp_replicate > 1:  # its workers keep whole models: there is nothing to shard
            raise UserError(f"parallel.dp_replicate: diff2 averages its workers' directions over the flat data-parallel "
                            f"ranks with whole models (ddp or none); HSDP ({cfg.parallel.dp_replicate} replica groups) "
                            "is not supported, leave it at 1")
        if cfg.parallel.backend not in ("ddp", "none"):
            raise UserError(f"optim.name: diff2 averages its workers' clipped directions itself; parallel.backend "
                            f"{cfg.parallel.backend} is not supported (use ddp or none)")

    @classmethod
    def state_bytes(cls, cfg, model, num_outputs, backend, dp, adamw_bytes):
        from dist_train.models import count_parameters

        # x_(r-1) and v_(r-1), whole on every worker; its step is plain SGD.
        return count_parameters(model) * 8.0, "diff2 (x_(r-1) and v_(r-1): two fp32 parameter copies per rank)"

    @classmethod
    def plan_rows(cls, cfg: Config, plan) -> None:
        n = plan.data.num_samples("train")
        plan.set("batch", f"the whole training set every round ({n}), ~{n // plan.dp} per worker")
        plan.set("privacy", describe(cfg, n, plan.dp), before="steps")

    def __init__(self, cfg: Config, data, ctx, model: torch.nn.Module):
        super().__init__(cfg)
        self.population = data.num_samples("train")
        self.workers = ctx.world_size
        self.plan = resolve_diff2(cfg, self.population, self.workers)
        self.round = 0
        self.algo: Optional[Diff2] = None
        self._batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._last: dict = {}

    def optimizer_spec(self, model, mesh, num_outputs):
        from dist_train.optim.build import optimizer_spec

        # x_(r+1) = x_r - lr v_r exactly: SGD without momentum or weight decay.
        sgd = self.cfg.optim.model_copy(update={"name": "sgd", "beta1": 0.0, "weight_decay": 0.0})
        spec = optimizer_spec(sgd, model, mesh, num_outputs=num_outputs)
        spec.self_reduced = [n for n, q in model.named_parameters() if q.requires_grad]  # Diff2 averages itself
        return spec

    def attach(self, backend) -> None:
        module = backend.module
        group = backend.mesh.get_group() if backend.mesh is not None and backend.dp_size > 1 else None
        d = self.cfg.privacy.diff2
        self.algo = Diff2(module, module.loss, lr=0.0, period=d.period,
                          c1=self.cfg.privacy.max_grad_norm, c2=d.c2, sigma1=self.plan["sigma1"],
                          sigma2=self.plan["sigma2"], seed=self.cfg.train.seed, process_group=group)

    def sampler(self, data):
        return FullDataSampler(self.population)

    def eval_batch_size(self, data, world: int) -> int:
        # The training "batch" is the whole set; evaluate on the validation set split evenly instead.
        return max(world, data.num_samples("val") // world * world)

    # --- one round ------------------------------------------------------------------------
    def micro_batches(self, indices: torch.Tensor) -> list[torch.Tensor]:
        return [indices]

    def backward(self, backend, loss: torch.Tensor, examples: int, is_last: bool, batch=None) -> None:
        # No backward pass: the round needs per-example gradients at two iterates (torch.func).
        self._batch = batch

    def __call__(self, backend) -> float:
        x, y = self._batch
        v, self._last = self.algo.direction(x, y, self.round)
        params = dict(backend.module.named_parameters())
        for name, part in self.algo.unflatten(v).items():
            params[name].grad = part.clone()
        self.round += 1
        self._batch = None
        return self._last["v_norm"]

    def epsilon(self) -> float:
        """epsilon spent by the rounds run so far."""
        d = self.cfg.privacy.diff2
        return diff2_epsilon(self.plan["sigma1"], self.plan["sigma2"], self.plan["n"], self.workers, self.round,
                             d.period, self.plan["delta"], self.cfg.privacy.accountant)

    def metrics(self) -> dict:
        figures = {f"diff2_{k}": float(v) for k, v in self._last.items()}
        return {"epsilon": self.epsilon(), "delta": self.plan["delta"], "diff2_sigma1": self.plan["sigma1"],
                "diff2_sigma2": self.plan["sigma2"], **figures}

    def step_scalars(self) -> dict:
        return {"epsilon": self.epsilon()}

    # --- checkpoint -----------------------------------------------------------------------
    def _noise_key(self) -> dict:
        return {"rounds": self.cfg.train.steps, "period": self.cfg.privacy.diff2.period,
                "sigma1": self.plan["sigma1"], "sigma2": self.plan["sigma2"], "workers": self.workers}

    def state_dict(self) -> dict:
        return {"round": self.round, **self._noise_key(), **self.algo.state_dict()}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state is None or "round" not in state or "sigma1" not in state:
            raise UserError("checkpoint: no DIFF2 state in it (was it saved by a run without optim.name diff2?)")
        saved = {k: state[k] for k in self._noise_key()}
        if saved != self._noise_key():
            raise UserError(f"checkpoint: DIFF2 was run with rounds/period/noise/workers {saved}; resuming with "
                            f"{self._noise_key()} would change the privacy guarantee (keep train.steps, "
                            "privacy.diff2 and the world size)")
        self.round = int(state["round"])
        self.algo.load_state_dict(state)
