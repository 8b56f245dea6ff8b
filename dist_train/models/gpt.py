"""A nanoGPT-style decoder-only transformer, laid out as embed -> blocks -> head.

The three top-level parts are independent modules (no weight tying) so that the model can be
cut into pipeline / local-learning stages and each `Block` sharded on its own. Parallelism is
applied from outside; nothing here knows about ranks or devices.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pydantic import Field, model_validator

from dist_train.config.options import Options
from dist_train.models.base import EmbedBlocksHead
from dist_train.models.spec import ModelSpec


class Embedding(nn.Module):
    """Token + learned position embedding, then dropout: int64 [B,T] -> [B,T,width]."""

    def __init__(self, vocab_size: int, width: int, block_size: int, dropout: float):
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(block_size, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        # Positions expanded to [B,T] (a view, no copy): the position table's gradient then has an
        # example dimension, which per-example clipping (DP-SGD) needs; the sum is unchanged.
        pos = torch.arange(t, device=idx.device).expand_as(idx)
        return self.drop(self.tok(idx) + self.pos(pos))


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention; SDPA picks the fused kernel available on the device."""

    def __init__(self, width: int, n_head: int, dropout: float):
        super().__init__()
        if width % n_head != 0:
            raise ValueError(f"n_head ({n_head}) must divide width ({width})")
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)  # residual projection (scaled init, see GPT)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # [B,T,C] -> [B,H,T,C/H]
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.proj(y))


class FeedForward(nn.Module):
    """Position-wise GELU MLP with the usual 4x expansion."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)  # residual projection (scaled init, see GPT)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, n_head, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final LayerNorm + projection to the vocabulary: [B,T,width] -> logits [B,T,V]."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


class GPT(EmbedBlocksHead):
    """Decoder-only language model. forward(idx [B,T] int64) -> logits [B,T,vocab_size]."""

    task = "lm"

    def __init__(self, vocab_size: int, n_layer: int, width: int, n_head: int,
                 block_size: int, dropout: float = 0.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.width = width
        self.n_head = n_head
        self.block_size = block_size
        self.embed = Embedding(vocab_size, width, block_size, dropout)
        self.blocks = nn.ModuleList(Block(width, n_head, dropout) for _ in range(n_layer))
        self.head = Head(width, vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nanoGPT / GPT-2 init: N(0, 0.02) everywhere, residual projections scaled down.

        Each block adds two residual branches; scaling their output projections by
        1/sqrt(2*n_layer) keeps the residual stream's variance independent of depth.
        """
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        resid_std = 0.02 / math.sqrt(2 * self.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=resid_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=resid_std)

    def num_flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as in nanoGPT / torchtitan MFU.

        6*N for the matmuls over the N non-embedding parameters (embedding lookups are not
        matmuls; the untied output head is, so it stays in N), plus 12*L*H*Q*T for the
        attention scores and weighted sum, which have no parameters.
        """
        t = seq_len if seq_len is not None else self.block_size
        n = sum(p.numel() for p in self.parameters()) - sum(p.numel() for p in self.embed.parameters())
        q = self.width // self.n_head
        return 6 * n + 12 * self.n_layer * self.n_head * q * t


class GPTOptions(Options):
    n_layer: int = Field(4, ge=1, description="Transformer blocks.")
    width: int = Field(128, ge=1, description="Embedding size.")
    n_head: int = Field(4, ge=1, description="Attention heads; must divide width.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability (embeddings, attention, MLP).")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.width % self.n_head != 0:
            raise ValueError(f"model.n_head ({self.n_head}) must divide model.width ({self.width})")
        return self


class GPTSpec(ModelSpec):
    """`model.name: gpt`: the byte-level GPT-2-style decoder above."""

    task = "lm"
    options = GPTOptions

    @classmethod
    def build(cls, opts, info, block_size):
        return GPT(info.vocab_size, opts.n_layer, opts.width, opts.n_head, block_size, opts.dropout)
