"""`model.name: hf`: a Hugging Face decoder-only causal LM (Llama, Qwen2, Qwen3, Mistral, GPT-2)
built from a local `config.json`, optionally with local weights for continued pretraining.

Nothing is downloaded: `model.hf_config` must be a file or folder on disk, read with
`local_files_only`; a hub id is refused. Code from the model folder (`auto_map` in its config) runs
only with `model.hf_trust_remote_code: true`. Weights load from safetensors, or from pickled `.bin`
files only after the pickle scan that checkpoints get.

Simplifications, named: tied input/output embeddings are untied at build (the head starts as a copy
of the embedding, and trains on its own), so that a pipeline's first and last stages own separate
tensors; a config vocabulary larger than the data set's is trimmed to the data set's (the extra rows
of the embedding and the head are dropped), so the logits cover exactly the tokens the data can hold.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from dist_train.config.options import Options
from dist_train.errors import UserError
from dist_train.models.hf_blocks import FAMILIES, HFCausalLM
from dist_train.models.spec import ModelSpec

_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class HFOptions(Options):
    hf_config: str = Field(description="A local HF model folder (with config.json) or a config.json file; "
                                       "never a hub id: nothing is downloaded.")
    hf_weights: Optional[str] = Field(None, description="Local weights to start from: a .safetensors or .bin "
                                                        "file, or a folder of model*.safetensors or "
                                                        "pytorch_model*.bin; default: those in the hf_config "
                                                        "folder if any, else a fresh init.")
    hf_trust_remote_code: bool = Field(False, description="Allow a config whose auto_map names code in the "
                                                          "model folder (that code runs in every rank).")
    hf_attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="HF attention kernel: torch's "
                                                                                 "SDPA or HF's eager matmuls.")


def _config_file(opts: HFOptions) -> Path:
    path = Path(opts.hf_config).expanduser()
    if not path.exists():
        raise UserError(f"model.hf_config: {opts.hf_config} does not exist locally (dist-train never downloads "
                        "a model: give a local folder or config.json)")
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"model.hf_config: {path} has no config.json")
    return file


def hf_config(opts: HFOptions):
    """The HF `PretrainedConfig` that `opts` names, read offline; UserError naming what is wrong."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    file = _config_file(opts)
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"model.hf_config: {file} is not a JSON config ({e})") from None
    if "auto_map" in raw and not opts.hf_trust_remote_code:
        raise UserError(f"model.hf_config: {file} asks for remote code (auto_map: "
                        f"{', '.join(sorted(raw['auto_map']))}); refused unless model.hf_trust_remote_code: true")
    kind = raw.get("model_type")
    if kind not in FAMILIES:
        raise UserError(f"model.hf_config: model_type {kind!r} is not supported "
                        f"(supported: {', '.join(sorted(FAMILIES))})")
    if "auto_map" in raw:
        return AutoConfig.from_pretrained(str(file.parent), local_files_only=True, trust_remote_code=True)
    return CONFIG_MAPPING[kind].from_dict(raw)


def _weight_files(opts: HFOptions) -> list[Path]:
    if opts.hf_weights is not None:
        path = Path(opts.hf_weights).expanduser()
        if not path.exists():
            raise UserError(f"model.hf_weights: {opts.hf_weights} does not exist locally")
        if path.is_file():
            if not path.name.endswith(_WEIGHT_SUFFIXES):
                raise UserError(f"model.hf_weights: {path} is neither .safetensors nor .bin")
            return [path]
        folder, key = path, "model.hf_weights"
    else:
        folder, key = _config_file(opts).parent, None
    # HF's weight file names (shards included): a folder also holds other pickles (training_args.bin).
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files and key:
        raise UserError(f"{key}: {folder} holds no model*.safetensors or pytorch_model*.bin file")
    return files


