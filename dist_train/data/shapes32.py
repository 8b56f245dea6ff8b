"""shapes32: a procedurally generated 32x32 RGB image data set of 10 shape classes (no download).

Made for comparing local-learning methods on a task harder than digits: the class is a shape's
*form*, while position, size, rotation, colours, background and clutter vary at random, so a
classifier must compose local edge features into a global form (what greedy/local training is
known to struggle with) instead of reading a few pixels.

How an image is made (everything drawn from one `numpy.random.RandomState(seed)`, vectorised
over the images, so the set is a pure function of (seed, count); pixel values in [0, 1]):

1. Label: image i has class i mod 10 (so every split is balanced, see below).
2. Background: a linear gradient between two colours in a random direction, each uniform in
   [0, 0.45]^3 (dark); the shape's colour is uniform in [0.55, 1]^3 (light), so the shape is
   lighter than its background in every channel but hue and contrast vary. (Fully random colours,
   with the shape darker or lighter at random, made the task unlearnable for the reference CNN
   within the benchmark's few hundred steps.)
3. Clutter: 3 random line segments (length 4..12 px, width ~1 px, any colour in [0, 1]^3, any
   angle, anywhere), drawn before the shape; they look like pieces of crosses and stripes.
4. The shape: centre uniform in [6, 26] px on both axes (it may touch the border), size r uniform
   in 6.5..11 px. In the shape's own frame (u, v) = R(-theta)(p - centre) / r:
     0 disk          u^2 + v^2 <= 1                                   theta: any
     1 ring          0.55 <= sqrt(u^2 + v^2) <= 1                      theta: any
     2 square        max(|u|, |v|) <= 0.8                              theta: any
     3 frame         0.45 <= max(|u|, |v|) <= 0.8 (a hollow square)    theta: any
     4 triangle      v >= -0.5 and v <= 1 - sqrt(3)|u| (equilateral)    theta: any
     5 plus          |u| <= 1, |v| <= 0.22 or |v| <= 1, |u| <= 0.22    theta: 0 +- 15 deg
     6 x-cross       the plus, turned                                  theta: 45 +- 15 deg
     7 h-stripes     u^2 + v^2 <= 1 and sin(pi f v + phase) > 0          theta: 0 +- 20 deg
     8 v-stripes     the same                                          theta: 90 +- 20 deg
     9 checker       max(|u|, |v|) <= 0.85 and sin(pi f u) sin(pi f v) > 0   theta: any
   f (stripe and checker frequency) is uniform in 2.5..3.5 half-periods per unit, phase uniform.
   Pixels are tested at their centres (no anti-aliasing): a small shape is jagged, which is part
   of what makes disk vs square vs frame hard at small r.
5. One more random segment drawn over the shape with probability 1/2 (occlusion).
6. Noise: i.i.d. Gaussian, sd 0.08, per pixel and channel, then clipped to [0, 1].

Splits: the last `test_fraction` of the images (rounded to whole rounds of 10 classes) is the test
split, the `val_fraction` before it validation, the rest training; every split holds each class
equally often and no image is in two splits. Images are kept as uint8 (7000 images = 21 MB) and
returned as float32 [B, 3, 32, 32], standardised per channel with the training split's mean and
standard deviation (the usual CIFAR-style input normalisation; without it the reference CNN spends
its first ~100 steps on a plateau). Generating 7000 takes 1-2 s of one core; the set is built
once per process and cached in memory.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

from pydantic import Field

from dist_train.config.options import Options
from dist_train.data.base import DatasetSpec, DataInfo, InMemoryDataset, Split

NUM_CLASSES = 10
SIZE = 32
CLASS_NAMES = ("disk", "ring", "square", "frame", "triangle", "plus", "x-cross", "h-stripes", "v-stripes",
               "checker")
NOISE_SD = 0.08
_CHUNK = 500  # images rasterised at once: bounds the float64 work arrays to a few MB


def _segments(rng: np.random.RandomState, n: int) -> dict[str, np.ndarray]:
    """Parameters of one random line segment per image."""
    return {"x0": rng.uniform(0, SIZE, n), "y0": rng.uniform(0, SIZE, n), "angle": rng.uniform(0, np.pi, n),
            "length": rng.uniform(4, 12, n), "color": rng.uniform(0, 1, (n, 3))}


def _segment_mask(seg: dict[str, np.ndarray], sl: slice, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """[n, 32, 32] bool: pixels within 0.6 px of the segment (about 1 px wide)."""
    x0, y0 = _col(seg["x0"][sl]), _col(seg["y0"][sl])
    dx, dy = _col(np.cos(seg["angle"][sl])), _col(np.sin(seg["angle"][sl]))
    ox, oy = px - x0, py - y0
    t = np.clip(ox * dx + oy * dy, 0, _col(seg["length"][sl]))
    ox -= t * dx
    oy -= t * dy
    return ox * ox + oy * oy <= 0.36


def _col(a: np.ndarray) -> np.ndarray:
    """[n] -> [n, 1, 1] float32, to broadcast against a [32, 32] pixel grid."""
    return a.astype(np.float32)[:, None, None]


def _shape_mask(c: int, u: np.ndarray, v: np.ndarray, freq: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """[n, 32, 32] bool: the pixels covered by a class-`c` shape, in each image's own frame (u, v)."""
    au, av = np.abs(u), np.abs(v)
    if c in (0, 1, 7, 8):
        radius = np.sqrt(u * u + v * v)
        if c == 0:
            return radius <= 1
        if c == 1:
            return (radius >= 0.55) & (radius <= 1)
        return (radius <= 1) & (np.sin(np.pi * _col(freq) * v + _col(phase)) > 0)
    if c in (2, 3, 9):
        box = np.maximum(au, av)
        if c == 2:
            return box <= 0.8
        if c == 3:
            return (box >= 0.45) & (box <= 0.8)
        f = _col(freq)
        return (box <= 0.85) & (np.sin(np.pi * f * u) * np.sin(np.pi * f * v) > 0)
    if c == 4:
        return (v >= -0.5) & (v <= 1 - np.sqrt(3) * au)
    return ((au <= 1) & (av <= 0.22)) | ((av <= 1) & (au <= 0.22))  # 5 plus, 6 x-cross (turned)


