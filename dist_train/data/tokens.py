"""Language-model windows over a 1-D token array (shared by stdlib_bytes and token_bin)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from dist_train.data.base import DataInfo, Dataset, Split, check_split
from dist_train.errors import UserError


class TokenDataset(Dataset):
    """Index i of a split is the window starting at token i: inputs tokens[i:i+T], targets
    tokens[i+1:i+T+1]. The arrays may be numpy memmaps; only the sampled windows are read."""

    sampling = "windows"

    def __init__(self, train: np.ndarray, val: np.ndarray, vocab_size: int, block_size: int, source: str,
                 test: Optional[np.ndarray] = None):
        splits = {"train": train, "val": val, **({"test": test} if test is not None else {})}
        for split, arr in splits.items():
            if len(arr) < block_size + 1:
                raise UserError(
                    f"{source}: {split} split has {len(arr)} tokens, fewer than one block "
                    f"(model.block_size + 1 = {block_size + 1})")
        self._splits = splits
        self.block_size = block_size
        self.info = DataInfo(task="lm", vocab_size=vocab_size, input_shape=None, num_classes=None,
                             train_size=len(train), val_size=len(val), test_size=0 if test is None else len(test))

    def num_samples(self, split: Split) -> int:
        check_split(split, self.info)
        return len(self._splits[split]) - self.block_size

    def get_batch(self, split: Split, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_split(split, self.info)
        data = self._splits[split]
        starts = indices.cpu().numpy().astype(np.int64)
        if starts.size and (starts.min() < 0 or starts.max() >= self.num_samples(split)):
            raise IndexError(f"window start out of range for the {split} split")
        # One fancy-index gather of [B, T+1] tokens; inputs and targets are views shifted by one.
        windows = np.asarray(data[starts[:, None] + np.arange(self.block_size + 1)], dtype=np.int64)
        windows = torch.from_numpy(windows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
