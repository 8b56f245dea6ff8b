"""`dist-train plan`: validate config and layout and print what a run would do, training nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from dist_train.config import load_config
from dist_train.config.layout import check_layout
from dist_train.config.schema import Config
from dist_train.data import build_dataset
from dist_train.models import count_parameters
from dist_train.registry import BACKENDS, DATASETS, LOCAL_METHODS, MODELS, OPTIMIZERS
from dist_train.runtime.env import discover
from dist_train.tasks import get_task
from dist_train.train.checkpoint import resolve_resume


def activation_bytes(model: torch.nn.Module, example: torch.Tensor) -> int:
    """Bytes of leaf-module outputs for one micro-batch — roughly what autograd keeps for backward.

    Run on the meta device, so it costs no memory and no compute whatever the model size.
    """
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * 4  # fp32: the estimate is for the default precision

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return total


@dataclass
class Plan:
    """`dist-train plan`'s rows, in order, and what a component's `plan_rows` may read of the run."""

    cfg: Config
    world: int
    dp: int
    data: object  # the built data set
    model: torch.nn.Module
    rows: list[list[str]] = field(default_factory=list)

    def set(self, label: str, text: str, before: Optional[str] = None) -> None:
        """Replace the row `label`, or add it: before the row `before` if given, else at the end."""
        for row in self.rows:
            if row[0] == label:
                row[1] = text
                return
        at = next((i for i, row in enumerate(self.rows) if row[0] == before), len(self.rows))
        self.rows.insert(at, [label, text])

    def table(self) -> str:
        width = max(len(k) for k, _ in self.rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.rows)


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass
class Estimate:
    """What a run of `cfg` on `world` ranks holds per rank, by plan's estimate (bytes), and what the
    estimate was made from: the model built on the meta device, the data set, the layout."""

    cfg: Config
    world: int
    stages: int
    dp: int
    data: object
    task: object
    model: torch.nn.Module
    backend: type
    optimizer: type
    micro: int
    weights: float
    grads: float
    optimizer_bytes: float
    optimizer_text: str
    activations: Optional[float]  # None: the task gives no example input to estimate them from

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer_bytes + (self.activations or 0.0)

    def figures(self) -> str:
        return (f"weights {_mb(self.weights)}, grads {_mb(self.grads)}, optimizer {_mb(self.optimizer_bytes)}, "
                + (f"activations ~{_mb(self.activations)} (estimate, fp32)" if self.activations is not None
                   else "activations not estimated"))


def estimate(cfg: Config, world: int, data=None) -> Estimate:
    """Plan's memory estimate per rank for `cfg` on `world` ranks (layout already checked); the model is
    built on the meta device (no memory, no compute) and checked against what the config's features
    need of it. `data`: the data set `cfg.data` names, if already built."""
    from dist_train.models.protocol import check_model

    data = build_dataset(cfg.data, cfg.model.block_size) if data is None else data
    task = get_task(data.info.task)
    with torch.device("meta" if task.meta_buildable else "cpu"):
        model = task.build_for_run(cfg, data.info, mesh=None)
    check_model(model, cfg)
    stages, dp = cfg.parallel.stages, world // cfg.parallel.stages
    optimizer = OPTIMIZERS.get(cfg.optim.name)
    micro = optimizer.plan_micro_batch(cfg, cfg.train.batch_size // (dp * cfg.train.grad_accum))
    example = task.example_input(cfg, data.info, micro)
    # A stage with one replica runs unwrapped: nothing to average or shard.
    backend = BACKENDS.get("none" if stages > 1 and dp == 1 else cfg.parallel.backend)
    w, g, o = backend.bytes_per_param(dp, cfg)
    # A pipeline rank holds one stage: about 1/K of the parameters and of the activations.
    per_rank = count_parameters(model) / stages
    optim_bytes, optim_text = optimizer.state_bytes(cfg, model, task.num_outputs(data.info), backend, dp, o)
    act = None
    if example is not None:
        try:
            act = activation_bytes(model, example) / stages
        except (NotImplementedError, RuntimeError):  # a model of one's own whose forward needs real data
            pass
    return Estimate(cfg, world, stages, dp, data, task, model, backend, optimizer, micro, per_rank * w, per_rank * g,
                    optim_bytes / stages, optim_text, act)


def plan(config: str, overrides: list[str], nproc: Optional[int], nnodes: int) -> str:
    cfg: Config = load_config(config, overrides)
    world = (nproc * nnodes) if nproc else discover(use_mpi4py=False).world_size
    check_layout(cfg, world)
    e = estimate(cfg, world)
    stages, dp, data, task, model, backend, optimizer, micro = (
        e.stages, e.dp, e.data, e.task, e.model, e.backend, e.optimizer, e.micro)
    device = "cuda (nccl)" if torch.cuda.is_available() and cfg.runtime.device != "cpu" else "cpu (gloo)"
    resume = resolve_resume(cfg.checkpoint.resume, Path(cfg.run.dir) / cfg.run.name / "checkpoints")
    zero = f" ZeRO-{cfg.parallel.zero_stage}" if backend.name == "deepspeed" else ""
    where = (" inside each stage" if dp > 1 else " (one replica per stage)") if stages > 1 else ""
    p = Plan(cfg, world, dp, data, model)
    p.set("run", f"{cfg.run.name} -> {Path(cfg.run.dir) / cfg.run.name}")
    p.set("world", f"{world} ranks ({nnodes} node(s) x {world // nnodes}), device {device}")
    r = cfg.parallel.dp_replicate  # HSDP: the same dp ranks as replicas x shard groups
    p.set("mesh", (f"stage={stages} x " if stages > 1 else "") + f"dp={dp}"
          + (f" (dp_replicate={r} x dp_shard={dp // r})" if r > 1 else ""))
    p.set("backend", f"{backend.name}{zero}{where}, precision {cfg.parallel.mixed_precision}")
    shape = MODELS.get(cfg.model.name).describe(cfg.model.options())
    n = count_parameters(model)
    count = f"{n / 1e9:.2f} B parameters ({n:,})" if n >= 1e9 else f"{n / 1e6:.2f} M parameters"
    p.set("model", f"{cfg.model.name}: {shape + ', ' if shape else ''}{count}")
    p.set("data", f"{cfg.data.name}: {data.info.train_size:,} train / {data.info.val_size:,} val")
    p.set("batch", f"{cfg.train.batch_size} global = {dp} dp ranks x {cfg.train.grad_accum} micro-batches x {micro}")
    p.set("memory/rank", e.figures())
    p.set("optimizer", f"{e.optimizer_text} lr {cfg.optim.lr:g}, {cfg.optim.schedule} after {cfg.optim.warmup_steps} warm-up")
    p.set("steps", f"{cfg.train.steps}, checkpoint every {cfg.checkpoint.every or 'end'} (keep {cfg.checkpoint.keep}), "
                   f"resume: {resume if resume else 'fresh start'}")
    if stages > 1:
        p.set("stages", _stages_row(cfg, model, world), before="model")
    for label, text in task.plan_rows(cfg, model, dp):
        p.set(label, text, before="optimizer")
    for component in (DATASETS.get(cfg.data.name), backend, optimizer):
        component.plan_rows(cfg, p)
    return p.table()


def _stages_row(cfg: Config, model: torch.nn.Module, world: int) -> str:
    """The pipeline in words: each stage's parts and the traffic, as the method describes them."""
    from dist_train.local.split import stage_block_ranges

    ranges = stage_block_ranges(model, cfg.parallel.stages, cfg.parallel.cut_points)
    parts, traffic = LOCAL_METHODS.get(cfg.local.method).plan_stages(cfg, ranges)
    if cfg.parallel.balance == "measured" and cfg.parallel.cut_points is None:
        traffic += "; cuts shown by parameter count, the run measures its own at start"
    return (f"{cfg.local.method}: " + " | ".join(parts) +
            f"; {world // cfg.parallel.stages} data-parallel rank(s) per stage; {traffic}")