def _paint(img: np.ndarray, mask: np.ndarray, color: np.ndarray) -> None:
    """img [n, 32, 32, 3] takes `color` [n, 3] where mask [n, 32, 32] is set (in place)."""
    np.copyto(img, color.astype(np.float32)[:, None, None, :], where=mask[..., None])


def generate_shapes32(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` images uint8 [count, 3, 32, 32] and labels int64 [count]; image i has class i mod 10.

    A pure function of (count, seed); see the module docstring for how an image is drawn.
    """
    rng = np.random.RandomState(seed)
    label = np.arange(count) % NUM_CLASSES
    # All random parameters first, in a fixed order, so the stream never depends on chunking.
    fg = rng.uniform(0.55, 1, (count, 3))
    bg_a, bg_b = rng.uniform(0, 0.45, (count, 3)), rng.uniform(0, 0.45, (count, 3))
    grad_angle = rng.uniform(0, 2 * np.pi, count)
    clutter = [_segments(rng, count) for _ in range(3)]
    cx, cy = rng.uniform(6, 26, count), rng.uniform(6, 26, count)
    scale = rng.uniform(6.5, 11, count)
    theta = rng.uniform(0, 2 * np.pi, count)
    jitter = rng.uniform(-1, 1, count)
    # Oriented classes: the angle is the class's, give or take a little.
    theta = np.where(label == 5, np.deg2rad(15) * jitter, theta)
    theta = np.where(label == 6, np.deg2rad(45 + 15 * jitter), theta)
    theta = np.where(label == 7, np.deg2rad(20) * jitter, theta)
    theta = np.where(label == 8, np.deg2rad(90 + 20 * jitter), theta)
    freq = rng.uniform(2.5, 3.5, count)
    phase = rng.uniform(0, 2 * np.pi, count)
    front = _segments(rng, count)
    front_on = rng.uniform(0, 1, count) < 0.5
    noise_rng = np.random.RandomState(rng.randint(0, 2**31 - 1))

    py, px = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + np.float32(0.5)  # pixel centres
    out = np.empty((count, SIZE, SIZE, 3), dtype=np.uint8)
    for start in range(0, count, _CHUNK):
        sl = slice(start, min(count, start + _CHUNK))
        n = sl.stop - sl.start
        # 2. background gradient: position along a random direction, scaled to 0..1 over the image
        g = (px - SIZE / 2) * _col(np.cos(grad_angle[sl])) + (py - SIZE / 2) * _col(np.sin(grad_angle[sl]))
        g = (g / SIZE + 0.5).clip(0, 1)[..., None]
        img = bg_a[sl, None, None, :].astype(np.float32) * (1 - g) + bg_b[sl, None, None, :].astype(np.float32) * g
        # 3. clutter behind the shape
        for seg in clutter:
            _paint(img, _segment_mask(seg, sl, px, py), seg["color"][sl])
        # 4. the shape, in its own frame; each class's mask computed for its own images only
        dx, dy = px - _col(cx[sl]), py - _col(cy[sl])
        c, s = _col(np.cos(theta[sl])), _col(np.sin(theta[sl]))
        u = (c * dx + s * dy) / _col(scale[sl])
        v = (-s * dx + c * dy) / _col(scale[sl])
        mask = np.empty((n, SIZE, SIZE), dtype=bool)
        for k in range(NUM_CLASSES):
            rows = np.flatnonzero(label[sl] == k)
            mask[rows] = _shape_mask(k, u[rows], v[rows], freq[sl][rows], phase[sl][rows])
        _paint(img, mask, fg[sl])
        # 5. an occluding segment on half of the images
        _paint(img, _segment_mask(front, sl, px, py) & front_on[sl, None, None], front["color"][sl])
        # 6. noise
        img += noise_rng.standard_normal((n, SIZE, SIZE, 3)).astype(np.float32) * np.float32(NOISE_SD)
        out[sl] = np.rint(img.clip(0, 1) * 255)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)), label.astype(np.int64)


def split_counts(count: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) sizes in whole rounds of the 10 classes, so every split is balanced."""
    rounds = count // NUM_CLASSES
    n_test = round(rounds * test_fraction)
    n_val = round(rounds * val_fraction)
    if test_fraction > 0:
        n_test = max(1, n_test)
    n_val = max(1, n_val)
    n_train = rounds - n_val - n_test
    if n_train < 1:
        from dist_train.errors import UserError

        raise UserError(f"data.num_examples: {count} images leave no training split after "
                        f"val_fraction={val_fraction} and test_fraction={test_fraction}")
    return n_train * NUM_CLASSES, n_val * NUM_CLASSES, n_test * NUM_CLASSES


@functools.lru_cache(maxsize=2)
def _cached(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = generate_shapes32(count, seed)
    return torch.from_numpy(images), torch.from_numpy(labels)


class Shapes32Dataset(InMemoryDataset):
    """Images float32 [3,32,32] (standardised) and int64 labels 0..9; train / val / test as the module says."""

    def __init__(self, count: int, seed: int, val_fraction: float, test_fraction: float):
        images, labels = _cached(count, seed)
        n_train, n_val, n_test = split_counts(count, val_fraction, test_fraction)
        # Test is the tail, val just before it; images beyond the last whole round are unused.
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
                  "test": (n_train + n_val, n_train + n_val + n_test)}
        self.ids = {k: torch.arange(a, b) for k, (a, b) in bounds.items()}
        self._splits = {k: (images[a:b], labels[a:b]) for k, (a, b) in bounds.items()}
        train = images[:n_train].float().div_(255.0)
        self.mean = train.mean(dim=(0, 2, 3)).view(1, 3, 1, 1)
        self.std = train.std(dim=(0, 2, 3)).view(1, 3, 1, 1)
        self.info = DataInfo(task="classify", vocab_size=None, input_shape=(3, SIZE, SIZE),
                             num_classes=NUM_CLASSES, train_size=n_train, val_size=n_val, test_size=n_test,
                             image_norm=(tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist())))

    def get_batch(self, split: Split, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = super().get_batch(split, indices)  # uint8: normalised per batch, 4x less memory
        return (images.float().div_(255.0) - self.mean) / self.std, labels


class Shapes32Options(Options):
    num_examples: Optional[int] = Field(None, ge=20, description="Images generated in all (train + val + test); default 7000.")
    seed: int = Field(0, description="Seed the images are generated from (fixed apart from train.seed).")


class Shapes32(DatasetSpec):
    """`data.name: shapes32`: generated 32x32 RGB shapes in 10 classes (no download)."""

    task = "classify"
    options = Shapes32Options

    @classmethod
    def build(cls, cfg_data, block_size: int) -> Shapes32Dataset:
        own = cfg_data.options()
        test = cfg_data.test_fraction
        return Shapes32Dataset(own.num_examples or 7000, own.seed, cfg_data.val_fraction, 0.1 if test is None else test)
