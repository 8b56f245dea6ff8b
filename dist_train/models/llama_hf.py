"""dist-train's `Llama` as Hugging Face's `LlamaForCausalLM`: the config and the parameter names.

The two use the same rotate-half rotary layout and the same matrix shapes, so the weights copy 1:1;
only the names differ (Meta's `attention.wq` is HF's `self_attn.q_proj`, ...). A tied head is not
written: `tie_word_embeddings` makes HF tie it again.
"""

from __future__ import annotations

_BLOCK = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def llama_hf_export(model) -> tuple[dict, dict[str, str]]:
    """(LlamaConfig as a dict, {HF name: dist-train name}) for a `dist_train.models.llama.Llama`."""
    from transformers import LlamaConfig

    block = model.blocks[0]
    rope = {"rope_type": "default", "rope_theta": float(block.rope_theta)}
    if block.rope_scaling is not None:
        s = block.rope_scaling
        rope = {**rope, "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_context}
    config = LlamaConfig(
        vocab_size=model.vocab_size, hidden_size=model.width, intermediate_size=block.feed_forward.w1.out_features,
        num_hidden_layers=model.n_layer, num_attention_heads=model.n_head, num_key_value_heads=model.n_kv_heads,
        head_dim=model.width // model.n_head, max_position_embeddings=max(model.block_size, rope.get(
            "original_max_position_embeddings", 0)), rms_norm_eps=model.head.norm.eps, rope_parameters=rope,
        tie_word_embeddings=bool(model.tie_embeddings), attention_bias=False, mlp_bias=False,
        architectures=["LlamaForCausalLM"], bos_token_id=None, eos_token_id=None)
    names = {"model.embed_tokens.weight": "embed.tok.weight", "model.norm.weight": "head.norm.weight"}
    if not model.tie_embeddings:
        names["lm_head.weight"] = "head.output.weight"
    for i in range(model.n_layer):
        for own, hf in _BLOCK.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blocks.{i}.{own}.weight"
    return config.to_dict(), names
