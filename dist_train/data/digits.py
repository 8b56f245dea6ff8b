"""scikit-learn's bundled 8x8 handwritten digits (1797 images, shipped with sklearn: no download)."""

from __future__ import annotations

import numpy as np
import torch

from dist_train.data.base import DataInfo, DatasetSpec, InMemoryDataset

# The split never depends on train.seed: runs with different seeds are evaluated on the same
# held-out images. RandomState's stream is frozen by NumPy, so the split is stable across versions.
SPLIT_SEED = 0


class DigitsDataset(InMemoryDataset):
    """Images float32 [1,8,8] in [0,1] and int64 labels 0..9; a fixed seeded train/val(/test) split.

    Validation is the first `val_fraction` of one seeded permutation, test (when `test_fraction`
    > 0) the next `test_fraction`, training the rest: asking for a test split leaves the
    validation images as they were and takes the test images from training."""

    def __init__(self, val_fraction: float, test_fraction: float = 0.0):
        from sklearn.datasets import load_digits  # lazy: sklearn is slow to import, LM runs skip it

        raw = load_digits()
        images = torch.from_numpy((raw.images / 16.0).astype(np.float32)).unsqueeze(1)  # pixels are 0..16
        labels = torch.from_numpy(raw.target.astype(np.int64))
        n = len(labels)
        perm = torch.from_numpy(np.random.RandomState(SPLIT_SEED).permutation(n))
        n_val = min(max(1, round(n * val_fraction)), n - 1)
        n_test = min(max(1, round(n * test_fraction)), n - n_val - 1) if test_fraction > 0 else 0
        self.val_ids, self.test_ids = perm[:n_val], perm[n_val:n_val + n_test]
        self.train_ids = perm[n_val + n_test:]
        self._splits = {
            "train": (images[self.train_ids], labels[self.train_ids]),
            "val": (images[self.val_ids], labels[self.val_ids]),
            "test": (images[self.test_ids], labels[self.test_ids]),
        }
        self.info = DataInfo(task="classify", vocab_size=None, input_shape=(1, 8, 8), num_classes=10,
                             train_size=n - n_val - n_test, val_size=n_val, test_size=n_test,
                             image_norm=((0.0,), (1.0,)))  # the input is the image itself


class Digits(DatasetSpec):
    """`data.name: digits`: scikit-learn's bundled 8x8 digits; no options beyond the split fractions."""

    task = "classify"

    @classmethod
    def build(cls, cfg_data, block_size: int) -> DigitsDataset:
        return DigitsDataset(cfg_data.val_fraction, cfg_data.test_fraction or 0.0)
