"""Poisson sampling over the global dataset, split across ranks without communication.

DP-SGD's accountant assumes every example joins each logical step's batch independently with
probability q (Poisson sampling). Here the global logical batch of step s is a pure function of
(seed, s), the same on every rank and for every world size:

- a fixed permutation π of [0, N), seeded by (seed, _PERM_TAG), cut into `world` contiguous
  shards of sizes differing by at most 1 (shard r = positions [r·N//W, (r+1)·N//W));
- for step s, one uniform u_p ∈ [0, 1) in float64 per permutation position p, from a generator
  seeded by derive_seed(seed, s, _STEP_TAG); example π[p] is selected when u_p < q.

Each example is thus included independently with probability q (the u's are i.i.d.; float64
keeps the rounding bias below 2⁻⁵³). The union over ranks is every selected example in
permutation order, whatever the world size: a 2-rank run sees exactly the global batch of a
1-process run with the same seed. A rank's batch is its shard's selected examples, in
permutation order; it may be empty, and its size varies from step to step.
"""

from __future__ import annotations

import math

import torch

from dist_train.data.sampler import derive_seed
from dist_train.errors import UserError

_PERM_TAG = 0x504F4950  # "POIP": the fixed ownership permutation
_STEP_TAG = 0x504F4953  # "POIS": per-step Bernoulli draws


def _generator(*parts: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(*parts))
    return g


def _check_rate(sample_rate: float) -> float:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0.0 < sample_rate <= 1.0:
        raise UserError(f"train.batch_size: the sample rate batch_size / dataset size must be in (0, 1], "
                        f"got {sample_rate!r}")
    return float(sample_rate)


class PoissonSampler:
    """Per-step Poisson-sampled logical batches, computed from (seed, step) alone.

    `step` is the next step to draw; it is the only state and what a checkpoint records. The
    permutation is computed once (N int64s); a step costs one N-element float64 draw.
    """

    def __init__(self, population: int, sample_rate: float, seed: int, step: int = 0):
        if population < 1:
            raise UserError("data: the split has no complete examples to sample")
        self.population = int(population)
        self.sample_rate = _check_rate(sample_rate)
        self.seed = seed
        self.step = step
        self._perm: torch.Tensor | None = None
        self._shards: dict[tuple[int, int], tuple[int, int]] = {}

    @property
    def expected_batch_size(self) -> float:
        """q·N: the expected global logical batch size (DP-SGD divides by this, not the realised size)."""
        return self.sample_rate * self.population

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            self._perm = torch.randperm(self.population, generator=_generator(self.seed, _PERM_TAG))
        return self._perm

    def _shard(self, rank: int, world: int) -> tuple[int, int]:
        """Permutation positions [lo, hi) owned by `rank`."""
        key = (rank, world)
        if key not in self._shards:
            if world < 1 or not 0 <= rank < world:
                raise ValueError(f"rank {rank} out of range for world size {world}")
            self._shards[key] = (rank * self.population // world, (rank + 1) * self.population // world)
        return self._shards[key]

    def _selected_positions(self, step: int, lo: int, hi: int) -> torch.Tensor:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        # The whole population's draws, always: every rank must see the same u's.
        u = torch.rand(self.population, dtype=torch.float64, generator=_generator(self.seed, step, _STEP_TAG))
        return torch.nonzero(u[lo:hi] < self.sample_rate).squeeze(1) + lo

    def global_indices(self, step: int) -> torch.Tensor:
        """LongTensor of every example selected at `step`, in permutation order (pure)."""
        return self._permutation()[self._selected_positions(step, 0, self.population)]

    def rank_indices(self, step: int, rank: int, world: int) -> torch.Tensor:
        """LongTensor of `rank`'s selected examples at `step`, in permutation order (pure; may be empty)."""
        lo, hi = self._shard(rank, world)
        return self._permutation()[self._selected_positions(step, lo, hi)]

    def next_indices(self, rank: int = 0, world: int = 1) -> torch.Tensor:
        """This rank's indices at `self.step` (possibly empty), then advance `self.step`."""
        out = self.rank_indices(self.step, rank, world)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "sample_rate": self.sample_rate, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position. World size may differ (the global batch is rank-independent),
        but the seed and sample rate must match or the batches cannot be reproduced."""
        missing = {"seed", "sample_rate", "step"} - set(state)
        if missing:
            raise UserError(f"checkpoint: Poisson sampler state lacks {sorted(missing)}")
        if not math.isclose(float(state["sample_rate"]), self.sample_rate, rel_tol=1e-12, abs_tol=0.0):
            raise UserError(
                f"train.batch_size: checkpoint was written with sample rate {state['sample_rate']}, config has "
                f"{self.sample_rate} (batch_size / dataset size); the batches could not be reproduced")
        if int(state["seed"]) != self.seed:
            raise UserError(
                f"train.seed: checkpoint was written with seed {state['seed']}, config has {self.seed}; "
                "the data order could not be reproduced")
        self.step = int(state["step"])


def physical_batches(indices: torch.Tensor, max_size: int) -> list[torch.Tensor]:
    """Split a rank's logical batch into consecutive micro-batches of at most `max_size`
    examples (all full but the last). An empty logical batch gives an empty list: the caller
    still takes part in the step's collectives with a zero gradient contribution."""
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"max_size must be an integer >= 1, got {max_size!r}")
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
    if indices.numel() == 0:
        return []
    return list(torch.split(indices, max_size))
