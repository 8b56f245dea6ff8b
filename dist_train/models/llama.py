"""A Llama-3-family decoder (Meta, "The Llama 3 Herd of Models", arXiv 2407.21783), laid out as
embed -> blocks -> head like every model here.

- RMSNorm before attention and before the feed-forward network, and before the output projection
  (`nn.RMSNorm`, so per-example rules such as DP-SGD's RMSNorm rule apply as they are).
- Rotary position embeddings (RoFormer, arXiv 2104.09864) with base `rope_theta`, optionally with
  Llama 3.1's frequency scaling for long context (`RopeScaling`). Convention: the *rotate-half*
  layout of Hugging Face `transformers` (dimension i is paired with i + head_dim/2), not the
  interleaved pairs (2i, 2i+1) of Meta's original checkpoints; the two differ by a fixed
  permutation of the q and k projection rows. With this choice the weights copy 1:1 to and from
  Hugging Face's `LlamaForCausalLM`; Meta-format weights need that permutation at import.
- Grouped-query attention: `n_kv_heads` key/value heads, each shared by n_head / n_kv_heads query
  heads (query head j reads key/value head j // group), causal, through
  `F.scaled_dot_product_attention`.
- SwiGLU feed-forward network w2(silu(w1 x) * w3 x) with Meta's hidden size rule (`ffn_hidden`).
- No biases anywhere. Optional tied input/output embeddings (the 1B and 3B releases tie them).

Every block is self-contained: it computes its rotary tables from the sequence length of its input
(in float32, on the input's device), so a stage cut or a per-block FSDP unit needs no side input,
nothing is stored that building on the meta device and `to_empty` would leave uninitialised, and
no table is rounded when the model is cast to bf16. Parameter names follow Meta's (`attention.wq`,
`feed_forward.w1`, `attention_norm`, ...).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from dist_train.config.options import Options
from dist_train.models.base import EmbedBlocksHead
from dist_train.models.spec import ModelSpec

INIT_STD = 0.02


def ffn_hidden(width: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Meta's SwiGLU hidden size: two thirds of 4 * width (so that three matrices cost what a 4x
    GELU MLP's two do), times `ffn_dim_multiplier` if given, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * width / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class RopeScaling(Options):
    """Llama 3.1's rotary frequency scaling (published with the 3.1 and 3.2 weights): wavelengths
    longer than original_context / low_freq_factor are stretched by `factor`, those shorter than
    original_context / high_freq_factor are kept, and the band between is interpolated smoothly."""

    factor: float = Field(8.0, gt=0, description="Stretch of the low frequencies (Llama 3.1: 8, Llama 3.2: 32).")
    low_freq_factor: float = Field(1.0, gt=0, description="original_context / low_freq_factor: the wavelength above which frequencies are divided by `factor`.")
    high_freq_factor: float = Field(4.0, gt=0, description="original_context / high_freq_factor: the wavelength below which frequencies are kept.")
    original_context: int = Field(8192, ge=1, description="Context length the model was first trained at (Hugging Face: original_max_position_embeddings).")

    @model_validator(mode="after")
    def _band(self):
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor ({self.low_freq_factor})")
        return self


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """The head_dim / 2 rotary angular frequencies theta^(-2i/head_dim), float32, scaled as Llama 3.1
    when `scaling` is given."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_context / scaling.low_freq_factor
    high_wavelen = scaling.original_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # In the band between the two wavelengths: interpolate between stretched and kept, linearly in
    # original_context / wavelength.
    smooth = (scaling.original_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    mixed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, mixed, scaled)


