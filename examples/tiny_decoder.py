"""A model of one's own for dist-train: a small decoder-only transformer in one file.

`examples/tiny_decoder.yaml` trains it with `model.name: "examples.tiny_decoder:build"`; dist-train
imports this module (from the working directory, like `python -m`) and calls

    build(vocab_size=<the data set's vocabulary>, block_size=<model.block_size>, **model.options)

It follows the model protocol: `embed -> blocks (nn.ModuleList) -> head`, so FSDP shards it per
block, activation checkpointing wraps each block and local-learning stages cut between blocks (their
auxiliary heads read `width` and `local_kind`). It
has no `loss`, so training uses the default (mean cross-entropy of the logits against the next
tokens); `num_flops_per_token` gives the logs an MFU figure.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Embed(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, width: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(torch.zeros(block_size, width))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tokens(idx) + self.positions[: idx.size(1)]


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention and a ReLU MLP, each on a residual branch."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.out(y)
        return x + self.mlp(self.norm2(x))


class TinyDecoder(nn.Module):
    local_kind = "gpt"  # blocks output [B, T, width] token features: local methods' heads for those

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, width: int, heads: int):
        super().__init__()
        self.embed = Embed(vocab_size, block_size, width)
        self.blocks = nn.ModuleList(DecoderBlock(width, heads) for _ in range(n_layer))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, vocab_size))
        self.n_layer, self.width, self.block_size = n_layer, width, block_size

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def num_flops_per_token(self, seq_len: int | None = None) -> int:
        """6 x the matmul parameters (forward + backward) plus the attention scores' 12 x L x width x T."""
        t = seq_len or self.block_size
        matmul = sum(p.numel() for p in self.parameters()) - sum(p.numel() for p in self.embed.parameters())
        return 6 * matmul + 12 * self.n_layer * self.width * t


def build(vocab_size: int, block_size: int, n_layer: int = 2, width: int = 64, heads: int = 4) -> TinyDecoder:
    return TinyDecoder(vocab_size, block_size, n_layer, width, heads)
