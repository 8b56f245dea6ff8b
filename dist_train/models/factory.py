"""Models of one's own, without a `ModelSpec` subclass: a factory function that returns the model.

From a config, by import path (nothing to register):

    model:
      name: "my_package.my_models:build"      # or "path/to/file.py:build"
      options: {n_layer: 4, width: 256}       # passed to the factory as keyword arguments

From Python, by name:

    from dist_train.models import register_model
    register_model("my_decoder", build, task="lm")

The factory is called with the data set's sizes as keyword arguments, then `model.options`:
    token data (task "lm"):       factory(vocab_size=V, block_size=T, **options)
    image data (task "classify"): factory(num_classes=C, input_shape=(C_in, H, W), **options)
and must return a `torch.nn.Module` mapping a batch of inputs to outputs (logits) that its `loss`
(or, when the model has none, mean cross-entropy) compares with the targets. What each training
feature needs of the model is `models/protocol.py`'s.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable, ClassVar, Optional

from pydantic import Field
from torch import nn

from dist_train.config.options import Options
from dist_train.errors import UserError
from dist_train.models.loss import cross_entropy
from dist_train.models.spec import ModelSpec

# The data set's sizes each task hands a factory, by keyword: (keyword, DataInfo field or "block_size").
SIZES: dict[str, tuple[str, ...]] = {"lm": ("vocab_size", "block_size"), "classify": ("num_classes", "input_shape")}


class FactoryOptions(Options):
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to the model's factory besides the data set's sizes (a model named by import path, or registered with register_model without an options model).")


class FactorySpec(ModelSpec):
    """A model built by a factory function; subclassed per factory by `factory_spec`."""

    options = FactoryOptions
    factory: ClassVar[Callable[..., nn.Module]]
    label: ClassVar[str]  # how messages name the model: its model.name

    @classmethod
    def build(cls, opts: Options, info, block_size: int) -> nn.Module:
        sizes = {key: (block_size if key == "block_size" else getattr(info, key)) for key in SIZES[cls.task]}
        given = opts.options if isinstance(opts, FactoryOptions) else opts.model_dump()
        taken = sorted(set(sizes) & set(given))
        if taken:
            raise UserError(f"model.options: {', '.join(taken)} come(s) from the data set; remove it")
        try:
            model = cls.factory(**sizes, **given)
        except TypeError as err:  # a keyword the factory does not take (a model.options typo) or lacks
            raise UserError(f"model.name: {cls.label} cannot be called with {_keywords(sizes, given)}: {err}") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"model.name: {cls.label} returned {type(model).__name__}, not a torch.nn.Module")
        if not isinstance(getattr(model, "task", None), str):
            model.task = cls.task  # which data it reads, as every built-in model states it
        if not callable(getattr(model, "loss", None)):
            model.loss = cross_entropy  # the protocol's default: mean cross-entropy of logits vs targets
        return model

    @classmethod
    def describe(cls, opts: Options) -> str:
        given = opts.options if isinstance(opts, FactoryOptions) else opts.model_dump()
        return ", ".join(f"{k}={v}" for k, v in given.items()) or super().describe(opts)


def factory_spec(name: str, factory: Callable[..., nn.Module], task: str,
                 options: Optional[type[Options]] = None) -> type[FactorySpec]:
    """A `ModelSpec` that builds `factory(**sizes, **options)` for data sets of `task` ("lm" or
    "classify"); `options`: an options model whose fields become the model.* keys (default:
    the free mapping model.options)."""
    if task not in SIZES:
        raise ValueError(f"model {name}: task must be one of {', '.join(map(repr, SIZES))}, got {task!r}")
    if not callable(factory):
        raise ValueError(f"model {name}: {factory!r} is not callable")
    attrs = {"task": task, "factory": staticmethod(factory), "label": name, "__doc__": f"`model.name: {name}`."}
    if options is not None:
        attrs["options"] = options
    return type(f"FactorySpec[{name}]", (FactorySpec,), attrs)


def register_model(name: str, builder: Callable[..., nn.Module], task: str = "lm",
                   options: Optional[type[Options]] = None, replace: bool = False) -> type[FactorySpec]:
    """Register `builder` as `model.name: <name>` in `dist_train.registry.MODELS`; returns its spec.
    `builder(**sizes, **options)` returns the model (see this module's docstring for the sizes);
    `options`: an `Options` model of its own model.* keys (default: the mapping model.options)."""
    from dist_train.registry import MODELS

    return MODELS.register(name, factory_spec(name, builder, task, options), replace=replace)


def spec_for_import_path(name: str) -> type[FactorySpec]:
    """The spec of `model.name: "module:attr"` (MODELS makes one on first sight of such a name).
    The module is imported as `python -m` finds modules (the working directory first), or from a
    file for "path/to/file.py:attr". Its task: the factory's `task` attribute if it has one, else
    "classify" when it takes `num_classes`, else "lm". ValueError (one line) when it does not resolve."""
    module_name, _, attr = name.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"expected a registered model or an import path 'package.module:factory', got {name!r}")
    try:
        if module_name.endswith(".py"):
            from dist_train.registry import import_plugins

            import_plugins([module_name])  # imported under its stem, its folder on the path (as plugins: are)
            module = sys.modules[os.path.splitext(os.path.basename(module_name))[0]]
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except UserError as err:  # import_plugins' "plugins: ..." message, without its key
        raise ValueError(str(err).partition(": ")[2]) from None
    except ImportError as err:
        raise ValueError(f"cannot import {module_name!r} ({err})") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ValueError(f"{name} is a {type(factory).__name__}, not a function that returns the model")
    return factory_spec(name, factory, _task_of(factory))


def _task_of(factory: Callable) -> str:
    task = getattr(factory, "task", None)
    if isinstance(task, str):
        return task
    try:
        takes = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return "lm"
    return "classify" if "num_classes" in takes else "lm"


def _keywords(sizes: dict, given: dict) -> str:
    return ", ".join(f"{k}=" for k in [*sizes, *given])