def rope_tables(seq_len: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [seq_len, head_dim] (float32) for positions 0..seq_len-1, each angle repeated for
    both halves (rotate-half layout)."""
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=inv_freq.device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, head_dim] by the position angles, pairing dimension i with i + head_dim/2."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class TokenEmbedding(nn.Module):
    """Token ids int64 [B, T] -> [B, T, width]; positions enter through RoPE inside each block."""

    def __init__(self, vocab_size: int, width: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary q and k, no biases."""

    def __init__(self, width: int, n_head: int, n_kv_heads: int):
        super().__init__()
        self.n_head, self.n_kv_heads = n_head, n_kv_heads
        self.head_dim = width // n_head
        self.wq = nn.Linear(width, n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(width, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(width, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_head * self.head_dim, width, bias=False)  # residual projection (depth-scaled init)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Each key/value head serves n_head / n_kv_heads consecutive query heads. SDPA's enable_gqa
        # reads them in place (flash and math kernels): expanding k and v by hand would keep the
        # expanded copies for backward, group x the k/v activation memory.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_head)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class _SwiGLU(torch.autograd.Function):
    """silu(a) * b, keeping only a and b for backward (autograd would also keep silu(a), one more
    [B, T, hidden] tensor per block); backward recomputes silu(a), one elementwise op."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = ctx.saved_tensors
        # aten's fused silu_backward: (grad * b) * sigmoid(a) * (1 + a * (1 - sigmoid(a))) in one pass
        return torch.ops.aten.silu_backward(grad * b, a), grad * F.silu(a)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b (Shazeer 2020, eq. 6's SwiGLU with the gate a = xW, the value b = xV)."""
    return _SwiGLU.apply(a, b)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)  # gate
        self.w3 = nn.Linear(width, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, width, bias=False)  # down: residual projection (depth-scaled init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class LlamaBlock(nn.Module):
    """x + attention(norm(x)), then x + ffn(norm(x)); computes its own rotary tables."""

    def __init__(self, layer_id: int, width: int, n_head: int, n_kv_heads: int, hidden: int,
                 rope_theta: float, rope_scaling: Optional[RopeScaling], norm_eps: float):
        super().__init__()
        self.layer_id = layer_id
        self.rope_theta, self.rope_scaling = rope_theta, rope_scaling
        self.attention_norm = nn.RMSNorm(width, eps=norm_eps)
        self.attention = Attention(width, n_head, n_kv_heads)
        self.ffn_norm = nn.RMSNorm(width, eps=norm_eps)
        self.feed_forward = FeedForward(width, hidden)

    def rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for `seq_len` positions, computed once per length, device and rotary setting. A
        plain attribute, not a buffer: nothing to initialise after a meta build, nothing in the state dict.
        Inside a compiled block (`parallel.compile`) they are computed in the graph at every call, a few
        elementwise ops on [seq_len, head_dim]: storing them would change the block's attributes after
        its first call, which dynamo's guards see, and the block would compile a second time."""
        if torch.compiler.is_compiling():
            return rope_tables(seq_len, rope_frequencies(self.attention.head_dim, self.rope_theta, self.rope_scaling,
                                                         device))
        key = (seq_len, device, self.rope_theta, self.rope_scaling)
        if getattr(self, "_rope_key", None) != key:
            inv_freq = rope_frequencies(self.attention.head_dim, self.rope_theta, self.rope_scaling, device)
            self._rope_key, self._rope_tables = key, rope_tables(seq_len, inv_freq)
        return self._rope_tables

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope(x.size(1), x.device)
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))

    @torch.no_grad()
    def init_weights(self, depth_std: float) -> None:
        for norm in (self.attention_norm, self.ffn_norm):
            nn.init.ones_(norm.weight)
        for linear in (self.attention.wq, self.attention.wk, self.attention.wv, self.feed_forward.w1,
                       self.feed_forward.w3):
            nn.init.normal_(linear.weight, mean=0.0, std=INIT_STD)
        for linear in (self.attention.wo, self.feed_forward.w2):
            nn.init.normal_(linear.weight, mean=0.0, std=depth_std)


class LlamaHead(nn.Module):
    """Final RMSNorm + projection to the vocabulary: [B, T, width] -> logits [B, T, V]."""

    def __init__(self, width: int, vocab_size: int, norm_eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=norm_eps)
        self.output = nn.Linear(width, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(x))


