"""Sampling text from a trained language model (end-to-end; the pipeline's version is in local_eval).

Every rank runs the same generation with the same generator, so FSDP/DeepSpeed collectives inside
forward see all ranks, and every rank ends with the same text; rank 0 writes it.
"""

from __future__ import annotations

from pathlib import Path

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


def write_sample(cfg, run_dir: Path, text: str) -> None:
    (run_dir / "sample.txt").write_text(cfg.train.sample_prompt + text)


@torch.no_grad()
def generate(cfg, ctx, data, backend) -> str:
    model = backend.model
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.train.seed)
    ids = prompt_ids(cfg, data)
    start = len(ids)
    for _ in range(cfg.train.sample_tokens):
        with backend.autocast():
            logits = model(ids[-cfg.model.block_size:].view(1, -1).to(ctx.device))
        ids = torch.cat([ids, next_token(logits, cfg.train.sample_temperature, gen)])
    model.train(was_training)
    return decode(ids[start:].tolist(), data.info.vocab_size)
