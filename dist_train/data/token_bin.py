"""Token files as written by nanoGPT (a bare uint16 array) and llm.c (a 1 KiB header, then uint16
or uint32 tokens), one file or many shards, with the tokenizer and vocabulary found beside them."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from pydantic import Field

from dist_train.config.options import Options
from dist_train.data.base import DatasetSpec
from dist_train.data.tokens import TokenDataset
from dist_train.errors import UserError

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# llm.c's headers: (magic, version) -> token dtype. GPT-2 files hold uint16 ids; its Llama 3 files,
# whose vocabulary of 128,256 does not fit 16 bits, hold uint32 ids.
LLMC_MAGIC, LLMC_VERSION = 20240520, 1
LLMC_MAGIC_U32, LLMC_VERSION_U32 = 20240801, 7
LLMC_FORMATS = {(LLMC_MAGIC, LLMC_VERSION): np.dtype("<u2"), (LLMC_MAGIC_U32, LLMC_VERSION_U32): np.dtype("<u4")}
_SCAN_CHUNK = 1 << 24  # tokens per chunk when scanning for the max id (bounded memory)
UINT16_VOCAB = 1 << 16
META_FILE = "meta.json"  # written by `dist-train prepare-data` beside its shards
TOKENIZER_FILE = "tokenizer.json"


def open_token_bin(path: str | os.PathLike, key: str = "data.path") -> np.ndarray:
    """Read-only memmap of the tokens in `path`: uint16 or uint32 as an llm.c header says, uint16
    without one.

    The format is detected by the magic number: a nanoGPT file of GPT-2 tokens cannot start with
    either (the first would decode as token 54488 > the GPT-2 vocabulary).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{key}: file not found: {p}")
    size = p.stat().st_size
    header = np.fromfile(p, dtype="<i4", count=HEADER_INTS) if size >= HEADER_BYTES else None
    if header is not None and int(header[0]) in (LLMC_MAGIC, LLMC_MAGIC_U32):
        dtype = LLMC_FORMATS.get((int(header[0]), int(header[1])))
        if dtype is None:
            known = ", ".join(f"magic {m} version {v}" for m, v in LLMC_FORMATS)
            raise UserError(f"{key}: {p}: llm.c token file magic {header[0]} version {header[1]} is not supported "
                            f"(known: {known})")
        count = int(header[2])
        if count < 0 or HEADER_BYTES + dtype.itemsize * count > size:
            raise UserError(f"{key}: {p}: header claims {count} tokens but the file holds "
                            f"{(size - HEADER_BYTES) // dtype.itemsize}; truncated file?")
        offset = HEADER_BYTES
    else:
        dtype = np.dtype("<u2")
        if size % 2:
            raise UserError(f"{key}: {p}: odd file size {size}; not a uint16 token file")
        count, offset = size // 2, 0
    if count == 0:
        raise UserError(f"{key}: {p}: file holds no tokens")
    tokens = np.memmap(p, dtype=dtype, mode="r", offset=offset, shape=(count,))
    if dtype.itemsize == 2:
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


def write_token_bin(path: str | os.PathLike, tokens: Sequence[int] | np.ndarray, llmc_header: bool = False,
                    dtype: str = "uint16") -> None:
    """Write tokens as a nanoGPT bare uint16 file, or with an llm.c header (uint16: GPT-2's
    20240520 v1; uint32: Llama 3's 20240801 v7). A bare file is always uint16: nothing in it says
    otherwise."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError("tokens must be one-dimensional")
    np_dtype = np.dtype(dtype).newbyteorder("<")
    if np_dtype.kind != "u" or np_dtype.itemsize not in (2, 4):
        raise ValueError(f"dtype must be uint16 or uint32, got {dtype}")
    if np_dtype.itemsize == 4 and not llmc_header:
        raise ValueError("uint32 tokens need the llm.c header (a bare file is read as uint16)")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np_dtype).max):
        raise ValueError(f"token ids must fit in {dtype} (0..{np.iinfo(np_dtype).max})")
    with open(path, "wb") as fh:
        if llmc_header:
            fh.write(llmc_header_bytes(arr.size, np_dtype))
        fh.write(arr.astype(np_dtype).tobytes())


def llmc_header_bytes(count: int, dtype: np.dtype) -> bytes:
    """The 1 KiB llm.c header for `count` tokens of `dtype` (uint16 or uint32)."""
    (magic, version), = [k for k, v in LLMC_FORMATS.items() if v.itemsize == np.dtype(dtype).itemsize]
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (magic, version, count)
    return header.tobytes()


# ---- shards: globs, lists, the train/val pairing ------------------------------------------------

PathSpec = Union[str, list[str]]


def expand_paths(spec: PathSpec, key: str) -> list[Path]:
    """The files a `data.path`-style value names: a path, a glob, or a list of either; globs are
    sorted (shard numbers are zero-padded, so that is shard order), a list keeps its order."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise UserError(f"{key}: an empty list names no token files")
    files: list[Path] = []
    for item in items:
        pattern = os.path.expanduser(item)
        if glob.has_magic(pattern):
            matched = sorted(glob.glob(pattern))
            if not matched:
                raise UserError(f"{key}: no file matches {item!r} (`dist-train prepare-data` makes token shards "
                                f"from text files)")
            files.extend(Path(m) for m in matched)
        else:
            files.append(Path(pattern))
    return files