class Llama(EmbedBlocksHead):
    """Llama 3 decoder. forward(idx [B, T] int64) -> logits [B, T, vocab_size]."""

    task = "lm"
    # Its stage outputs are [B, T, width] token features like the GPT's: local-learning methods give
    # it the auxiliary heads they give the GPT.
    local_kind = "gpt"

    def __init__(self, vocab_size: int, n_layer: int, width: int, n_head: int, n_kv_heads: int,
                 hidden: int, block_size: int, rope_theta: float = 500000.0,
                 rope_scaling: Optional[RopeScaling] = None, norm_eps: float = 1e-5,
                 tie_embeddings: bool = False):
        super().__init__()
        if width % n_head != 0 or (width // n_head) % 2 != 0:
            raise ValueError(f"n_head ({n_head}) must divide width ({width}) into an even head size")
        if n_head % n_kv_heads != 0:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_head ({n_head})")
        self.vocab_size, self.n_layer, self.width = vocab_size, n_layer, width
        self.n_head, self.n_kv_heads, self.block_size = n_head, n_kv_heads, block_size
        self.tie_embeddings = tie_embeddings
        self.embed = TokenEmbedding(vocab_size, width)
        self.blocks = nn.ModuleList(
            LlamaBlock(i, width, n_head, n_kv_heads, hidden, rope_theta, rope_scaling, norm_eps)
            for i in range(n_layer))
        self.head = LlamaHead(width, vocab_size, norm_eps)
        self.init_weights()

    def tie_weights(self) -> None:
        """Make the output projection share the embedding table (when tie_embeddings). Moving a model
        off the meta device with `to_empty` gives each module its own new tensor, so call this again
        (before sharding) after `to_empty`; `init_weights` does."""
        if self.tie_embeddings and self.head.output.weight is not self.embed.tok.weight:
            self.head.output.weight = self.embed.tok.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """torchtitan-style init, in place (also after `to_empty` on a model built on meta):
        every matrix N(0, 0.02), norms 1; the residual output projections of block l (attention.wo,
        feed_forward.w2) N(0, 0.02 / sqrt(2 (l + 1))) (torchtitan's depth_init), so that the blocks
        near the input, whose outputs the most later blocks add to, start smallest.
        The rotary tables are computed in forward: no buffer needs restoring."""
        self.tie_weights()
        nn.init.normal_(self.embed.tok.weight, mean=0.0, std=INIT_STD)
        for block in self.blocks:
            block.init_weights(INIT_STD / math.sqrt(2 * (block.layer_id + 1)))
        nn.init.ones_(self.head.norm.weight)
        if not self.tie_embeddings:
            nn.init.normal_(self.head.output.weight, mean=0.0, std=INIT_STD)

    def num_flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6 N + 12 L H Q T (PaLM appendix B).

        N counts the parameters of every matmul: the blocks (GQA's narrower k/v projections and the
        three SwiGLU matrices as they are), the norms, and the output projection (counted even when
        it is tied to the embedding, whose lookup is not a matmul and is left out); 12 L H Q T is the
        attention scores and weighted sum, which have no parameters.
        """
        t = seq_len if seq_len is not None else self.block_size
        n = sum(p.numel() for p in self.blocks.parameters()) + sum(p.numel() for p in self.head.parameters())
        return 6 * n + 12 * self.n_layer * self.n_head * (self.width // self.n_head) * t


# --- the config's model.* keys --------------------------------------------------------------------

# The published Llama 3.x shapes. `debug` is a smoke-test size (torchtitan's debugmodel).
_LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context": 8192}
_LLAMA32_SCALING = {**_LLAMA31_SCALING, "factor": 32.0}
FLAVORS: dict[str, dict[str, Any]] = {
    "debug": dict(width=256, n_layer=6, n_head=16, n_kv_heads=4, ffn_dim_multiplier=None, multiple_of=256,
                  rope_scaling=None, tie_embeddings=False),
    "1B": dict(width=2048, n_layer=16, n_head=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256,
               rope_scaling=_LLAMA32_SCALING, tie_embeddings=True),
    "3B": dict(width=3072, n_layer=28, n_head=24, n_kv_heads=8, ffn_dim_multiplier=1.0, multiple_of=256,
               rope_scaling=_LLAMA32_SCALING, tie_embeddings=True),
    "8B": dict(width=4096, n_layer=32, n_head=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024,
               rope_scaling=_LLAMA31_SCALING, tie_embeddings=False),
    "70B": dict(width=8192, n_layer=80, n_head=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096,
                rope_scaling=_LLAMA31_SCALING, tie_embeddings=False),
}


class LlamaOptions(Options):
    """`model.flavor` picks a published shape; any key given beside it overrides that flavour's value
    (a key left out takes the flavour's, so `rope_scaling: null` turns the scaling off)."""

    flavor: Literal["debug", "1B", "3B", "8B", "70B"] = Field("debug", description="Shape preset: debug (width 256, 6 layers, 16 heads, 4 kv heads) or the Llama 3.2 1B / 3B and Llama 3.1 8B / 70B shapes; the vocabulary always comes from the data set.")
    n_layer: int = Field(6, ge=1, description="Transformer blocks (default: the flavour's).")
    width: int = Field(256, ge=2, description="Model dimension (default: the flavour's).")
    n_head: int = Field(16, ge=1, description="Query heads; must divide width into an even head size (default: the flavour's).")
    n_kv_heads: Optional[int] = Field(4, ge=1, description="Key/value heads of grouped-query attention; must divide n_head; null = n_head (multi-head attention) (default: the flavour's).")
    ffn_dim_multiplier: Optional[float] = Field(None, gt=0, description="Multiplier of the SwiGLU hidden size 8 width / 3 before rounding; null = 1 (default: the flavour's).")
    multiple_of: int = Field(256, ge=1, description="SwiGLU hidden size rounded up to a multiple of this (default: the flavour's).")
    rope_theta: float = Field(500000.0, gt=0, description="RoPE base (Llama 3: 500000).")
    rope_scaling: Optional[RopeScaling] = Field(None, description="Llama 3.1 rotary frequency scaling for long context; null = none (default: the flavour's: 1B/3B factor 32, 8B/70B factor 8, debug none).")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
    tie_embeddings: bool = Field(False, description="Output projection shares the embedding table (default: the flavour's: true for 1B and 3B). Not with a local pipeline (parallel.stages > 1), whose first and last stages hold the two ends.")

    @model_validator(mode="before")
    @classmethod
    def _flavor_defaults(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("flavor", "debug") in FLAVORS:
            flavor = FLAVORS[values.get("flavor", "debug")]
            given = values.get("rope_scaling")
            values = {**flavor, **values}
            if isinstance(given, dict) and isinstance(flavor["rope_scaling"], dict):
                # `rope_scaling.factor: 16` changes the flavour's factor and keeps its other fields
                values["rope_scaling"] = {**flavor["rope_scaling"], **given}
        return values

    @model_validator(mode="after")
    def _shapes(self):
        if self.width % self.n_head != 0 or (self.width // self.n_head) % 2 != 0:
            raise ValueError(f"model.n_head ({self.n_head}) must divide model.width ({self.width}) into an even head size")
        if self.n_head % self.kv_heads != 0:
            raise ValueError(f"model.n_kv_heads ({self.n_kv_heads}) must divide model.n_head ({self.n_head})")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_head

    @property
    def ffn_hidden(self) -> int:
        return ffn_hidden(self.width, self.multiple_of, self.ffn_dim_multiplier)


class LlamaSpec(ModelSpec):
    """`model.name: llama`: the Llama 3 decoder above, vocabulary from the data set."""

    task = "lm"
    options = LlamaOptions

    @classmethod
    def build(cls, opts: LlamaOptions, info, block_size: int) -> Llama:
        return Llama(info.vocab_size, opts.n_layer, opts.width, opts.n_head, opts.kv_heads, opts.ffn_hidden,
                     block_size, opts.rope_theta, opts.rope_scaling, opts.norm_eps, opts.tie_embeddings)

    @classmethod
    def describe(cls, opts: LlamaOptions) -> str:
        tied = ", tied embeddings" if opts.tie_embeddings else ""
        rope = f", rope scaling x{opts.rope_scaling.factor:g}" if opts.rope_scaling is not None else ""
        return (f"flavor {opts.flavor}: {opts.n_layer} layers, width {opts.width}, {opts.n_head} heads "
                f"({opts.kv_heads} kv), SwiGLU {opts.ffn_hidden}{tied}{rope}")

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.model.options().tie_embeddings and cfg.parallel.stages > 1:
            raise ValueError("model.tie_embeddings: a local pipeline (parallel.stages > 1) holds the embedding and "
                             "the output head on different stages, so they cannot share weights; set "
                             "model.tie_embeddings=false")
