"""Hugging Face causal LMs laid out as `embed -> blocks -> head`, around HF's own modules.

Nothing here re-implements a layer: each part holds the modules of the `*ForCausalLM` that
`transformers` built, and calls them the way that family's `*Model.forward` does. What the
wrappers add is what a stage cut needs: a block takes the hidden states and nothing else.

- Llama, Qwen2, Qwen3, Mistral: the rotary embedding is one module on the HF model, whose
  (cos, sin) every decoder layer takes as an argument. Each `HFBlock` owns a copy of that module
  (it holds a non-persistent frequency buffer and no parameters) and computes (cos, sin) for the
  sequence it receives, so a block on another rank needs no tensor but the hidden states.
- GPT-2: learned positions are added in the embedding (`wte + wpe`, then dropout); the blocks take
  the hidden states and the causal mask.

The attention mask is built per block with HF's own mask functions (causal, or sliding-window
where the family's config asks for it on that layer); with SDPA and no padding they return None
and the kernel's causal path runs, as in HF's forward.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from dist_train.models.base import EmbedBlocksHead


@dataclass(frozen=True)
class Family:
    """How one HF model family is laid out (checked against its `modeling_*.py`, not guessed)."""

    layers: str            # attribute of the base model holding the decoder layers
    embed: tuple[str, ...]  # base-model attributes the embedding uses, in call order
    norm: str              # the final norm on the base model
    rotary: bool           # layers take position_embeddings=(cos, sin) from `base.rotary_emb`
    sliding: Callable[[object, int], bool]  # (config, layer index) -> sliding-window mask on that layer


def _layer_types(config, i: int) -> bool:
    # Qwen2/Qwen3: `config.layer_types[i]` picks the mask, as their Model.forward does.
    return (getattr(config, "layer_types", None) or ["full_attention"] * (i + 1))[i] == "sliding_attention"


def _mistral_sliding(config, i: int) -> bool:
    # Mistral: one mask for every layer, sliding when `config.sliding_window` is set.
    return getattr(config, "sliding_window", None) is not None


FAMILIES: dict[str, Family] = {
    "llama": Family("layers", ("embed_tokens",), "norm", True, lambda c, i: False),
    "qwen2": Family("layers", ("embed_tokens",), "norm", True, _layer_types),
    "qwen3": Family("layers", ("embed_tokens",), "norm", True, _layer_types),
    "mistral": Family("layers", ("embed_tokens",), "norm", True, _mistral_sliding),
    "gpt2": Family("h", ("wte", "wpe", "drop"), "ln_f", False, lambda c, i: False),
}


def _positions(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.size(1), device=x.device).unsqueeze(0)


class HFEmbed(nn.Module):
    """Token embedding (+ GPT-2's learned positions and dropout): int64 [B,T] -> [B,T,hidden]."""

    def __init__(self, base: nn.Module, family: Family):
        super().__init__()
        for name in family.embed:
            self.add_module(name, getattr(base, name))
        self.names = family.embed

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        tok = getattr(self, self.names[0])
        h = tok(idx)
        if len(self.names) > 1:  # GPT-2: + wpe(positions), then dropout
            pos, drop = (getattr(self, n) for n in self.names[1:])
            # positions expanded to [B,T] (a view): per-example clipping needs an example dimension
            h = drop(h + pos(_positions(idx).expand_as(idx)))
        return h


class HFBlock(nn.Module):
    """One HF decoder layer; it builds its own mask and rotary (cos, sin) from the hidden states."""

    def __init__(self, layer: nn.Module, config, sliding: bool, rotary: Optional[nn.Module]):
        super().__init__()
        self.layer = layer
        self.rotary = rotary
        self.sliding = sliding
        object.__setattr__(self, "config", config)  # shared with the model; not a module

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        position_ids = _positions(h)
        make_mask = create_sliding_window_causal_mask if self.sliding else create_causal_mask
        mask = make_mask(config=self.config, inputs_embeds=h, attention_mask=None, cache=None,
                         position_ids=position_ids)
        if self.rotary is None:
            return self.layer(h, attention_mask=mask, position_ids=position_ids)
        return self.layer(h, attention_mask=mask, position_ids=position_ids,
                          position_embeddings=self.rotary(h, position_ids))


class HFHead(nn.Module):
    """Final norm + `lm_head`: [B,T,hidden] -> logits [B,T,vocab]."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))


class HFCausalLM(EmbedBlocksHead):
    """An HF `*ForCausalLM` as embed -> blocks -> head. forward(idx [B,T]) -> logits [B,T,vocab].

    `hf_config` is the (possibly vocabulary-trimmed) HF config the modules were built from; export
    writes it back. The parameter names are the wrappers' (`embed.embed_tokens.weight`,
    `blocks.0.layer.self_attn.q_proj.weight`, `head.lm_head.weight`); `hf_export` maps them to HF's.
    """

    task = "lm"
    # Its stage outputs are [B,T,hidden] token features: local-learning methods give it the GPT's
    # auxiliary heads.
    local_kind = "gpt"

    def __init__(self, hf_model: nn.Module, family: Family, block_size: int):
        super().__init__()
        config = hf_model.config
        base = getattr(hf_model, hf_model.base_model_prefix)
        object.__setattr__(self, "hf_config", config)
        self.architecture = type(hf_model).__name__
        self.block_size = block_size
        self.width = config.hidden_size  # what auxiliary heads of local-learning stages read
        self.embed = HFEmbed(base, family)
        rotary = base.rotary_emb if family.rotary else None
        self.blocks = nn.ModuleList(
            HFBlock(layer, config, family.sliding(config, i), copy.deepcopy(rotary) if rotary is not None else None)
            for i, layer in enumerate(getattr(base, family.layers)))
        self.head = HFHead(getattr(base, family.norm), hf_model.lm_head)
        # HF -> wrapper prefixes, for export: `model.layers.3.` <-> `blocks.3.layer.`.
        p = hf_model.base_model_prefix
        self._hf_prefixes = [(f"{p}.{n}.", f"embed.{n}.") for n in family.embed] + [
            (f"{p}.{family.layers}.{i}.", f"blocks.{i}.layer.") for i in range(len(self.blocks))] + [
            (f"{p}.{family.norm}.", "head.norm."), ("lm_head.", "head.lm_head.")]

    def num_flops_per_token(self, seq_len: int | None = None) -> int:
        """6·N + 12·L·H·Q·T (PaLM appendix B): N the non-embedding parameters (the head counted),
        L layers, H attention heads, Q head dimension, T the sequence length."""
        c = self.hf_config
        t = seq_len if seq_len is not None else self.block_size
        n = sum(p.numel() for p in self.parameters()) - sum(p.numel() for p in self.embed.parameters())
        heads = c.num_attention_heads
        q = getattr(c, "head_dim", None) or c.hidden_size // heads
        return 6 * n + 12 * c.num_hidden_layers * heads * q * t

    def hf_export(self) -> tuple[dict, dict[str, str]]:
        """(HF config dict, {HF parameter name: this model's parameter name})."""
        names = {}
        for own in self.state_dict():
            for hf, mine in self._hf_prefixes:
                if own.startswith(mine):
                    names[hf + own[len(mine):]] = own
                    break
        return {**self.hf_config.to_dict(), "architectures": [self.architecture]}, names
