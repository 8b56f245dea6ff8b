"""Registries of the pluggable components: a config name -> the class that owns it.

A component (local method, data set, backend, optimizer, task) is one file with a class that owns
its options model, its `check(cfg, world_size)` and its `plan` rows; its registry line maps the name
a config uses to that class. Nothing else in the package branches on component names.

Built-in entries are import paths ("module:attr"), resolved on first use, so that validating a
config does not import DeepSpeed, scikit-learn or every method's module, and so that the config
schema (which checks names against these tables) depends on no component module. A user's own
component is registered with its class:

    from dist_train.registry import LOCAL_METHODS
    LOCAL_METHODS.register("my_method", MyMethod)

and a config that lists the registering module under `plugins:` uses it from `dist-train run`,
`launch` and `plan` with no edit to the package.

This module imports nothing of dist_train but `errors`: every other module may import it.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Iterator, Optional

from dist_train.errors import UserError


class Registry:
    """Names -> components, for the config key `key` (used in error messages)."""

    def __init__(self, key: str, what: str, entries: dict[str, Any], import_paths: Optional[str] = None):
        """`import_paths`: a "module:attr" path of a function `name -> entry` that makes an entry of a
        name that is itself an import path ("package.module:factory"), so that a config can name a
        component of its own without registering it (the models). ValueError naming what is wrong."""
        self.key, self.what = key, what
        self._entries: dict[str, Any] = dict(entries)
        self._import_paths = import_paths

    def register(self, name: str, entry: Any, *, replace: bool = False) -> Any:
        """Add `entry` (a class or object, or a "module:attr" path) under `name`; returns it, so it
        works as `REGISTRY.register("x", X)` after a class definition. A name already taken is an
        error unless `replace` (re-registering the very same entry is allowed: a plugin module may
        be imported twice)."""
        old = self._entries.get(name)
        if old is not None and old is not entry and not replace:
            raise ValueError(f"{self.key}: {name!r} is already registered ({_describe(old)})")
        self._entries[name] = entry
        return entry

    def add_import_path(self, name: str) -> None:
        """Register an entry for `name`, an import path ("module:attr") this registry can make one of;
        ValueError otherwise (for an unknown name: the choices, without the key)."""
        if self._import_paths is None or ":" not in name:
            raise ValueError(self.unknown(name).partition(": ")[2])
        module, _, attr = self._import_paths.partition(":")
        self._entries[name] = getattr(importlib.import_module(module), attr)(name)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> Any:
        """The component registered as `name`; UserError naming the key and the choices otherwise."""
        if name not in self._entries:
            raise UserError(self.unknown(name))
        entry = self._entries[name]
        if isinstance(entry, str):  # a built-in, imported on first use
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        return entry

    def unknown(self, name: object) -> str:
        """`key: expected one of 'a', 'b' or 'c', got 'x'`: the same words as a fixed choice's error."""
        names = [repr(n) for n in self._entries if ":" not in str(n)]  # import paths are not choices
        choices = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        return f"{self.key}: expected one of {choices}, got {name!r}"


def _describe(entry: Any) -> str:
    return entry if isinstance(entry, str) else f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', entry)}"


def import_plugins(modules: list[str]) -> None:
    """Import each module a config's `plugins:` list names (they register their components): a
    dotted module name on the Python path, or the path of a .py file (imported once, under its
    stem, with its folder on the path as `python FILE` would have it, so it can import its siblings)."""
    import sys
    from pathlib import Path

    for name in modules:
        try:
            if name.endswith(".py"):
                path = Path(name)
                if not path.is_file():
                    raise UserError(f"plugins: file not found: {name}")
                if path.stem in sys.modules and getattr(sys.modules[path.stem], "__file__", None) == str(path.resolve()):
                    continue
                if str(path.resolve().parent) not in sys.path:
                    sys.path.insert(0, str(path.resolve().parent))
                spec = importlib.util.spec_from_file_location(path.stem, path.resolve())
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except ImportError as err:
            raise UserError(f"plugins: cannot import {name!r} ({err})") from None


# --- the registries ---------------------------------------------------------------------------------

LOCAL_METHODS = Registry("local.method", "local-learning method", {
    "dgl": "dist_train.local.methods.dgl:DGL",
    "mono_forward": "dist_train.local.methods.mono_forward:MonoForward",
    "infopro": "dist_train.local.methods.infopro:InfoPro",
    "auglocal": "dist_train.local.methods.auglocal:AugLocal",
    "forward_forward": "dist_train.local.methods.forward_forward:ForwardForward",
    "tpsgd": "dist_train.local.methods.tpsgd:TpSGD",
    "man": "dist_train.local.methods.man:MAN",
    "noprop": "dist_train.local.methods.noprop:NoProp",
})

DATASETS = Registry("data.name", "data set", {
    "stdlib_bytes": "dist_train.data.stdlib_bytes:StdlibBytes",
    "token_bin": "dist_train.data.token_bin:TokenBin",
    "digits": "dist_train.data.digits:Digits",
    "shapes32": "dist_train.data.shapes32:Shapes32",
    "reaction_diffusion": "dist_train.pde.data:ReactionDiffusion",
    "diffusion_sorption": "dist_train.pde.data:DiffusionSorption",
})

MODELS = Registry("model.name", "model", {
    "gpt": "dist_train.models.gpt:GPTSpec",
    "llama": "dist_train.models.llama:LlamaSpec",
    "mlp": "dist_train.models.mlp:MLPSpec",
    "cnn": "dist_train.models.cnn:CNNSpec",
    "hf": "dist_train.models.hf:HFSpec",
    "basis_mlp": "dist_train.pde.basis:BasisMLPSpec",
    "basis_fno": "dist_train.pde.basis_fno:BasisFNOSpec",
}, import_paths="dist_train.models.factory:spec_for_import_path")

BACKENDS = Registry("parallel.backend", "backend", {
    "ddp": "dist_train.parallel.ddp:DDPBackend",
    "fsdp": "dist_train.parallel.fsdp:FSDPBackend",
    "deepspeed": "dist_train.parallel.deepspeed_backend:DeepSpeedBackend",
    "fairscale": "dist_train.parallel.fairscale_oss:FairScaleBackend",
    "none": "dist_train.parallel.single:SingleProcess",
})

OPTIMIZERS = Registry("optim.name", "optimizer", {
    "adamw": "dist_train.optim.choices:AdamW",
    "sgd": "dist_train.optim.choices:SGD",
    "muon": "dist_train.optim.choices:Muon",
    "normuon": "dist_train.optim.choices:NorMuon",
    "dp_sgd": "dist_train.privacy.dp_sgd:DPSGD",
    "diff2": "dist_train.privacy.diff2_transform:Diff2Transform",
})

__all__ = ["BACKENDS", "DATASETS", "LOCAL_METHODS", "MODELS", "OPTIMIZERS", "Registry", "import_plugins"]
