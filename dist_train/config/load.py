"""YAML + dotted command-line overrides -> validated `Config`, with errors that name the key path."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from dist_train.config.options import format_validation_error
from dist_train.config.schema import Config
from dist_train.errors import UserError

# The quickstart ships inside the package so `dist-train run` works from any directory.
BUILTIN = Path(__file__).resolve().parent.parent / "configs"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false. YAML 1.1 also reads on/off/yes/no as
    booleans, which turns `progress: off` (a choice, not a bool) into False."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`["optim.lr=3e-4", "train.steps=50"]` -> nested dict. Values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override '{item}': expected key.path=value")
        try:
            value = _yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # YAML 1.1 reads 3e-4 as a string (no dot); accept it as the number the user meant.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value.lower() for c in ".e") else value
            except ValueError:
                pass
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}': {part} is not a section")
        node[parts[-1]] = value
    return tree


def merge_dicts(base: dict, over: dict) -> dict:
    """Recursive merge: mappings merge key by key, anything else in `over` replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_path(path: str | Path) -> Path:
    """`path` if it exists, else the built-in config of that name (`quickstart.yaml`); UserError otherwise."""
    p = Path(path)
    if p.exists():
        return p
    builtin = BUILTIN / p.name
    if not p.is_absolute() and len(p.parts) <= 2 and builtin.exists():
        return builtin
    raise UserError(f"config file not found: {path}")


def read_yaml(path: str | Path) -> dict:
    p = resolve_config_path(path)
    try:
        data = _yaml(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{p}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Config:
    """Load `path` (or the quickstart when None), apply overrides, validate. Raises UserError."""
    data = read_yaml(path if path is not None else BUILTIN / "quickstart.yaml")
    data = merge_dicts(data, parse_overrides(overrides))
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)  # checkpoint.async
