"""Turning a language model's logits into text: the prompt's ids, one sampled id, and decoding.

Pure functions shared by end-to-end generation (`train/generate.py`) and the local pipeline's
generation through its stages (`local/evaluate.py`), so both sample the same way.
"""

from __future__ import annotations

import torch


def prompt_ids(cfg, data) -> torch.Tensor:
    """The prompt as token ids: its UTF-8 bytes on a byte-level corpus, else the first val token."""
    if data.info.vocab_size == 256:
        return torch.tensor(list(cfg.train.sample_prompt.encode("utf-8")), dtype=torch.long)
    return data.get_batch("val", torch.tensor([0]))[0][0, :1]


def decode(ids: list[int], vocab_size: int) -> str:
    if vocab_size == 256:
        return bytes(ids).decode("utf-8", errors="replace")
    return " ".join(map(str, ids))  # no tokenizer for token_bin data: show the ids


def next_token(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """Sample one id from the last position's logits ([1, T, V]); on the CPU so all devices agree."""
    probs = torch.softmax(logits[0, -1].float().cpu() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)
