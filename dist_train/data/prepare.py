"""`dist-train prepare-data`: local text files -> llm.c token shards that `data.name: token_bin` reads.

The text is cut into pieces between lines, where the tokenizer's pre-tokenization splits anyway
(so a file's ids do not depend on the cuts); each piece goes to train or val by an even
interleaving (piece i is val when round((i+1) f) > round(i f), f = --val-fraction), so val is spread
through the corpus rather than being its last files. Pieces are encoded in batches (`encode_batch`
runs on all cores in the tokenizer's own threads) with a Hugging Face tokenizer: a tokenizer.json
loaded offline, or a byte-level BPE trained here on the train pieces. Each file starts with the
tokenizer's end-of-text token when it has one, as llm.c's shards start each document. Shards are
`train_000000.bin`, ... and `val_000000.bin`, ...: `data.path: DIR/train_*.bin` finds the val shards
beside them, and `tokenizer.json` and `meta.json` (vocabulary, dtype, counts) too.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from dist_train.data.token_bin import HEADER_BYTES, META_FILE, TOKENIZER_FILE, UINT16_VOCAB, llmc_header_bytes
from dist_train.errors import UserError

# The token put before each document, in order of preference: GPT-2's end-of-text, else a
# beginning-of-text (Llama 3's, as llm.c's Llama 3 shards; SentencePiece models'), else an end.
EOT_TOKENS = ("<|endoftext|>", "<|begin_of_text|>", "<s>", "<|end_of_text|>", "</s>")
BPE_EOT = "<|endoftext|>"
_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn"}
_SNIFF = 8192  # bytes read to tell text from binary
_BATCH_CHARS = 4 << 20  # characters per encode_batch call: large enough to keep every core busy


@dataclass
class Piece:
    text: str
    doc_start: bool  # first piece of a file: preceded by the end-of-text token
    nbytes: int  # of the file it came from, for the progress bar


def collect_files(inputs: list[str]) -> list[Path]:
    """Files named by `inputs`: files, folders (every file below, recursively) or globs; each
    sorted, in the order given, each file once."""
    files: list[Path] = []
    for item in inputs:
        expanded = os.path.expanduser(item)
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        if not matches:
            raise UserError(f"prepare-data: no file matches {item!r}")
        for m in map(Path, matches):
            if m.is_dir():
                for dirpath, dirnames, filenames in os.walk(m):
                    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
                    files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
            elif m.is_file():
                files.append(m)
            else:
                raise UserError(f"prepare-data: no such file or folder: {item}")
    seen: set[Path] = set()
    return [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]


def is_text(path: Path) -> bool:
    """UTF-8 text without NUL bytes in its first 8 KiB (a multi-byte character cut at the end is fine)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _clean_cut(before: str, after: str) -> bool:
    """A cut between lines `before` and `after` that pre-tokenization makes anyway: `before` ends
    in one bare newline after a non-space, `after` starts with a non-space. GPT-2's and Llama 3's
    splitting patterns then put the newline in a piece of its own, or at the end of the piece
    before it, whether the text is encoded whole or cut there."""
    return (before.endswith("\n") and len(before) >= 2 and not before[-2].isspace()
            and after[:1] != "" and not after[0].isspace())


def iter_pieces(files: list[Path], piece_chars: int) -> Iterator[Piece]:
    """The files' text in pieces of about `piece_chars` characters or more, cut between lines only
    where `_clean_cut` allows, so the pieces encode to the ids the whole file would. Undecodable
    bytes after the sniffed head become U+FFFD."""
    for path in files:
        nbytes, first, buf, size = path.stat().st_size, True, [], 0
        with open(path, encoding="utf-8", errors="replace", newline="") as fh:
            for line in fh:
                if size >= piece_chars and _clean_cut(buf[-1], line):
                    yield Piece("".join(buf), first, nbytes if first else 0)
                    first, buf, size = False, [], 0
                buf.append(line)
                size += len(line)
        if buf:
            yield Piece("".join(buf), first, nbytes if first else 0)


def is_val(i: int, val_fraction: float) -> bool:
    return int((i + 1) * val_fraction + 0.5) > int(i * val_fraction + 0.5)


