"""Local-learning pipeline training: this rank trains one gradient-isolated stage. Read it top to bottom.

The rank holds one `StageModule` (`dist_train.local.stage`): stage 0 reads the data, every later stage
receives what the stage before it sent, runs forward, its local loss (the task loss on the last
stage), backward and its own optimizer step, and streams its message on. Nothing flows backward
unless a method's channel sends it (MAN's weights); no stage ever waits for another's backward pass.
The loop knows no method by name: methods differ only in their stage module and channels.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from dist_train.config.layout import check_layout
from dist_train.config.schema import Config
from dist_train.data import build_dataset
from dist_train.local.build import build_stage, measured_cuts, stage_backend
from dist_train.local.channels import ChannelContext, build_channels
from dist_train.local.evaluate import evaluate_pipeline, generate_pipeline, replica_mean
from dist_train.local.layout import stage_layout
from dist_train.local.link import StageLink
from dist_train.local.stats import StageStats, top_level_row
from dist_train.optim import lr_at
from dist_train.runtime.dist import DistContext
from dist_train.tasks import get_task
from dist_train.telemetry import MetricsWriter, Progress, achieved_flops, peak_memory_bytes
from dist_train.telemetry.energy_log import per_rank_scalars
from dist_train.train import state as trainer_state
from dist_train.train.checkpoint import Checkpointer, checkpoint_layout, resolve_resume, resume
from dist_train.train.control import RunControl
from dist_train.train.energy import finish_energy, open_energy_log, run_totals
from dist_train.train.generate import write_sample
from dist_train.train.loop import due, write_run_info
from dist_train.train.transforms import build_transform


def train_local(cfg: Config, ctx: DistContext, command: list[str]) -> dict:
    check_layout(cfg, ctx.world_size)
    layout = stage_layout(ctx.rank, ctx.world_size, cfg.parallel.stages)
    data = build_dataset(cfg.data, cfg.model.block_size)
    run_dir = Path(cfg.run.dir) / cfg.run.name
    ckpt = Checkpointer(run_dir / "checkpoints", ctx, cfg.checkpoint.keep)
    balance = measured_cuts(cfg, ctx, data, run_dir / "stages" / "balance.json",
                            resuming=lambda: bool(resolve_resume(cfg.checkpoint.resume, ckpt.root)))
    stage, info = build_stage(cfg, data.info, layout, balance["cut_points"] if balance else None)
    stage.to(ctx.device)
    backend = stage_backend(cfg, ctx, layout)
    ckpt.layout = checkpoint_layout(backend.name, layout.num_stages, info.cut_points)
    # This stage's replicas are the energy group; a forced source this machine cannot read stops here.
    stage_ranks = range(layout.stage * layout.dp_size, (layout.stage + 1) * layout.dp_size)
    energy = open_energy_log(cfg, ctx, stage_ranks, backend.mesh.get_group() if layout.dp_size > 1 else None)
    transform = build_transform(cfg, data, ctx, stage)  # clip, or DP-SGD on this stage's own update
    backend.setup(stage, lambda m, mesh: transform.optimizer_spec(m, mesh, num_outputs=info.num_classes))
    transform.attach(backend)
    # Who reads data: the stages that need x, and every stage when targets stay off the wire.
    reads_data = stage.reads_data or not cfg.local.send_targets or not stage.receives_activations
    receives = not layout.first and stage.receives_activations
    link = StageLink(layout.prev_rank, layout.next_rank, ctx.device, cfg.local.max_in_flight,
                     send_targets=cfg.local.send_targets)
    sampler = transform.sampler(data)
    # The link's buffers have one shape per tag: micro-batches of varying size (DP-SGD's Poisson
    # batches) travel padded to the transform's physical size, and every stage slices its own count
    # back (all stages draw the same indices, so the count never needs to cross).
    pad_to = transform.physical_size

    def forward_backward(x, received, y, msg, is_last, step=None) -> torch.Tensor:
        """Forward, (send on), local loss, backward of one micro-batch; gradients accumulate."""
        send = None
        if msg is not None and not layout.last and stage.receives_activations:
            send = lambda h: link.send(_pad(h, pad_to), _pad(y, pad_to), msg)  # noqa: E731  (before the loss: the next stage starts)
        with backend.sync_context(is_last), backend.autocast():
            loss = backend.model(x=x, received=received, y=y, on_activation=send)
            if step is not None:
                loss = control.poison(loss, step)
        rows = (y if y is not None else received).size(0)
        transform.backward(backend, loss, rows, is_last)  # default: 1/grad_accum, the step sees the batch mean
        if step is not None and rows:  # an empty micro-batch (DP-SGD's Poisson draw) has no loss to judge
            control.observe(loss)
        return loss.detach()

    def train_on(x, received, y) -> None:  # one whole extra update (asynchronous mode's replay)
        forward_backward(x, received, y, None, True)
        backend.step(accept=math.isfinite)  # a replay is this rank's own: no vote, just never a NaN update

    # Non-finite guard over this stage's replicas; a stop vote whose lag covers how far stage 0 may
    # run ahead of the last stage, so that the vote never stalls the pipeline.
    control = RunControl(cfg, ctx, run_dir, ctx.rank, lag=2 + cfg.local.max_in_flight,
                         replica_group=backend.mesh.get_group() if layout.dp_size > 1 else None,
                         replicas=layout.dp_size)
    # Resume before touching the run directory (channels' state is part of the checkpoint).
    box: dict = {}
    with transform.checkpointing():
        start, resume_from = resume(ckpt, cfg.checkpoint.resume, backend, sampler, on_state=box.update)
    if start:
        transform.load_state_dict(box.get("transform"))
    channels = build_channels(stage, ChannelContext(cfg, layout, link, ctx.device, start, train_on))
    for ch in channels:
        if ch.state_dict() is not None and ch.name in box:
            ch.load_state_dict(box[ch.name])
    if start == 0:  # each stage and replica its own stream (negatives, noise, dropout); resume restores it
        torch.manual_seed(cfg.train.seed + 1000 * layout.stage + layout.dp_rank)
    collector = layout.last and layout.lead  # writes the run's top-level metrics
    if ctx.is_main:
        write_run_info(cfg, ctx, run_dir, command, resume_from, energy)
        if balance is not None:  # the cuts a resumed run must keep
            (run_dir / "stages").mkdir(parents=True, exist_ok=True)
            (run_dir / "stages" / "balance.json").write_text(json.dumps(balance, indent=1))
    ctx.barrier()  # the run dir exists before the collector opens its writer there
    writer = MetricsWriter(run_dir, enabled=collector, tensorboard=cfg.telemetry.tensorboard)
    stage_writer = MetricsWriter(run_dir / "stages" / f"stage{layout.stage}", enabled=layout.lead,
                                 tensorboard=cfg.telemetry.tensorboard)
    for w in (writer, stage_writer):
        w.truncate_from(start + 1)
    control.resume(start, box)
    stats = StageStats(layout, ctx.device, ctx.distributed)
    progress = Progress(total=cfg.train.steps, initial=start, enabled=cfg.telemetry.progress if collector else False,
                        echo=collector and cfg.telemetry.progress != "off")
    totals = run_totals(cfg, writer, energy, progress)  # the collector's writer keeps the run's total
    tokens_per_sample = get_task(info.task).tokens_per_sample(cfg)
    last: dict = {}

    with ctx.phase("steady"), control.signals():
        ctx.barrier()
        control.started(start, resume_from)
        energy.start()
        t0, busy, loss_acc, window, applied = time.perf_counter(), 0.0, torch.zeros((), device=ctx.device), 0, 0
        done = start
        for step in range(start, cfg.train.steps):
            if stop := transform.stop_reason():  # every stage reaches the same verdict (same ledger)
                progress.note(stop)
                break
            last_step = control.last_step()  # preempted or a non-finite stop: every stage agrees
            backend.set_lr(lr := lr_at(step, cfg.optim, cfg.train.steps))
            for ch in channels:
                ch.before_step(step)
            idx = sampler.next_indices(layout.dp_rank, layout.dp_size)  # every stage keeps the data position
            parts = [part for part in transform.micro_batches(idx) if part.numel()]
            step_loss = torch.zeros((), device=ctx.device)
            for m, part in enumerate(parts):
                msg, x, received, y = (step << 20) + m, None, None, None
                if reads_data:
                    x, y = (t.to(ctx.device) for t in data.get_batch("train", part))
                if receives:
                    for ch in channels:
                        ch.before_receive()
                    # Post the next receive early unless this is the last message (a varying count
                    # only looks ahead within the step).
                    ahead = m + 1 < len(parts) or (pad_to is None and step + 1 < cfg.train.steps and not last_step)
                    received, sent_y = link.recv(msg, prefetch=ahead)
                    if pad_to is not None:  # padded on the wire: this micro-batch's own rows
                        received, sent_y = received[:part.numel()], sent_y[:part.numel()] if sent_y is not None else None
                    y = sent_y if sent_y is not None else y
                    for ch in channels:
                        ch.on_received(x if stage.reads_data else None, received, y, step)
                busy_t0 = time.perf_counter()
                # A device tensor, read at log time: a float() here would sync the GPU every micro-batch.
                step_loss += forward_backward(x if stage.reads_data else None, received, y, msg,
                                              m == len(parts) - 1, step) / len(parts)
                busy += time.perf_counter() - busy_t0
            busy_t0 = time.perf_counter()
            for ch in channels:
                ch.before_update()
            backend.step(transform, accept=control.accept(step))  # never a non-finite update
            busy += time.perf_counter() - busy_t0
            if control.applied:  # a dropped step's (non-finite) loss stays out of the logged mean
                loss_acc, applied = loss_acc + step_loss, applied + 1
            for ch in channels:
                ch.after_step(step)
            stage_writer.scalars(step + 1, transform.step_scalars())
            window += 1
            done = step + 1
            control.end_step(done, idx)
            evaluating = due(done, cfg.train.eval_every) or done == cfg.train.steps
            if due(done, cfg.train.log_every) or evaluating:
                elapsed = time.perf_counter() - t0
                record = _stage_record(cfg, ctx, backend, link, channels, layout.stage, done, lr,
                                       float(loss_acc) / applied if applied else None, window, elapsed, busy)
                record.update(energy.window(window * cfg.train.batch_size, tokens_per_sample, window))
                record.update(transform.metrics(), **control.metrics())
                if evaluating:
                    record.update(evaluate_pipeline(cfg, ctx, data, backend, link, layout))
                stage_writer.log(done, record)
                stage_writer.scalars(done, per_rank_scalars(record, stage_ranks))
                stats.send(record)
                if collector:
                    last = top_level_row(done, lr, stats.gather(record), window, cfg.train.batch_size,
                                         tokens_per_sample, energy.source,
                                         {k: v for k, v in record.items() if k.startswith("val_")})
                    last["energy_total_j"] = totals.add(last["energy_j"])
                    last.update(achieved_flops(stage.model_flops_per_token, last["tokens_per_s"], ctx.device,
                                               backend.compute_dtype, ctx.world_size))
                    writer.log(done, last)
                    _progress(progress, cfg, last)
                t0, busy, loss_acc, window, applied = time.perf_counter(), 0.0, torch.zeros((), device=ctx.device), 0, 0
            if due(done, cfg.checkpoint.every) or (cfg.checkpoint.at_end and done == cfg.train.steps):
                # Every stage has finished step `done` when the save's barrier passes, and the
                # activations of step `done` have been consumed: a consistent cut of the pipeline.
                _save(ckpt, done, backend, sampler, transform, channels, control)
                t0 = time.perf_counter()
            if last_step:
                progress.note(f"stopping after step {done}: {control.reason}")
                break
        if (start < done < cfg.train.steps and (cfg.checkpoint.at_end or control.reason)
                and not due(done, cfg.checkpoint.every)):
            # Stopped early (privacy budget, preemption, non-finite step): keep the work.
            _save(ckpt, done, backend, sampler, transform, channels, control)
        control.finish()
        for ch in channels:
            ch.finish()
        link.drain()
        stats.drain()
        if collector:
            last.update(finish_energy(cfg, run_dir, energy, totals, done, tokens_per_sample))
        progress.close()
        sample = (generate_pipeline(cfg, ctx, data, backend, layout)
                  if cfg.train.sample_tokens and get_task(info.task).generates_text else None)
        ctx.barrier()
    last = _from_collector(ctx, layout, last)
    if sample is not None:
        last["sample"] = sample
        if layout.first and layout.lead:
            write_sample(cfg, run_dir, sample)
    writer.close()
    stage_writer.close()
    energy.close()
    if control.reason:
        last.update(stopped=control.reason, stopped_at=done, exit_code=control.exit_code)
    return last


def _pad(t: torch.Tensor, rows) -> torch.Tensor:
    """`t` with zero rows appended up to `rows` (None: as it is)."""
    if rows is None or t.size(0) == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.size(0), *t.shape[1:]))])


def _save(ckpt, done, backend, sampler, transform, channels, control: RunControl) -> None:
    saved = trainer_state.capture(done, sampler.state_dict())
    saved.update(control.state_dict())
    saved.update({ch.name: s for ch in channels if (s := ch.state_dict()) is not None})
    if (extra := transform.state_dict()) is not None:
        saved["transform"] = extra  # the privacy accountant: what was spent survives a resume
    with transform.checkpointing():
        ckpt.save(done, backend, saved)


def _stage_record(cfg, ctx, backend, link, channels, stage: int, done, lr, loss, window, elapsed, busy) -> dict:
    """This stage's logged figures for a window of `window` steps: the loss is the mean over the window's
    applied steps and the stage's replicas (which drop the same steps); None when every step was dropped."""
    record = {"step": done, "loss": None if loss is None else replica_mean(backend, loss), "lr": lr,
              "samples_per_s": window * cfg.train.batch_size / elapsed,
              "idle_fraction": max(0.0, 1.0 - busy / elapsed),
              "bytes_sent": link.bytes_sent, "tensors_sent": link.tensors_sent,
              "sent_requires_grad": link.sent_requires_grad,
              "peak_mem_bytes": peak_memory_bytes(ctx.device), "stage": stage}
    for ch in channels:
        record.update(ch.metrics())
    return record


def _progress(progress: Progress, cfg, row: dict) -> None:
    progress.update(row["step"], {"loss": row["loss"]})
    if "val_loss" in row:
        progress.evaluation(cfg.train.steps, row)


def _from_collector(ctx: DistContext, layout, record: dict) -> dict:
    """The collector's final row, on every rank (rank 0 prints the summary)."""
    import torch.distributed as dist

    if not ctx.distributed:
        return record
    objs = [record if (layout.last and layout.lead) else None]
    dist.broadcast_object_list(objs, src=ctx.world_size - layout.dp_size)
    return objs[0]
