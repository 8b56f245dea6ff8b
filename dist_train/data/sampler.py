"""Which examples make up step s's global batch, as a pure function of (seed, step).

The data position of a run is just its global step: no iterator state, no worker RNG. A resumed
run (on any world size) recomputes exactly the batches it would have seen, and every rank
computes the same global batch and takes its own contiguous slice of it.
"""

from __future__ import annotations

from typing import Literal

import torch

from dist_train.errors import UserError

Mode = Literal["windows", "epochs"]

_MASK64 = (1 << 64) - 1
# Tags keep the random streams of the two modes apart even for equal (seed, step/epoch).
_TAG = {"windows": 0x57494E44, "epochs": 0x45504F43}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit generator seed.

    A hash rather than e.g. seed*K+step, so that distinct (seed, step) pairs never collide and
    neighbouring steps get unrelated streams. Pure Python, so it never changes with a library.
    """
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (p & _MASK64))
    return h & ((1 << 63) - 1)


def _generator(*parts: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(*parts))
    return g


def rank_slice(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank r's contiguous r-th slice of the global batch.

    Equal slice sizes make the mean of per-rank mean losses equal the single-process mean loss
    over the same global batch, which is what makes runs comparable across world sizes.
    """
    n = indices.numel()
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    if n % world != 0:
        raise UserError(f"train.batch_size ({n}) must be divisible by the number of data-parallel ranks ({world})")
    per = n // world
    return indices[rank * per:(rank + 1) * per]


class StepSampler:
    """Global batch indices for any step, computed from (seed, step) alone.

    mode "windows": `global_batch` random start offsets in [0, population), drawn with
    replacement like nanoGPT's get_batch (LM corpora, where population = valid window starts).
    mode "epochs": a (seed, epoch)-seeded permutation of [0, population) walked in order; a
    batch that crosses an epoch boundary continues into the next epoch's permutation.

    `step` is the next step to draw; it is the only state and what a checkpoint records.
    """

    def __init__(self, population: int, global_batch: int, seed: int, mode: Mode, step: int = 0):
        if population < 1:
            raise UserError("data: the split has no complete examples to sample")
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        if mode not in _TAG:
            raise ValueError(f"unknown sampler mode {mode!r}")
        self.population = population
        self.global_batch = global_batch
        self.seed = seed
        self.mode = mode
        self.step = step
        self._perms: dict[int, torch.Tensor] = {}  # small cache: a batch touches <= a few epochs

    def global_indices(self, step: int) -> torch.Tensor:
        """LongTensor[global_batch] of example indices for `step` (pure; ignores self.step)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.mode == "windows":
            g = _generator(self.seed, step, _TAG["windows"])
            return torch.randint(0, self.population, (self.global_batch,), generator=g, dtype=torch.long)
        positions = step * self.global_batch + torch.arange(self.global_batch, dtype=torch.long)
        epochs, offsets = positions // self.population, positions % self.population
        out = torch.empty(self.global_batch, dtype=torch.long)
        for epoch in torch.unique(epochs).tolist():
            sel = epochs == epoch
            out[sel] = self._permutation(epoch)[offsets[sel]]
        return out

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(min(self._perms))
            g = _generator(self.seed, epoch, _TAG["epochs"])
            self._perms[epoch] = torch.randperm(self.population, generator=g)
        return self._perms[epoch]

    def next_indices(self, rank: int = 0, world: int = 1) -> torch.Tensor:
        """This rank's slice of the batch at `self.step`, then advance `self.step`."""
        out = rank_slice(self.global_indices(self.step), rank, world)
        self.step += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "global_batch": self.global_batch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the position. World size may differ (the global batch is rank-independent),
        but the seed and global batch size must match or the order cannot be reproduced."""
        missing = {"seed", "global_batch", "step"} - set(state)
        if missing:
            raise UserError(f"checkpoint: data sampler state lacks {sorted(missing)}")
        if int(state["global_batch"]) != self.global_batch:
            raise UserError(
                f"train.batch_size: checkpoint was written with global batch {state['global_batch']}, "
                f"config has {self.global_batch}; the data order could not be reproduced")
        if int(state["seed"]) != self.seed:
            raise UserError(
                f"train.seed: checkpoint was written with seed {state['seed']}, config has {self.seed}; "
                "the data order could not be reproduced")
        self.step = int(state["step"])