def _read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from dist_train.train import pickle_scan

    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.name.endswith(".safetensors"):
            state.update(load_file(str(f)))
            continue
        try:
            pickle_scan.scan_file(f)
        except pickle_scan.UnsafePickle as e:
            raise UserError(f"model.hf_weights: {f} refused: it would call {e}, which is not plain data") from None
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def _load_weights(model: nn.Module, files: list[Path]) -> None:
    state = _read_weights(files)
    prefix = model.base_model_prefix + "."
    own = model.state_dict()
    if not any(k.startswith(prefix) for k in state) and any(k.startswith(prefix) for k in own):
        state = {(k if k.startswith("lm_head.") else prefix + k): v for k, v in state.items()}  # bare base model
    where = files[0].parent if len(files) > 1 else files[0]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape that does not match the config
        raise UserError(f"model.hf_weights: {where} does not fit model.hf_config: "
                        f"{' '.join(str(e).split())[:300]}") from None
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.startswith("lm_head."))]
    # Entries the HF class itself ignores on load (old GPT-2 files carry their attention-mask buffers).
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    unexpected = [k for k in unexpected if not any(p.search(k) for p in ignored)]
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which the model does not"
        raise UserError(f"model.hf_weights: {where} {what} "
                        f"({len(missing)} missing, {len(unexpected)} unexpected)")


def _trim_vocab(model: nn.Module, vocab: int) -> None:
    """Keep the first `vocab` rows of the embedding and the head (a copy, not a view)."""
    emb, head = model.get_input_embeddings(), model.lm_head
    new_emb = nn.Embedding(vocab, emb.embedding_dim, padding_idx=emb.padding_idx if
                           emb.padding_idx is not None and emb.padding_idx < vocab else None)
    new_emb.weight.data.copy_(emb.weight.data[:vocab])
    model.set_input_embeddings(new_emb)
    new_head = nn.Linear(head.in_features, vocab, bias=head.bias is not None)
    new_head.weight.data.copy_(head.weight.data[:vocab])
    if head.bias is not None:
        new_head.bias.data.copy_(head.bias.data[:vocab])
    model.lm_head = new_head
    model.config.vocab_size = vocab


def build_hf(opts: HFOptions, vocab_size: int, block_size: int) -> HFCausalLM:
    from transformers import AutoModelForCausalLM

    from dist_train.models.hf_rules import register_hf_rules

    config = hf_config(opts)
    if vocab_size > config.vocab_size:
        raise UserError(f"model.hf_config: the data set's vocabulary ({vocab_size}) is larger than the model's "
                        f"vocab_size ({config.vocab_size})")
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and block_size > limit:
        raise UserError(f"model.block_size: {block_size} exceeds the HF config's max_position_embeddings ({limit})")
    config._attn_implementation = opts.hf_attn_implementation
    files = _weight_files(opts)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=opts.hf_trust_remote_code,
                                             dtype=torch.float32)
    # A model built on the meta device (the plan's size and memory estimates) holds no values to load.
    if files and model.lm_head.weight.device.type != "meta":
        _load_weights(model, files)
    # Untie: the head gets its own copy, so that stage cuts and sharding see independent tensors.
    if model.lm_head.weight is model.get_input_embeddings().weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if vocab_size < config.vocab_size:
        _trim_vocab(model, vocab_size)
    register_hf_rules()  # DP-SGD's rule for the families' RMSNorm
    return HFCausalLM(model, FAMILIES[config.model_type], block_size)


class HFSpec(ModelSpec):
    """`model.name: hf`: see the module docstring."""

    task = "lm"
    options = HFOptions

    @classmethod
    def build(cls, opts, info, block_size):
        return build_hf(opts, info.vocab_size, block_size)

    @classmethod
    def describe(cls, opts) -> str:
        try:
            c = hf_config(opts)
        except UserError:
            return f"from {opts.hf_config}"
        return f"HF {c.model_type}, {c.num_hidden_layers} layers, width {c.hidden_size}"

    @classmethod
    def check_config(cls, cfg) -> None:
        opts = cfg.model.options()
        try:
            hf_config(opts)
        except UserError as e:
            raise ValueError(str(e)) from None
