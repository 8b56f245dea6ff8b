"""Refuse a checkpoint whose pickles would run code, before anything unpickles them.

torch.distributed.checkpoint reads a checkpoint's `.metadata` with plain `pickle.load`, and
DeepSpeed's own tools (`zero_to_fp32`, which `dist-train export` uses) load its `*.pt` files with
`weights_only=False`. A crafted file there runs whatever its pickle names (`os.system`,
`builtins.exec`, ...) the moment it is loaded. torch's own guard (`weights_only=True`, which the
trainer state and dist-train's DeepSpeed checkpoint engine use) covers only `torch.load`, so every
pickle in a checkpoint folder is first walked here: the pickle is executed against stand-ins, never
the real callables, and every global it names must be

- one of torch's tensor rebuild functions or a few plain builtins (the weights-only allowlist), or
- a class (or a dtype/layout/device value) from torch, collections, numpy, pathlib or deepspeed: the
  records DCP and DeepSpeed pickle are dataclasses, enums and containers from those packages.

Anything else (a function from os, subprocess, builtins.eval, ...) fails the scan with the name of
the file and the global. Hand-written because no library does this for DCP's raw-pickle metadata:
`torch.serialization.get_unsafe_globals_in_checkpoint` reads only torch's zip files, and only
their GLOBAL opcodes (protocol 4 pickles name their globals through STACK_GLOBAL).
"""

from __future__ import annotations

import importlib
import io
import pickle
import zipfile
from pathlib import Path

import torch

# Functions (not classes) that a legitimate checkpoint calls while unpickling.
_FUNCTIONS = {
    "_codecs.encode", "copyreg._reconstructor", "collections.OrderedDict", "builtins.set", "builtins.frozenset",
    "builtins.bytearray", "builtins.complex", "builtins.slice", "builtins.object", "builtins.int",
    "builtins.float", "builtins.str", "builtins.bytes", "builtins.dict", "builtins.list", "builtins.tuple",
    "torch._tensor._rebuild_from_type_v2", "torch.serialization._get_layout",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
}
_FUNCTION_PREFIXES = ("torch._utils._rebuild_",)
_CLASS_PACKAGES = ("torch", "collections", "numpy", "deepspeed", "pathlib")
_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format, torch.device)
# Files whose loader unpickles without torch's weights-only guard (DCP metadata, any torch.save file).
_SUFFIXES = (".metadata", ".pt", ".pth", ".pkl")


class UnsafePickle(Exception):
    """A pickle names a global outside the allowlist (the message names it)."""


class _Stand:
    """What every allowed global becomes during the scan: accepts any construction, holds nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stand()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


def _allowed(module: str, name: str) -> bool:
    full = f"{module}.{name}"
    if full in _FUNCTIONS or full.startswith(_FUNCTION_PREFIXES):
        return True
    if not module.split(".")[0] in _CLASS_PACKAGES or name.startswith("__"):
        return False
    try:  # resolving imports a module of an allowed package; nothing from the file runs
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return False
    return isinstance(obj, type) or isinstance(obj, _VALUE_TYPES)


class _Scanner(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if not _allowed(module, name):
            raise UnsafePickle(f"{module}.{name}")
        return _Stand

    def persistent_load(self, pid):  # torch's zip files refer to tensor storages by id
        return _Stand()


def scan_bytes(data: bytes) -> None:
    """Raise UnsafePickle if the pickle in `data` names a disallowed global."""
    try:
        _Scanner(io.BytesIO(data)).load()
    except UnsafePickle:
        raise
    except Exception:  # malformed beyond the globals: left to the real loader to report
        pass


def scan_file(path: Path) -> None:
    """Scan one file: a torch zip (its data.pkl records) or a raw pickle."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for member in z.namelist():
                if member.endswith(".pkl"):
                    scan_bytes(z.read(member))
        return
    scan_bytes(path.read_bytes())


def unsafe_member(folder: Path) -> str | None:
    """'<file>: <global>' for the first unsafe pickle under `folder`, or None when all are safe."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name.endswith(_SUFFIXES):
            try:
                scan_file(path)
            except UnsafePickle as e:
                return f"{path.relative_to(folder)} would call {e}"
    return None
