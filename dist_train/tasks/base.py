"""A task: what a model is trained to do, and everything the trainers, the evaluator and `plan` need
to know about it, in one place instead of a branch in each of them.

A task owns its model builder, the number of outputs its optimizer routing sees, the size of one
example in tokens, a meta-device example batch for `plan`'s activation estimate, and the metrics an
evaluation adds beside the loss. The data sets declare which task they feed (`DataInfo.task`,
`tasks/names.py`); the model computes the loss (`model.loss(outputs, targets)`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from dist_train.errors import UserError

if TYPE_CHECKING:
    from dist_train.config.schema import Config, ModelSection
    from dist_train.data.base import DataInfo


class Task(ABC):
    name: str = "base"
    generates_text: bool = False  # train.sample_tokens applies
    exportable: bool = True  # `dist-train export` can rebuild the model from model.* and the data sizes
    meta_buildable: bool = True  # `plan` can build the model on the meta device (no memory, no compute)

    def build_model(self, cfg_model: "ModelSection", info: "DataInfo") -> nn.Module:
        """The model `model.name` names (its `ModelSpec` builds it), sized by the data set's `info`;
        UserError if it cannot read this task's data."""
        from dist_train.registry import MODELS
        from dist_train.tasks.names import DATA_WORDS

        spec = MODELS.get(cfg_model.name)
        if spec.task != self.name:
            raise UserError(f"model.name: {cfg_model.name} cannot read {DATA_WORDS.get(self.name, 'a ' + self.name)} data set "
                            f"(use {' or '.join(n for n in MODELS if MODELS.get(n).task == self.name)})")
        return spec.build(cfg_model.options(), info, cfg_model.block_size)

    @abstractmethod
    def num_outputs(self, info: "DataInfo") -> int:
        """Width of the model's output head (vocabulary or classes): optimizer routing keeps that head on AdamW."""

    def tokens_per_sample(self, cfg: "Config") -> int:
        """Tokens in one example, for tokens/s and energy per token (1 where an example is not text)."""
        return 1

    @abstractmethod
    def example_input(self, cfg: "Config", info: "DataInfo", batch: int, device: str = "meta") -> torch.Tensor:
        """A batch of `batch` model inputs (zeros) for shape-only passes such as `plan`'s estimate."""

    def build_for_run(self, cfg: "Config", info: "DataInfo", mesh) -> nn.Module:
        """The model a training run uses; `mesh` is the run's device mesh (None in one process), for
        tasks whose model spreads over ranks itself (the PDE experts)."""
        return self.build_model(cfg.model, info)

    def check(self, cfg: "Config", world_size: int) -> None:
        """Raise UserError naming the key when this task cannot run `cfg` on `world_size` ranks."""

    def plan_rows(self, cfg: "Config", model: nn.Module, dp: int) -> list[tuple[str, str]]:
        """Extra (label, text) rows for `dist-train plan`."""
        return []

    def eval_sums(self, outputs: torch.Tensor, targets: torch.Tensor, model: nn.Module) -> dict[str, float]:
        """Metrics beside the loss for one evaluation batch, as batch means (the evaluator averages
        them over batches and ranks and prefixes the split: `acc` -> `val_acc`)."""
        return {}

    def train_metrics(self, model: nn.Module) -> dict[str, float]:
        """Figures of the latest training step that the model keeps (e.g. the PDE solver's), this rank's."""
        return {}
