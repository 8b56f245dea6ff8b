"""A byte-level corpus made of the running interpreter's standard library source: always
present, no download, and a few MB of real, structured text."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np

from pydantic import Field

from dist_train.config.options import Options
from dist_train.data.base import DatasetSpec
from dist_train.data.tokens import TokenDataset
from dist_train.errors import UserError

# Third-party code varies between installs; excluding it keeps the corpus a function of the
# Python version only. __pycache__ holds no .py files, pruning it just saves the walk.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """All stdlib `*.py` files under `root`, sorted by relative POSIX path (walk order is not)."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]  # prune: site-packages is huge
        rel_dir = Path(dirpath).relative_to(base)
        rels.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
    return [base / r for r in sorted(rels)]


def load_stdlib_bytes(max_bytes: int, root: str | os.PathLike | None = None) -> np.ndarray:
    """Concatenated stdlib source as uint8, truncated at `max_bytes`.

    Not cached on disk: reading ~4 MB of files takes well under a second, cheaper than any cache
    invalidation logic would be to get right.
    """
    files = stdlib_files(root)
    if not files:
        where = root if root is not None else sysconfig.get_paths()["stdlib"]
        raise UserError(f"data.name: stdlib_bytes found no .py files under {where}")
    buf = bytearray()
    for path in files:
        with open(path, "rb") as fh:
            buf += fh.read(max_bytes - len(buf))
        if len(buf) >= max_bytes:
            break
    return np.frombuffer(bytes(buf), dtype=np.uint8)


# Validation chunks are spread through the corpus: a contiguous tail would be a few packages only
# (sorted order ends in xml/, zipfile/, ...) and measure a different distribution from training.
_CHUNK = 16 * 1024


def split_interleaved(data: np.ndarray, val_fraction: float, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Chunk `i` goes to val when round((i+1)f) > round(i f): an even val_fraction spread.

    Chunks are 16 KiB, smaller for small corpora so there are always at least 50 of them.
    """
    train, val, _ = split_interleaved3(data, val_fraction, 0.0, chunk)
    return train, val


def split_interleaved3(data: np.ndarray, val_fraction: float, test_fraction: float,
                       chunk: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / val / test: chunk `i` is held out when round((i+1)h) > round(i h), h = val + test
    fraction; held-out chunk `j` goes to test when round((j+1)t) > round(j t), t = test / h. With
    test_fraction 0 this is exactly `split_interleaved`."""
    chunk = chunk or max(256, min(_CHUNK, len(data) // 50))
    n_chunks = -(-len(data) // chunk)
    held = val_fraction + test_fraction
    share = test_fraction / held
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    j = 0
    for i in range(n_chunks):
        piece = data[i * chunk:(i + 1) * chunk]
        if int((i + 1) * held + 0.5) > int(i * held + 0.5):
            parts["test" if int((j + 1) * share + 0.5) > int(j * share + 0.5) else "val"].append(piece)
            j += 1
        else:
            parts["train"].append(piece)
    empty = np.zeros(0, dtype=data.dtype)
    train, val, test = ((np.concatenate(p) if p else empty) for p in parts.values())
    return train, val, test


def build_stdlib_bytes(max_bytes: int, val_fraction: float, block_size: int,
                       root: str | os.PathLike | None = None, test_fraction: float = 0.0) -> TokenDataset:
    """Train / val (/ test) = interleaved 16 KiB chunks of the corpus (val_fraction of them to val,
    test_fraction to test). vocab 256."""
    data = load_stdlib_bytes(max_bytes, root)
    train, val, test = split_interleaved3(data, val_fraction, test_fraction)
    return TokenDataset(train, val, vocab_size=256, block_size=block_size, source="data.max_bytes",
                        test=test if test_fraction > 0 else None)


class StdlibBytesOptions(Options):
    max_bytes: int = Field(4_000_000, ge=1024, description="Cap on corpus size in bytes (files taken in sorted order).")


class StdlibBytes(DatasetSpec):
    """`data.name: stdlib_bytes`: the bytes of this Python's standard-library source (no download)."""

    task = "lm"
    options = StdlibBytesOptions

    @classmethod
    def build(cls, cfg_data, block_size: int) -> TokenDataset:
        return build_stdlib_bytes(cfg_data.options().max_bytes, cfg_data.val_fraction, block_size,
                                  test_fraction=cfg_data.test_fraction or 0.0)
