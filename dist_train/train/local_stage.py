"""What one rank of a local-learning pipeline holds: its stage as a module, and the backend that
makes the stage's data-parallel replicas agree.

The module's forward does a whole local update's forward (stage, then auxiliary head and local loss,
or the task loss on the last stage), so a DDP/FSDP2/DeepSpeed wrapper sees every parameter it
has to reduce. Called without targets it runs only the main path (evaluation, generation).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from dist_train.config.schema import Config
from dist_train.errors import UserError
from dist_train.local.layout import StageLayout
from dist_train.local.method import LocalMethod, StageInfo
from dist_train.local.methods import get_method
from dist_train.local.balance import measure_block_costs
from dist_train.local.split import Stage, balanced_cuts, stage_block_ranges
from dist_train.models import build_model
from dist_train.models.loss import cross_entropy
from dist_train.parallel import backend_class
from dist_train.parallel.base import Backend
from dist_train.runtime.dist import DistContext
from dist_train.train.checkpoint import resolve_resume


class StageTrainer(nn.Module):
    """The stage's blocks plus (except on the last stage) the method's auxiliary head."""

    def __init__(self, stage: Stage, head: Optional[nn.Module], method: LocalMethod, info: StageInfo):
        super().__init__()
        self.stage, self.head = stage, head
        self.method, self.info = method, info

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.stage.blocks)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None,
                on_activation: Optional[Callable[[torch.Tensor], None]] = None):
        """Main-path output for `x`; with targets `y`, (output, loss). `on_activation` gets the output
        before the loss is computed, so the next stage can start while this one goes on."""
        h = self.stage(x)
        if y is None:
            return h
        if on_activation is not None:
            on_activation(h)
        if self.head is None:  # the last stage: its output is the logits, its loss the task loss
            return h, cross_entropy(h.float(), y)
        return h, self.method.local_loss(self.head, h, y, x.detach(), self.info)


class NoPropTrainer(nn.Module):
    """A NoProp stage: diffusion step t = index + 1. It reads x itself and never needs the previous
    stage in training; at inference it refines the label embedding z the previous stage produced."""

    def __init__(self, stage: nn.Module, method: LocalMethod, info: StageInfo):
        super().__init__()
        self.stage, self.method, self.info = stage, method, info

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.stage.blocks)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                on_activation=None):
        if y is not None:
            return None, self.method.loss(self.stage, x, y, self.info)
        if z is None:
            z = self.method.initial_z(x, self.info)
        z = self.method.denoise(self.stage, x, z, self.info)
        return self.method.logits(self.stage, z, self.info) if self.info.index == self.info.num_stages - 1 else z


def build_stage(cfg: Config, data_info, layout: StageLayout,
                cuts: Optional[list[int]] = None) -> tuple[nn.Module, StageInfo]:
    """Build the full model from the run's seed (identical on every rank), keep this rank's stage,
    and let the rest go: a rank holds only its own blocks and head. `cuts`: block indices where
    stages begin (default: `parallel.cut_points`, else balanced by parameter count)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data_info)
    ranges = stage_block_ranges(model, layout.num_stages, cuts if cuts is not None else cfg.parallel.cut_points)
    mine = ranges[layout.stage]
    method = get_method(cfg.local.method)
    info = StageInfo(index=layout.stage, num_stages=layout.num_stages, task=model.task, width=cfg.model.width,
                     num_classes=data_info.vocab_size if model.task == "lm" else data_info.num_classes,
                     later_blocks=tuple(model.blocks[i] for i in range(mine.stop, len(model.blocks))),
                     model_name=cfg.model.name)
    if method.independent_stages:
        trainer: nn.Module = NoPropTrainer(method.build_stage(model, mine, info), method, info)
    else:
        stage = Stage(model, mine, first=layout.first, last=layout.last)
        head = None if layout.last else method.build_head(info)
        trainer = StageTrainer(stage, head, method, info)
    # The later blocks were only an architecture reference (AugLocal copies them): drop them now.
    info = dataclasses.replace(info, later_blocks=())
    trainer.info = info
    return trainer, info


def measured_cuts(cfg: Config, ctx: DistContext, data, saved: Path) -> Optional[dict]:
    """`parallel.balance: measured` (and no explicit cut points): rank 0 times every block on one
    micro-batch on its device and every rank takes its cuts. A run that resumes keeps the cuts it
    was saved with (`saved`, written beside the stage metrics), or its shards would not fit."""
    if cfg.parallel.stages == 1 or cfg.parallel.cut_points is not None or cfg.parallel.balance != "measured":
        return None
    choice = None
    if ctx.rank == 0:
        try:
            if saved.is_file() and resolve_resume(cfg.checkpoint.resume, saved.parent.parent / "checkpoints"):
                choice = json.loads(saved.read_text())
            else:
                torch.manual_seed(cfg.train.seed)
                model = build_model(cfg.model, data.info)
                micro = cfg.train.batch_size // (ctx.world_size // cfg.parallel.stages * cfg.train.grad_accum)
                example, _ = data.get_batch("train", torch.arange(micro))
                costs = measure_block_costs(model, example, ctx.device)
                choice = {"balance": "measured", "device": str(ctx.device), "micro_batch": micro,
                          "block_costs_s": costs, "cut_points": balanced_cuts(costs, cfg.parallel.stages)}
        except UserError as e:  # every rank must learn of it, or the others wait in the broadcast
            choice = {"error": str(e)}
    if ctx.distributed:
        import torch.distributed as dist

        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    if "error" in choice:
        raise UserError(choice["error"])
    return choice


def stage_backend(cfg: Config, ctx: DistContext, layout: StageLayout) -> Backend:
    """The configured backend over this stage's replicas (the `dp` row of a stage x dp mesh).

    One replica has nothing to average or shard, so it runs unwrapped whatever the backend."""
    key = f"stage{layout.stage}"
    mesh = None
    if ctx.distributed:
        from torch.distributed.device_mesh import init_device_mesh

        # Collective: every rank builds the whole mesh, then keeps its stage's row.
        mesh = init_device_mesh(ctx.device.type, (layout.num_stages, layout.dp_size),
                                mesh_dim_names=("stage", "dp"))["dp"]
    name = cfg.parallel.backend if layout.dp_size > 1 else "none"
    return backend_class(name)(cfg, ctx, mesh=mesh, checkpoint_key=key)
