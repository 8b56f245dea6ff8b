"""`dist-train export RUN --format hf`: a folder that `transformers` loads as it is
(`AutoModelForCausalLM.from_pretrained(folder)`): `config.json`, `model.safetensors` under the HF
parameter names, and the run's `tokenizer.json` when its data set has one (with a
`tokenizer_config.json` that lets `AutoTokenizer.from_pretrained(folder)` load it).

The model says how it maps to HF, through a capability, not its name: a method
`hf_export() -> (HF config dict, {HF parameter name: own parameter name})`, or an exporter
registered for its class with `register_hf_exporter`. A model with neither has no HF counterpart
and is refused by name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from dist_train.errors import UserError

Exporter = Callable[[nn.Module], tuple[dict, dict[str, str]]]

# "module:Class" of a model -> "module:function" of its exporter (resolved on use, no import before).
_EXPORTERS: dict[str, object] = {
    "dist_train.models.llama:Llama": "dist_train.models.llama_hf:llama_hf_export",
}


def register_hf_exporter(model_class: type, exporter: Exporter) -> None:
    """Export models of `model_class` (and its subclasses) with `exporter(model)`."""
    _EXPORTERS[f"{model_class.__module__}:{model_class.__qualname__}"] = exporter


def _exporter(model: nn.Module) -> Optional[Exporter]:
    import importlib

    method = getattr(model, "hf_export", None)
    if callable(method):
        return lambda m: method()
    for cls in type(model).__mro__:
        entry = _EXPORTERS.get(f"{cls.__module__}:{cls.__qualname__}")
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
        if entry is not None:
            return entry
    return None


def hf_exporter(model: nn.Module, what: str) -> Exporter:
    """`model`'s exporter; UserError naming `what` when it has no HF counterpart."""
    exporter = _exporter(model)
    if exporter is None:
        raise UserError(f"export --format hf: {what} ({type(model).__name__}) has no Hugging Face counterpart; "
                        "use the default format (safetensors)")
    return exporter


def hf_state(model: nn.Module, what: str) -> tuple[dict, dict]:
    """(config dict, {HF name: tensor}) for `model`; UserError naming `what` when it has no HF form."""
    config, names = hf_exporter(model, what)(model)
    own = model.state_dict()
    # Clones: safetensors refuses tensors that share storage, and a tied head is not written at all.
    return config, {hf: own[mine].detach().contiguous().cpu().clone() for hf, mine in names.items()}


def write_hf_folder(model: nn.Module, folder: Path, what: str, tokenizer: Optional[str] = None,
                    metadata: Optional[dict] = None) -> Path:
    """Write `model` as an HF model folder; returns `folder`."""
    from safetensors.torch import save_file

    config, tensors = hf_state(model, what)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**config, "dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt", **(metadata or {})})
    if tokenizer:
        shutil.copyfile(tokenizer, folder / "tokenizer.json")
        # What makes AutoTokenizer.from_pretrained(folder) read tokenizer.json as it is.
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n")
    return folder
