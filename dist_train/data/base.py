"""The uniform data set API every trainer sees: `info`, `get_batch`, `sampler`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch

from dist_train.config.options import Options
from dist_train.errors import UserError

from dist_train.data.sampler import Mode, StepSampler

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Validation (and test) batches come from a fixed seed, so evaluations are comparable across runs
# that differ in train.seed (and across resumes).
VAL_SEED = 0x5EED


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data. Sizes are tokens (lm) or examples (other tasks)."""

    task: str  # a key of dist_train.tasks.TASKS ("lm", "classify", ...)
    vocab_size: Optional[int]
    input_shape: Optional[tuple[int, ...]]
    num_classes: Optional[int]
    train_size: int
    val_size: int
    test_size: int = 0  # 0: the data set has no test split (data.test_fraction = 0)
    grid: Optional[object] = None  # PDE data sets: their dist_train.pde.grid.PDEGrid (the model's grid and coefficients)
    # Image data sets: per-channel (mean, std) such that x * std + mean is the image in [0, 1] that
    # the model input x was normalised from (InfoPro's decoder reconstructs that image, as the
    # paper's `_image_restore` does). None: the input is not an image in [0, 1].
    image_norm: Optional[tuple[tuple[float, ...], tuple[float, ...]]] = None


def check_split(split: str, info: Optional[DataInfo] = None) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "test" and info is not None and info.test_size == 0:
        raise ValueError("this data set has no test split (set data.test_fraction > 0)")


class Dataset(ABC):
    """A data set of train / val (and, when `info.test_size` > 0, test) splits addressed by
    integer indices that a `StepSampler` produces."""

    info: DataInfo
    sampling: ClassVar[Mode]  # "windows" for LM corpora, "epochs" for map-style data sets

    @abstractmethod
    def num_samples(self, split: Split) -> int:
        """Size of the index space of `split` (valid window starts, or examples)."""

    @abstractmethod
    def get_batch(self, split: Split, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) on CPU for the given indices of `split`."""

    def sampler(self, split: Split, seed: int, global_batch: int) -> StepSampler:
        """Step sampler over `split`; the val and test samplers ignore `seed` and use VAL_SEED."""
        check_split(split, self.info)
        if split == "train" and self.num_samples(split) < global_batch:
            # Every step would repeat examples within its own batch: almost surely a wrong file or size.
            unit = "windows" if self.sampling == "windows" else "examples"
            raise UserError(f"data: the training split holds {self.num_samples(split)} {unit}, fewer than one "
                            f"global batch (train.batch_size={global_batch})")
        return StepSampler(self.num_samples(split), global_batch,
                           seed if split == "train" else VAL_SEED, self.sampling)


class InMemoryDataset(Dataset):
    """A map-style data set held as tensors: `self._splits[split] = (inputs, targets)`, indexed by example."""

    sampling = "epochs"
    _splits: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def num_samples(self, split: Split) -> int:
        check_split(split, self.info)
        return len(self._splits[split][1])

    def get_batch(self, split: Split, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_split(split, self.info)
        inputs, targets = self._splits[split]
        idx = indices.cpu().long()
        return inputs[idx], targets[idx]


class DatasetSpec:
    """What a `data.name` stands for: the task its batches feed, the `data.*` keys it owns (its
    options model, besides the common `val_fraction` / `test_fraction`), its rules and its builder.
    A new data set is one file with a subclass plus one line in `dist_train.registry.DATASETS`
    (or `DATASETS.register(name, cls)` from a plugin module)."""

    task: ClassVar[str] = "lm"  # a key of dist_train.tasks.TASKS
    options: ClassVar[Optional[type[Options]]] = None  # its own data.* keys (None: none)

    @classmethod
    def build(cls, cfg_data, block_size: int) -> Dataset:
        """The data set for the `data` section `cfg_data` (its own keys: `cfg_data.options()`);
        `block_size` (model.block_size) sizes language-model windows."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg) -> None:
        """Rules that need only the config, run when it is loaded: raise ValueError naming the key."""

    @classmethod
    def check(cls, cfg, world_size: int) -> None:
        """Rules that need the world size: raise UserError naming the key."""

    @classmethod
    def plan_rows(cls, cfg, plan) -> None:
        """Add or replace rows of `dist-train plan`'s table (`plan.set(label, text)`)."""
