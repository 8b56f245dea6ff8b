"""A model family the config can name (`model.name`): the task whose data it reads, its own
`model.*` keys (an options model) and its builder.

Registering a `ModelSpec` under a name in `dist_train.registry.MODELS` is all it takes for
`model.name: <name>` to train, plan and export; the task consumes the model through the protocol
every model shares (`embed -> blocks -> head`, `loss`: see `models/base.py`), not through its name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Optional

from pydantic import Field
from torch import nn

from dist_train.config.options import NoOptions, Options

if TYPE_CHECKING:
    from dist_train.config.schema import Config
    from dist_train.data.base import DataInfo


class ModelSpec:
    """Subclass it, set `task` and `options`, and write `build`."""

    task: ClassVar[str]  # the task whose data sets it reads (a key of dist_train.tasks.TASKS)
    options: ClassVar[type[Options]] = NoOptions  # its own model.* keys

    @classmethod
    def build(cls, opts: Options, info: "DataInfo", block_size: int) -> nn.Module:
        """The model for `opts`, sized by the data set's `info` (vocabulary, classes, input shape);
        `block_size`: model.block_size, the context length of a language model. UserError naming
        the key if it cannot be built."""
        raise NotImplementedError

    @classmethod
    def describe(cls, opts: Options) -> str:
        """Its shape in a few words, for `dist-train plan`'s model row (the parameter count follows)."""
        layers, width = getattr(opts, "n_layer", None), getattr(opts, "width", None)
        return f"{layers} layers, width {width}" if layers is not None and width is not None else ""

    @classmethod
    def check_config(cls, cfg: "Config") -> None:
        """Raise ValueError naming the key when `cfg` as a whole is wrong for this model (at load)."""


class StackOptions(Options):
    """The options of a plain stack of equal blocks (the MLP and the CNN)."""

    n_layer: int = Field(4, ge=1, description="Blocks between the embedding and the head.")
    width: int = Field(128, ge=1, description="Width of every block: hidden units (mlp) or channels (cnn).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability in each block.")


def model_spec(name: str) -> type[ModelSpec]:
    from dist_train.registry import MODELS

    return MODELS.get(name)


def model_task(name: str) -> Optional[str]:
    """The task of the data sets `model.name` reads."""
    return model_spec(name).task
