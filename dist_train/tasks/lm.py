"""Next-token prediction on a token corpus (stdlib_bytes, token_bin) with the GPT."""

from __future__ import annotations

import torch

from dist_train.errors import UserError
from dist_train.tasks.base import Task


class LanguageModelling(Task):
    name = "lm"
    generates_text = True

    def build_model(self, cfg_model, info):
        from dist_train.models.gpt import GPT

        if cfg_model.name != "gpt" or info.vocab_size is None:
            raise UserError(f"model.name: {cfg_model.name} cannot read a token data set (use gpt)")
        return GPT(info.vocab_size, cfg_model.n_layer, cfg_model.width, cfg_model.n_head,
                   cfg_model.block_size, cfg_model.dropout)

    def num_outputs(self, info) -> int:
        return info.vocab_size

    def tokens_per_sample(self, cfg) -> int:
        return cfg.model.block_size

    def example_input(self, cfg, info, batch, device="meta"):
        return torch.zeros(batch, cfg.model.block_size, dtype=torch.long, device=device)