class ShardWriter:
    """`{split}_{k:06d}.bin` files of at most `shard_tokens` tokens each, written as they fill (the
    header's count is written when a shard closes), so memory stays bounded."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.paths: list[Path] = []
        self.total = 0
        self._fh = None
        self._count = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._fh is None:
                path = self.out / f"{self.split}_{len(self.paths):06d}.bin"
                self.paths.append(path)
                self._fh = open(path, "wb")
                self._fh.write(b"\0" * HEADER_BYTES)
                self._count = 0
            take = ids[:self.shard_tokens - self._count]
            self._fh.write(take.astype(self.dtype).tobytes())
            self._count += len(take)
            self.total += len(take)
            ids = ids[len(take):]
            if self._count == self.shard_tokens:
                self._close()

    def _close(self) -> None:
        self._fh.seek(0)
        self._fh.write(llmc_header_bytes(self._count, self.dtype))
        self._fh.close()
        self._fh = None

    def close(self) -> None:
        if self._fh is not None:
            self._close()


def load_tokenizer(spec: str):
    """A tokenizer.json on this machine; a hub name or URL is refused (prepare-data never downloads)."""
    from tokenizers import Tokenizer

    path = Path(os.path.expanduser(spec))
    if not path.exists():
        remote = "://" in spec or (not spec.endswith(".json") and spec.count("/") <= 1)
        if remote:
            raise UserError(f"--tokenizer: {spec} is not a local file, and prepare-data never downloads: save the "
                            f"tokenizer.json where there is network (tokenizer.save(path)) and pass its path")
        raise UserError(f"--tokenizer: file not found: {path}")
    if path.is_dir():
        if not (path / TOKENIZER_FILE).is_file():
            raise UserError(f"--tokenizer: {path} is a folder without a {TOKENIZER_FILE}")
        path = path / TOKENIZER_FILE
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for a malformed file
        raise UserError(f"--tokenizer: {path} is not a readable tokenizer.json ({str(e).splitlines()[0]})") from None


def train_bpe(texts: Iterator[str], vocab_size: int, progress: bool = False):
    """A byte-level BPE (GPT-2's scheme: bytes mapped to printable characters, then merges) of
    `vocab_size` ids, the end-of-text token included; fewer when the text runs out of merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOT], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def _check_options(tokenizer, train_bpe_vocab, val_fraction, shard_tokens, dtype, out) -> Path:
    """The command line's own mistakes, before any text is read; returns the output folder."""
    if (tokenizer is None) == (train_bpe_vocab is None):
        raise UserError("prepare-data: give one of --tokenizer FILE or --train-bpe VOCAB")
    if train_bpe_vocab is not None and train_bpe_vocab <= 256:
        raise UserError(f"--train-bpe: a byte-level BPE needs more than 256 ids (256 bytes + end-of-text), "
                        f"got {train_bpe_vocab}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction: expected a number in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens: expected a positive number of tokens, got {shard_tokens}")
    if dtype not in ("auto", "uint16", "uint32"):
        raise UserError(f"--dtype: expected auto, uint16 or uint32, got {dtype}")
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise UserError("prepare-data needs the `tokenizers` package (pip install 'dist-train[hf]')") from None
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out: {out_dir} exists and is not a folder")
    if out_dir.is_dir() and (list(out_dir.glob("train_*.bin")) or list(out_dir.glob("val_*.bin"))):
        raise UserError(f"--out: {out_dir} already holds token shards; remove them or choose another folder")
    return out_dir


