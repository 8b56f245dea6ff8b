"""Sampling text from a trained language model (end-to-end; the pipeline's version is in local/evaluate.py).

Every rank runs the same generation with the same generator, so FSDP/DeepSpeed collectives inside
forward see all ranks, and every rank ends with the same text; rank 0 writes it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dist_train.models.sampling import decode, next_token, prompt_ids


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
    return decode(ids[start:].tolist(), data)
