"""Next-token prediction on a token corpus (stdlib_bytes, token_bin) with a decoder (the GPT, ...)."""

from __future__ import annotations

import torch

from dist_train.tasks.base import Task


class LanguageModelling(Task):
    name = "lm"
    generates_text = True

    def num_outputs(self, info) -> int:
        return info.vocab_size

    def tokens_per_sample(self, cfg) -> int:
        return cfg.model.block_size

    def example_input(self, cfg, info, batch, device="meta"):
        return torch.zeros(batch, cfg.model.block_size, dtype=torch.long, device=device)