def _write_shards(tok, pieces: Iterator[tuple[int, Piece]], out_dir: Path, np_dtype, shard_tokens: int,
                  eot_id: Optional[int], val_fraction: float, total_bytes: int, show: bool) -> dict:
    """Encode `pieces` in batches into train / val shard writers; on any failure no shard is left."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {s: ShardWriter(out_dir, s, np_dtype, shard_tokens) for s in ("train", "val")}
    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing",
               disable=not show)
    try:
        batch: list[tuple[int, Piece]] = []
        size = 0
        for i, piece in pieces:
            batch.append((i, piece))
            size += len(piece.text)
            if size >= _BATCH_CHARS:
                _encode(tok, batch, writers, eot_id, val_fraction, bar)
                batch, size = [], 0
        _encode(tok, batch, writers, eot_id, val_fraction, bar)
        if writers["train"].total == 0:
            raise UserError("prepare-data: the text encoded to no training tokens")
        if val_fraction > 0 and writers["val"].total == 0:
            raise UserError(f"--val-fraction {val_fraction}: the text is too short to hold out a validation "
                            f"split; add text or pass --val-fraction 0")
    except BaseException:
        for w in writers.values():  # no partial shard set left behind to be mistaken for data
            w.close()
            for path in w.paths:
                path.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
        for w in writers.values():
            w.close()

    return writers


def prepare_data(inputs: list[str], out: str, tokenizer: Optional[str] = None, train_bpe_vocab: Optional[int] = None,
                 val_fraction: float = 0.1, shard_tokens: int = 100_000_000, dtype: str = "auto",
                 progress: Optional[bool] = None) -> dict:
    """Tokenize the text files `inputs` into llm.c shards in `out`; returns what meta.json holds."""
    out_dir = _check_options(tokenizer, train_bpe_vocab, val_fraction, shard_tokens, dtype, out)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None  # bad tokenizer: fail before reading text

    all_files = collect_files(inputs)
    files = [f for f in all_files if is_text(f)]
    total_bytes = sum(f.stat().st_size for f in files)
    if total_bytes == 0:
        raise UserError(f"prepare-data: no text found in {' '.join(inputs)} "
                        f"({len(all_files)} files, none non-empty UTF-8 text)")
    # At least ~200 pieces, so the val interleaving is even, and at most 1 MiB each.
    piece_chars = int(min(1 << 20, max(1024, total_bytes // 200)))

    def pieces() -> Iterator[tuple[int, Piece]]:
        return enumerate(iter_pieces(files, piece_chars))

    show = sys.stderr.isatty() if progress is None else progress
    if tok is None:
        tok = train_bpe((p.text for i, p in pieces() if not is_val(i, val_fraction)), train_bpe_vocab, show)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if dtype == "auto":
        dtype = "uint16" if vocab <= UINT16_VOCAB else "uint32"
    elif dtype == "uint16" and vocab > UINT16_VOCAB:
        raise UserError(f"--dtype uint16: the tokenizer has {vocab} ids, more than uint16 holds (65,536)")
    np_dtype = np.dtype(dtype).newbyteorder("<")
    eot = next((t for t in EOT_TOKENS if tok.token_to_id(t) is not None), None)
    eot_id = tok.token_to_id(eot) if eot is not None else None

    # A document that contains the text "<|endoftext|>" is encoded as that text, not as a boundary.
    tok.encode_special_tokens = True
    writers = _write_shards(tok, pieces(), out_dir, np_dtype, shard_tokens, eot_id, val_fraction, total_bytes, show)
    tok.encode_special_tokens = False
    tok.save(str(out_dir / TOKENIZER_FILE))
    meta = {
        "format": "llm.c",
        "vocab_size": vocab,
        "dtype": dtype,
        "eot": eot,
        "eot_id": eot_id,
        "tokenizer": TOKENIZER_FILE,
        "train_tokens": writers["train"].total,
        "val_tokens": writers["val"].total,
        "train_shards": [p.name for p in writers["train"].paths],
        "val_shards": [p.name for p in writers["val"].paths],
        "text_files": len(files),
        "skipped_files": len(all_files) - len(files),
        "text_bytes": total_bytes,
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _encode(tok, batch: list[tuple[int, Piece]], writers: dict[str, ShardWriter], eot_id: Optional[int],
            val_fraction: float, bar) -> None:
    if not batch:
        return
    encodings = tok.encode_batch([p.text for _, p in batch], add_special_tokens=False)
    for (i, piece), enc in zip(batch, encodings):
        ids = enc.ids
        if piece.doc_start and eot_id is not None:
            ids = [eot_id, *ids]
        writers["val" if is_val(i, val_fraction) else "train"].write(np.asarray(ids, dtype=np.int64))
        bar.update(piece.nbytes)