def val_sibling(spec: PathSpec) -> Optional[PathSpec]:
    """`spec` with `train` replaced by `val` in each file name (llm.c's fineweb_train_*.bin ->
    fineweb_val_*.bin, nanoGPT's train.bin -> val.bin), when every such sibling exists; else None."""
    items = [spec] if isinstance(spec, str) else list(spec)
    siblings = []
    for item in items:
        head, name = os.path.split(item)
        if "train" not in name:
            return None
        i = name.rfind("train")
        sibling = os.path.join(head, name[:i] + "val" + name[i + 5:])
        pattern = os.path.expanduser(sibling)
        if not (glob.glob(pattern) if glob.has_magic(pattern) else os.path.isfile(pattern)):
            return None
        siblings.append(sibling)
    return siblings[0] if isinstance(spec, str) else siblings


def split_tail(shards: list[np.ndarray], val_fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Train = the first 1 - val_fraction of the tokens of all shards in order, val = the rest (the
    shard holding the cut is split in two)."""
    total = sum(len(s) for s in shards)
    cut = int(total * (1.0 - val_fraction))
    train, val, seen = [], [], 0
    for s in shards:
        if seen + len(s) <= cut:
            train.append(s)
        elif seen >= cut:
            val.append(s)
        else:
            train.append(s[:cut - seen])
            val.append(s[cut - seen:])
        seen += len(s)
    return train, val


# ---- vocabulary and tokenizer beside the shards -------------------------------------------------

def read_meta(folder: Path) -> dict:
    path = folder / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"data.path: {path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"data.path: {path}: expected a JSON object")
    return meta


def tokenizer_vocab_size(path: Path, key: str) -> int:
    """Vocabulary size of a Hugging Face `tokenizer.json` (added tokens included)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError(f"{key}: reading {path} needs the `tokenizers` package "
                        f"(pip install 'dist-train[hf]')") from None
    try:
        return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # the Rust side raises a bare Exception for a malformed file
        raise UserError(f"{key}: {path} is not a readable tokenizer.json ({str(e).splitlines()[0]})") from None


def find_tokenizer(first_shard: Path, explicit: Optional[str]) -> Optional[Path]:
    """`data.tokenizer` when set (it must exist), else the tokenizer.json beside the first shard."""
    if explicit:
        p = Path(os.path.expanduser(explicit))
        if not p.is_file():
            raise UserError(f"data.tokenizer: file not found: {p}")
        return p
    beside = first_shard.parent / TOKENIZER_FILE
    return beside if beside.is_file() else None


def build_token_bin(path: PathSpec, val_path: Optional[PathSpec], vocab_size: Optional[int],
                    val_fraction: float, block_size: int, tokenizer: Optional[str] = None) -> TokenDataset:
    """Train from the shards `path` names; val from `val_path`, else the `train` -> `val` siblings
    of `path`, else the last val_fraction of the training tokens.

    The vocabulary is `vocab_size` when given, else meta.json's or the tokenizer's beside the shards,
    else the largest id + 1. Ids are scanned (chunked) either way: an id outside the vocabulary is
    bad input here rather than an index error inside an embedding.
    """
    train_files = expand_paths(path, "data.path")
    train = [open_token_bin(f, "data.path") for f in train_files]
    if val_path is None:
        val_path = val_sibling(path)
    if val_path is not None:
        val = [open_token_bin(f, "data.val_path") for f in expand_paths(val_path, "data.val_path")]
    else:
        train, val = split_tail(train, val_fraction)

    folder = train_files[0].parent
    meta = read_meta(folder)
    tok_path = find_tokenizer(train_files[0], tokenizer)
    source_vocab, source = None, None
    if isinstance(meta.get("vocab_size"), int):
        source_vocab, source = meta["vocab_size"], str(folder / META_FILE)
    elif tok_path is not None:
        source_vocab, source = tokenizer_vocab_size(tok_path, "data.tokenizer"), str(tok_path)
    if source_vocab is not None:
        if vocab_size is not None and vocab_size < source_vocab:
            raise UserError(f"data.vocab_size: {vocab_size} is smaller than the vocabulary of {source_vocab} "
                            f"that {source} gives the data")
        if source_vocab > UINT16_VOCAB:
            narrow = [f for f, a in zip(train_files, train) if a.dtype.itemsize == 2]
            if narrow:
                raise UserError(f"data.path: {narrow[0]} holds uint16 tokens but {source} gives a vocabulary of "
                                f"{source_vocab} (> 65,536): ids above 65,535 cannot be in it; write uint32 shards")

    largest = max(max_token(a) for a in [*train, *val] if len(a))
    limit = vocab_size or source_vocab
    if limit is None:
        limit = largest + 1
    elif largest >= limit:
        named = "data.vocab_size" if vocab_size else source
        raise UserError(f"data.path: the data holds token id {largest}, outside the vocabulary of {limit} "
                        f"({named}): a wrong vocabulary, or a file of another dtype")
    ds = TokenDataset(train, val, vocab_size=limit, block_size=block_size, source="data.path")
    ds.tokenizer_path = str(tok_path) if tok_path is not None else None
    dtypes = "/".join(sorted({f"uint{8 * a.dtype.itemsize}" for a in [*train, *val]}))
    origin = ("data.vocab_size" if vocab_size else Path(source).name if source_vocab is not None
              else "max id + 1")
    shards = f"{len(train_files)} train shard{'s' if len(train_files) > 1 else ''}"
    ds.plan_text = (f"{ds.info.train_size:,} train / {ds.info.val_size:,} val tokens ({shards}, {dtypes}), "
                    f"vocabulary {limit:,} ({origin})" + (f", tokenizer {tok_path}" if tok_path is not None else ""))
    return ds


class TokenBinOptions(Options):
    path: Union[str, list[str]] = Field(
        description="Training token files: a path, a glob (llm.c's `fineweb_train_*.bin`) or a list of either; "
                    "nanoGPT's bare uint16 array or llm.c's headered uint16/uint32 shards (the header decides). "
                    "Windows never cross a shard boundary.")
    val_path: Optional[Union[str, list[str]]] = Field(
        None, description="Validation token files (path, glob or list). Default: `path` with `train` replaced by "
                          "`val` in each file name when those files exist (fineweb_val_*.bin beside "
                          "fineweb_train_*.bin, val.bin beside train.bin), else the last val_fraction of the "
                          "training tokens.")
    vocab_size: Optional[int] = Field(
        None, ge=2, description="Vocabulary size; default: meta.json's or tokenizer.json's beside the first "
                                "shard (as `dist-train prepare-data` writes them), else max token id + 1 (scanned).")
    tokenizer: Optional[str] = Field(
        None, description="A Hugging Face tokenizer.json for these ids (decodes train.sample_tokens and encodes "
                          "its prompt); default: the tokenizer.json beside the first shard, if any.")


class TokenBin(DatasetSpec):
    """`data.name: token_bin`: pre-tokenized token files (nanoGPT's bare uint16 array, llm.c's
    headered uint16/uint32 shards, or `dist-train prepare-data`'s)."""

    task = "lm"
    options = TokenBinOptions

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.data.test_fraction:
            raise ValueError("data.test_fraction: token_bin has no test split (hold one out in its own .bin file)")

    @classmethod
    def plan_rows(cls, cfg, plan) -> None:
        plan.set("data", f"token_bin: {plan.data.plan_text}")

    @classmethod
    def build(cls, cfg_data, block_size: int) -> TokenDataset:
        own = cfg_data.options()
        return build_token_bin(own.path, own.val_path, own.vocab_size, cfg_data.val_fraction, block_size,
                               own.tokenizer)
