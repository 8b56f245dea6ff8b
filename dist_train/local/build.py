"""Building what one rank of a local-learning pipeline holds: its StageModule (the method's own,
see `dist_train.local.stage`), the stage cuts, and the backend that makes the stage's data-parallel
replicas agree.

The StageModule's forward does a whole local update's forward (stage, then auxiliary head and local
loss, or the task loss on the last stage), so a DDP/FSDP2/DeepSpeed wrapper sees every parameter it
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
from dist_train.local.method import StageInfo
from dist_train.local.methods import get_method
from dist_train.local.balance import measure_block_costs
from dist_train.local.split import balanced_cuts, stage_block_ranges
from dist_train.tasks import get_task
from dist_train.models import build_model
from dist_train.parallel import backend_class
from dist_train.parallel.base import Backend
from dist_train.parallel.parallelize import apply_model_transforms
from dist_train.runtime.dist import DistContext


def build_stage(cfg: Config, data_info, layout: StageLayout,
                cuts: Optional[list[int]] = None) -> tuple[nn.Module, StageInfo]:
    """Build the full model from the run's seed (identical on every rank), keep this rank's stage,
    and let the rest go: a rank holds only its own blocks and head. `cuts`: block indices where
    stages begin (default: `parallel.cut_points`, else balanced by parameter count). The stage's
    blocks get the run's model transforms (`parallel/parallelize.py`), numbered as in the model."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data_info)
    stage, info = stage_of(cfg, model, data_info, layout, cuts)
    apply_model_transforms(stage, cfg, first_block=(0, *info.cut_points)[info.index])
    return stage, info


def stage_of(cfg: Config, model: nn.Module, data_info, layout: StageLayout,
             cuts: Optional[list[int]] = None) -> tuple[nn.Module, StageInfo]:
    """The stage module of `layout` over `model`'s own sub-modules (its main path shares them:
    `dist-train export` loads every stage into one model this way)."""
    ranges = stage_block_ranges(model, layout.num_stages, cuts if cuts is not None else cfg.parallel.cut_points)
    mine = ranges[layout.stage]
    method = get_method(cfg.local.method, cfg.local.options(cfg.local.method))
    info = StageInfo(index=layout.stage, num_stages=layout.num_stages, task=model.task, width=getattr(model, "width", None) or cfg.model.width,
                     num_classes=get_task(model.task).num_outputs(data_info),
                     later_blocks=tuple(model.blocks[i] for i in range(mine.stop, len(model.blocks))),
                     model_name=getattr(model, "local_kind", cfg.model.name), input_shape=tuple(data_info.input_shape or ()),
                     cut_points=tuple(r.start for r in ranges[1:]), image_norm=data_info.image_norm)
    stage = method.build_stage(model, mine, info)
    # The whole model's training FLOPs per token (auxiliary heads left out, as MFU counts the model's
    # own work): the pipeline's top-level row reports achieved FLOP/s and MFU from it.
    stage.model_flops_per_token = model.num_flops_per_token() if hasattr(model, "num_flops_per_token") else None
    # The later blocks were only an architecture reference (AugLocal copies them): drop them now.
    info = dataclasses.replace(info, later_blocks=())
    stage.info = info
    return stage, info


def measured_cuts(cfg: Config, ctx: DistContext, data, saved: Path, resuming: Callable[[], bool]) -> Optional[dict]:
    """`parallel.balance: measured` (and no explicit cut points): rank 0 times every block on one
    micro-batch on its device and every rank takes its cuts. A run that resumes (`resuming()`) keeps
    the cuts it was saved with (`saved`, written beside the stage metrics), or its shards would not fit."""
    if cfg.parallel.stages == 1 or cfg.parallel.cut_points is not None or cfg.parallel.balance != "measured":
        return None
    choice = None
    if ctx.rank == 0:
        try:
            if saved.is_file() and resuming():
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
    mesh = ctx.dp_mesh  # the run's (stage x dp) mesh, sliced to this stage's row
    name = cfg.parallel.backend if layout.dp_size > 1 else "none"
    return backend_class(name)(cfg, ctx, mesh=mesh, checkpoint_key=key)
