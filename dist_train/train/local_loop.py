"""Local-learning pipeline training: this rank trains one gradient-isolated stage. Read it top to bottom.

The rank holds one `StageModule` (`dist_train.local.stage`): stage 0 reads the data, every later stage
receives what the stage before it sent, runs forward, its local loss (the task loss on the last
stage), backward and its own optimizer step, and streams its message on (`PipelineStep`). Nothing
flows backward unless a method's channel sends it (MAN's weights); no stage ever waits for another's
backward pass. The loop knows no method by name: methods differ only in their stage module and
channels. Everything around the steps (run directory, logs, checkpoints, resume, stop votes) is the
`RunSession`'s; each stage logs its own figures, and the last stage's lead rank (the collector)
writes the run's rows from every stage's.
"""

from __future__ import annotations

import json
from typing import Optional

import torch

from dist_train.config.layout import check_layout
from dist_train.config.schema import Config
from dist_train.data import build_dataset
from dist_train.local.build import build_stage, measured_cuts, stage_backend
from dist_train.local.evaluate import evaluate_pipeline, generate_pipeline
from dist_train.local.layout import StageLayout, stage_layout
from dist_train.local.link import StageLink
from dist_train.local.stats import StageStats, top_level_row
from dist_train.optim import lr_at
from dist_train.parallel.parallelize import transform_figures
from dist_train.runtime.dist import DistContext
from dist_train.tasks import get_task
from dist_train.telemetry import achieved_flops
from dist_train.train.checkpoint import checkpoint_layout
from dist_train.train.generate import write_sample
from dist_train.train.batches import StepBatches
from dist_train.train.hooks import Hooks
from dist_train.train.pipeline_step import PipelineStep, reads_data
from dist_train.train.session import Replicas, RunSession
from dist_train.train.transforms import build_transform

BALANCE_FILE = "stages/balance.json"  # the measured cuts, which a resumed run must keep


def train_local(cfg: Config, ctx: DistContext, command: list[str], data=None, hooks: Optional[Hooks] = None) -> dict:
    """Train this rank's stage for `cfg.train.steps` steps (resuming if a checkpoint says so); return
    the run's final row on every rank. `data` and `hooks` as for `loop.train`."""
    check_layout(cfg, ctx.world_size)
    layout = stage_layout(ctx.rank, ctx.world_size, cfg.parallel.stages)
    # The stop vote's lag covers how far stage 0 may run ahead of the last stage, so that the vote
    # never stalls the pipeline.
    session = RunSession(cfg, ctx, command, lag=2 + cfg.local.max_in_flight, replicas=_replicas(ctx, layout),
                         hooks=hooks)
    data = build_dataset(cfg.data, cfg.model.block_size) if data is None else data
    balance = measured_cuts(cfg, ctx, data, session.dir / BALANCE_FILE, resuming=session.resuming)
    stage, info, backend, transform = _build(cfg, ctx, data, layout, balance["cut_points"] if balance else None)
    session.hooks.on_setup(backend)
    link = StageLink(layout.prev_rank, layout.next_rank, ctx.device, cfg.local.max_in_flight,
                     send_targets=cfg.local.send_targets)
    batches = StepBatches(data, transform, transform.sampler(data), ctx.device, layout.dp_rank, layout.dp_size,
                          cfg.train.steps, reads=reads_data(cfg, stage), prefetch=cfg.data.prefetch)
    start = session.resume(backend, batches, transform,
                           checkpoint_layout(backend.name, layout.num_stages, info.cut_points))
    pipe = PipelineStep(session, stage, layout, data, link)
    session.track(pipe.channels)  # channels' state (the replay buffer) is part of the checkpoint
    if start == 0:  # each stage and replica its own stream (negatives, noise, dropout); resume restores it
        torch.manual_seed(cfg.train.seed + 1000 * layout.stage + layout.dp_rank)
    task = get_task(info.task)
    session.open(task.tokens_per_sample(cfg), collector=layout.last and layout.lead, stage=layout)
    if ctx.is_main and balance is not None:
        (session.dir / BALANCE_FILE).parent.mkdir(parents=True, exist_ok=True)
        (session.dir / BALANCE_FILE).write_text(json.dumps(balance, indent=1))
    stats = StageStats(layout, ctx.device, ctx.distributed)

    with session.running(), batches:
        for step in session.steps():
            backend.set_lr(lr := lr_at(step, cfg.optim, cfg.train.steps))
            batch = batches.next(step)  # every stage keeps the data position
            session.window.waited(batch.wait_s)
            pipe.run(step, batch, session.last_step)
            session.end_step(step, batch.indices)
            if session.logging():
                _log(session, pipe, stats, lr)
        session.finish()
        pipe.channels.finish()
        link.drain()
        stats.drain()
        sample = None
        if cfg.train.sample_tokens and task.generates_text:
            sample = generate_pipeline(cfg, ctx, data, backend, layout)
        ctx.barrier()
    last = _from_collector(ctx, layout, session.last)
    if sample is not None:
        last["sample"] = sample
        if layout.first and layout.lead:
            write_sample(cfg, session.dir, sample)
    return session.close(last)


