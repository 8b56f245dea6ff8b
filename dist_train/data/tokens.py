"""Language-model windows over 1-D token arrays (shared by stdlib_bytes and token_bin)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from dist_train.data.base import DataInfo, Dataset, Split, check_split
from dist_train.errors import UserError

Tokens = Union[np.ndarray, Sequence[np.ndarray]]


class _Shards:
    """The windows of a split made of one or more token arrays (shards). A window never crosses
    a shard boundary: shard k holds len_k - T windows, numbered after those of shards 0..k-1, so a
    shard shorter than T + 1 tokens holds none."""

    def __init__(self, arrays: Sequence[np.ndarray], block_size: int):
        self.arrays = list(arrays)
        self.tokens = sum(len(a) for a in self.arrays)
        counts = np.array([max(0, len(a) - block_size) for a in self.arrays], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(counts)])  # window number where shard k starts
        self.windows = int(self.first[-1])

    def gather(self, starts: np.ndarray, width: int) -> np.ndarray:
        """[B, width] int64 tokens of the windows numbered `starts`."""
        if len(self.arrays) == 1:  # one fancy-index gather; the common case
            return np.asarray(self.arrays[0][starts[:, None] + np.arange(width)], dtype=np.int64)
        shard = np.searchsorted(self.first, starts, side="right") - 1
        out = np.empty((len(starts), width), dtype=np.int64)
        for k in np.unique(shard):
            rows = np.nonzero(shard == k)[0]
            local = starts[rows] - self.first[k]
            out[rows] = self.arrays[k][local[:, None] + np.arange(width)]
        return out


class TokenDataset(Dataset):
    """Index i of a split is its window i: inputs tokens[i:i+T], targets tokens[i+1:i+T+1] of one
    array, or of one shard when a split is a list of arrays. The arrays may be numpy memmaps; only
    the sampled windows are read."""

    sampling = "windows"
    tokenizer_path: Optional[str] = None  # a tokenizer.json that encodes and decodes these ids, if known

    def __init__(self, train: Tokens, val: Tokens, vocab_size: int, block_size: int, source: str,
                 test: Optional[Tokens] = None):
        splits = {"train": train, "val": val, **({"test": test} if test is not None else {})}
        self._splits: dict[str, _Shards] = {}
        for split, arrays in splits.items():
            shards = _Shards([arrays] if isinstance(arrays, np.ndarray) else arrays, block_size)
            if shards.windows == 0:
                what = f"{len(shards.arrays)} shards, each" if len(shards.arrays) > 1 else f"{shards.tokens} tokens,"
                raise UserError(f"{source}: {split} split has {what} fewer than one block "
                                f"(model.block_size + 1 = {block_size + 1})")
            self._splits[split] = shards
        self.block_size = block_size
        self.info = DataInfo(task="lm", vocab_size=vocab_size, input_shape=None, num_classes=None,
                             train_size=self._splits["train"].tokens, val_size=self._splits["val"].tokens,
                             test_size=0 if test is None else self._splits["test"].tokens)

    def num_samples(self, split: Split) -> int:
        check_split(split, self.info)
        return self._splits[split].windows

    def get_batch(self, split: Split, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_split(split, self.info)
        starts = indices.cpu().numpy().astype(np.int64)
        if starts.size and (starts.min() < 0 or starts.max() >= self.num_samples(split)):
            raise IndexError(f"window start out of range for the {split} split")
        # [B, T+1] tokens per gather; inputs and targets are views shifted by one.
        windows = torch.from_numpy(self._splits[split].gather(starts, self.block_size + 1))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
