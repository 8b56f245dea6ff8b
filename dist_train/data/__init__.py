"""Data sets (no downloads) and the step-indexed sampler that makes data order resumable.

Each data set is a `DatasetSpec` registered by name in `dist_train.registry.DATASETS` (re-exported
here): it owns its `data.*` keys, its rules and its builder."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dist_train.data.base import SPLITS, VAL_SEED, DataInfo, Dataset, DatasetSpec, Split
from dist_train.data.sampler import StepSampler, derive_seed, rank_slice
from dist_train.data.stdlib_bytes import build_stdlib_bytes, load_stdlib_bytes
from dist_train.data.token_bin import build_token_bin, open_token_bin, write_token_bin
from dist_train.data.tokens import TokenDataset
from dist_train.registry import DATASETS

if TYPE_CHECKING:
    from dist_train.config.schema import DataSection

__all__ = [
    "DATASETS", "DataInfo", "Dataset", "DatasetSpec", "Split", "SPLITS", "VAL_SEED", "StepSampler", "rank_slice",
    "derive_seed", "TokenDataset", "build_dataset", "build_stdlib_bytes", "load_stdlib_bytes", "build_token_bin",
    "open_token_bin", "write_token_bin",
]


def build_dataset(cfg_data: "DataSection", block_size: int) -> Dataset:
    """The data set named in the config. `block_size` (model.block_size) sizes LM windows."""
    return DATASETS.get(cfg_data.name).build(cfg_data, block_size)