def _build(cfg: Config, ctx: DistContext, data, layout: StageLayout, cuts) -> tuple:
    """This rank's stage module (cut at `cuts`; default: the config's) on its device, the backend
    over the stage's replicas with its optimizer, and the gradient transform attached to it."""
    stage, info = build_stage(cfg, data.info, layout, cuts)
    stage.to(ctx.device)
    backend = stage_backend(cfg, ctx, layout)
    transform = build_transform(cfg, data, ctx, stage)  # clip, or DP-SGD on this stage's own update
    backend.setup(stage, lambda m, mesh: transform.optimizer_spec(m, mesh, num_outputs=info.num_classes))
    transform.attach(backend)
    return stage, info, backend, transform


def _replicas(ctx: DistContext, layout: StageLayout) -> Replicas:
    """This stage's data-parallel replicas: the ranks [k*dp, (k+1)*dp) of the (stage x dp) mesh."""
    ranks = range(layout.stage * layout.dp_size, (layout.stage + 1) * layout.dp_size)
    return Replicas(ranks, ctx.dp_mesh.get_group() if layout.dp_size > 1 else None)


def _log(session: RunSession, pipe: PipelineStep, stats: StageStats, lr: float) -> None:
    """This stage's record for the window (with the evaluation, when due); the collector adds the
    run's row, built from every stage's record."""
    record = pipe.record(session.done, lr)
    record.update(session.energy_window(pipe.window.steps))
    record.update(session.run_metrics(), **transform_figures(session.cfg))
    if session.evaluating():
        record.update(evaluate_pipeline(session.cfg, session.ctx, pipe.data, pipe.backend, pipe.link, pipe.layout))
    session.log(record)
    stats.send(record)
    if pipe.layout.last and pipe.layout.lead:
        session.report(_run_row(session, pipe, record, stats.gather(record), lr))
    pipe.window.reset()


def _run_row(session: RunSession, pipe: PipelineStep, record: dict, rows: list[dict], lr: float) -> dict:
    """The run's row from every stage's figures (`rows`, in stage order; `record` is this last stage's
    own, with the evaluation), the run's energy so far and the achieved FLOP/s of the whole model."""
    cfg, ctx = session.cfg, session.ctx
    row = top_level_row(session.done, lr, rows, pipe.window.steps, cfg.train.batch_size, session.tokens_per_sample,
                        session.energy.source, {k: v for k, v in record.items() if k.startswith("val_")})
    row["energy_total_j"] = session.totals.add(row["energy_j"])
    row.update(achieved_flops(pipe.stage.model_flops_per_token, row["tokens_per_s"], ctx.device,
                              pipe.backend.compute_dtype, ctx.world_size))
    return row


def _from_collector(ctx: DistContext, layout: StageLayout, record: dict) -> dict:
    """The collector's final row, on every rank (rank 0 prints the summary)."""
    import torch.distributed as dist

    if not ctx.distributed:
        return record
    objs = [record if (layout.last and layout.lead) else None]
    dist.broadcast_object_list(objs, src=ctx.world_size - layout.dp_size)
    return objs[0]
