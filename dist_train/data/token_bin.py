"""uint16 token files as written by nanoGPT (bare array) and llm.c (1 KiB header + array)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pydantic import Field

from dist_train.config.options import Options
from dist_train.data.base import DatasetSpec
from dist_train.data.tokens import TokenDataset
from dist_train.errors import UserError

LLMC_MAGIC = 20240520
LLMC_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
_SCAN_CHUNK = 1 << 24  # tokens per chunk when scanning for the max id (bounded memory)


def open_token_bin(path: str | os.PathLike, key: str = "data.path") -> np.ndarray:
    """Read-only uint16 memmap of the tokens in `path`, with or without an llm.c header.

    The format is detected by the magic number: a nanoGPT file of GPT-2 tokens cannot start
    with it (it would decode as token 54488 > the GPT-2 vocabulary).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{key}: file not found: {p}")
    size = p.stat().st_size
    header = np.fromfile(p, dtype="<i4", count=HEADER_INTS) if size >= HEADER_BYTES else None
    if header is not None and header[0] == LLMC_MAGIC:
        if header[1] != LLMC_VERSION:
            raise UserError(f"{key}: {p}: llm.c token file version {header[1]} is not supported "
                            f"(only version {LLMC_VERSION}, uint16 tokens)")
        count = int(header[2])
        if count < 0 or HEADER_BYTES + 2 * count > size:
            raise UserError(f"{key}: {p}: header claims {count} tokens but the file holds "
                            f"{(size - HEADER_BYTES) // 2}; truncated file?")
        offset = HEADER_BYTES
    else:
        if size % 2:
            raise UserError(f"{key}: {p}: odd file size {size}; not a uint16 token file")
        count, offset = size // 2, 0
    if count == 0:
        raise UserError(f"{key}: {p}: file holds no tokens")
    tokens = np.memmap(p, dtype="<u2", mode="r", offset=offset, shape=(count,))
    _check_16_bit(tokens, f"{key}: {p}")
    return tokens


def _check_16_bit(tokens: np.ndarray, where: str) -> None:
    """Refuse a file of 32-bit values (int32/uint32/float32 tokens) read as uint16.

    Small 32-bit values have one all-zero 16-bit half: every second uint16 is 0. Real token streams
    never are (id 0 at every other position), so a head of 8192 tokens decides.
    """
    head = np.asarray(tokens[:8192])
    if len(head) >= 16 and len(head) % 2 == 0:
        even, odd = head[0::2], head[1::2]
        if (not odd.any() and even.any()) or (not even.any() and odd.any()):
            raise UserError(f"{where}: every second uint16 is 0: this looks like 32-bit values (int32, uint32 or "
                            f"float32), not uint16 tokens")


def max_token(tokens: np.ndarray) -> int:
    """Largest token id, scanned in chunks so a multi-GB memmap is never fully resident."""
    return max(int(tokens[i:i + _SCAN_CHUNK].max()) for i in range(0, len(tokens), _SCAN_CHUNK))


def build_token_bin(path: str, val_path: Optional[str], vocab_size: Optional[int],
                    val_fraction: float, block_size: int) -> TokenDataset:
    """Train from `path`; val from `val_path` or else the last val_fraction of `path`."""
    data = open_token_bin(path, "data.path")
    if val_path:
        train, val = data, open_token_bin(val_path, "data.val_path")
    else:
        n_train = int(len(data) * (1.0 - val_fraction))
        train, val = data[:n_train], data[n_train:]
    largest = max(max_token(train), max_token(val))
    if vocab_size is None:
        vocab_size = largest + 1
    elif largest >= vocab_size:
        raise UserError(f"data.vocab_size: the data holds token id {largest}, outside a vocabulary of {vocab_size} "
                        f"(a wrong vocab_size, or a file of another dtype)")
    return TokenDataset(train, val, vocab_size=vocab_size, block_size=block_size, source="data.path")


def write_token_bin(path: str | os.PathLike, tokens: Sequence[int] | np.ndarray, llmc_header: bool = False) -> None:
    """Write tokens as a nanoGPT bare uint16 file, or with an llm.c v1 header."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError("tokens must be one-dimensional")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.uint16).max):
        raise ValueError("token ids must fit in uint16 (0..65535)")
    arr = arr.astype("<u2")
    with open(path, "wb") as fh:
        if llmc_header:
            header = np.zeros(HEADER_INTS, dtype="<i4")
            header[:3] = (LLMC_MAGIC, LLMC_VERSION, arr.size)
            fh.write(header.tobytes())
        fh.write(arr.tobytes())


class TokenBinOptions(Options):
    path: str = Field(description="Path of the training .bin file (nanoGPT/llm.c uint16 format).")
    val_path: Optional[str] = Field(None, description="Validation .bin file; default: the last val_fraction of `path`.")
    vocab_size: Optional[int] = Field(None, ge=2, description="Vocabulary size; default: max token id + 1 (scanned).")


class TokenBin(DatasetSpec):
    """`data.name: token_bin`: pre-tokenized uint16 token files (nanoGPT's bare array or llm.c's)."""

    task = "lm"
    options = TokenBinOptions

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.data.test_fraction:
            raise ValueError("data.test_fraction: token_bin has no test split (hold one out in its own .bin file)")

    @classmethod
    def build(cls, cfg_data, block_size: int) -> TokenDataset:
        own = cfg_data.options()
        return build_token_bin(own.path, own.val_path, own.vocab_size, cfg_data.val_fraction, block_size)
