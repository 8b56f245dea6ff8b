"""DP-SGD's per-example gradient rule for the RMSNorm classes of the HF families dist-train adapts.

LlamaRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm and MistralRMSNorm compute, in fp32,
y = weight · x / sqrt(mean(x²) + variance_epsilon): nn.RMSNorm's formula with eps =
`variance_epsilon`. Their per-example weight gradient is therefore Σ_t g_t ∘ x̂_t with
x̂ = rms_norm(x), as for nn.RMSNorm. A norm class not listed here (Gemma's (1 + weight), say) gets
no rule from this file.
"""

from __future__ import annotations

import torch.nn.functional as F

from dist_train.privacy.layers import LayerRule, register_rule, trainable_names


class HFRMSNormRule(LayerRule):
    """weight only; always instantiated (the parameter is one vector)."""

    def instantiate(self, layer, a, g):
        if "weight" not in trainable_names(layer):
            return {}
        d = layer.weight.shape[-1]
        xhat = F.rms_norm(a.float(), (d,), eps=layer.variance_epsilon)
        return {"weight": (g.float() * xhat).reshape(a.size(0), -1, d).sum(1)}


HF_RMS_NORM_RULE = HFRMSNormRule()


def register_hf_rules() -> None:
    """Register the rule for each listed class (idempotent)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    for cls in (LlamaRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm, MistralRMSNorm):
        register_rule(cls, HF_RMS_NORM_RULE)
