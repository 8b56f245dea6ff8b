"""Turning a language model's logits into text: the prompt's ids, one sampled id, and decoding.

Pure functions shared by end-to-end generation (`train/generate.py`) and the local pipeline's
generation through its stages (`local/evaluate.py`), so both sample the same way. A data set that
knows its tokenizer (`data.tokenizer_path`, a Hugging Face tokenizer.json) encodes the prompt and
decodes the sample with it; a byte-level corpus uses UTF-8; otherwise the ids are shown.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def _tokenizer_of(data) -> Optional[object]:
    path = getattr(data, "tokenizer_path", None)
    return _tokenizer(path) if path else None


def prompt_ids(cfg, data) -> torch.Tensor:
    """The prompt as token ids: the tokenizer's encoding, or its UTF-8 bytes on a byte-level corpus;
    else (or for a prompt that encodes to nothing) the first val token."""
    tok = _tokenizer_of(data)
    if tok is not None:
        ids = tok.encode(cfg.train.sample_prompt, add_special_tokens=False).ids
        if ids:
            return torch.tensor(ids, dtype=torch.long)
    elif data.info.vocab_size == 256:
        return torch.tensor(list(cfg.train.sample_prompt.encode("utf-8")), dtype=torch.long)
    return data.get_batch("val", torch.tensor([0]))[0][0, :1]


def decode(ids: list[int], data) -> str:
    """The sampled ids of `data`'s vocabulary as text (special tokens such as end-of-text kept, as
    they mark document boundaries)."""
    tok = _tokenizer_of(data)
    if tok is not None:
        return tok.decode(ids, skip_special_tokens=False)
    if data.info.vocab_size == 256:
        return bytes(ids).decode("utf-8", errors="replace")
    return " ".join(map(str, ids))  # no tokenizer known for these ids: show them


def next_token(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """Sample one id from the last position's logits ([1, T, V]); on the CPU so all devices agree."""
    probs = torch.softmax(logits[0, -1].float().cpu() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)
