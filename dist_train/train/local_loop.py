"""Local-learning pipeline training: this rank trains one gradient-isolated stage.

Stage 0 reads the data; every later stage receives the activation (and, by default, the targets)
from the stage before it, runs forward, its local loss (the task loss on the last stage), backward
and its own optimizer step, and streams the detached activation on. Nothing ever flows backward, so
no stage waits for another's backward pass: after a one-time fill the stages run concurrently.
NoProp stages need no activations at all: each reads (x, y) itself and trains with zero traffic.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dist_train.config.layout import check_layout
from dist_train.config.schema import Config
from dist_train.data import build_dataset
from dist_train.local.layout import stage_layout
from dist_train.local.link import StageLink
from dist_train.local.methods.man import flat_block_weights
from dist_train.local.replay import ReplayBuffer
from dist_train.optim import lr_at, optimizer_spec
from dist_train.runtime.dist import DistContext
from dist_train.telemetry import MetricsWriter, Progress, peak_memory_bytes
from dist_train.train import state as trainer_state
from dist_train.train.checkpoint import Checkpointer, resume
from dist_train.train.local_eval import evaluate_pipeline, generate_pipeline, replica_mean
from dist_train.train.local_stage import build_stage, measured_cuts, stage_backend
from dist_train.train.loop import _open_run_dir


def train_local(cfg: Config, ctx: DistContext, command: list[str]) -> dict:
    check_layout(cfg, ctx.world_size)
    layout = stage_layout(ctx.rank, ctx.world_size, cfg.parallel.stages)
    data = build_dataset(cfg.data, cfg.model.block_size)
    run_dir = Path(cfg.run.dir) / cfg.run.name
    balance = measured_cuts(cfg, ctx, data, run_dir / "stages" / "balance.json")
    trainer, info = build_stage(cfg, data.info, layout, balance["cut_points"] if balance else None)
    method = trainer.method
    trainer.to(ctx.device)
    backend = stage_backend(cfg, ctx, layout)
    backend.setup(trainer, lambda m: optimizer_spec(cfg.optim, m))
    independent = method.independent_stages
    # Who reads data: stage 0 always; every stage under NoProp, or when targets stay off the wire.
    reads_targets = layout.first or independent or not cfg.local.send_targets
    link = StageLink(layout.prev_rank, layout.next_rank, ctx.device, cfg.local.max_in_flight,
                     send_targets=cfg.local.send_targets)
    sampler = data.sampler("train", cfg.train.seed, cfg.train.batch_size)

    replay = (ReplayBuffer(cfg.local.replay_size, cfg.local.max_reuse)
              if cfg.local.asynchronous and not layout.first and not independent else None)
    # Each stage saves its own shard (keys prefixed by stage); resume before touching the run dir.
    ckpt = Checkpointer(run_dir / "checkpoints", ctx, cfg.checkpoint.keep)
    start, resume_from = resume(ckpt, cfg.checkpoint.resume, backend, sampler,
                                on_state=lambda s: replay.load_state_dict(s["replay"], ctx.device)
                                if replay is not None and "replay" in s else None)
    if start == 0:  # each stage and replica its own stream (NoProp noise, dropout); resume restores it
        torch.manual_seed(cfg.train.seed + 1000 * layout.stage + layout.dp_rank)
    writer = _open_run_dir(cfg, ctx, run_dir, start, command, resume_from) if ctx.is_main else None
    if balance is not None and ctx.is_main:  # the cuts a resumed run must keep
        (run_dir / "stages").mkdir(parents=True, exist_ok=True)
        (run_dir / "stages" / "balance.json").write_text(json.dumps(balance, indent=1))
    stage_writer = MetricsWriter(run_dir / "stages" / f"stage{layout.stage}", enabled=layout.lead,
                                 tensorboard=cfg.telemetry.tensorboard)
    if layout.lead:
        stage_writer.truncate_from(start + 1)
    last: dict = {}

    def forward_backward(x: torch.Tensor, y: torch.Tensor, msg: int | None, is_last: bool) -> torch.Tensor:
        """Forward, (send on), local loss, backward of one micro-batch; gradients accumulate."""
        send = None
        if msg is not None and not layout.last and not independent:
            # Sent before the local loss and backward, so the next stage starts at once.
            send = lambda h: link.send(h.detach(), y, msg)  # noqa: E731
        with backend.sync_context(is_last), backend.autocast():
            _, loss = backend.model(x, y, on_activation=send)
        backend.backward(loss, is_last)  # scaled by 1/grad_accum: the step sees the batch mean
        return loss.detach()

    # MAN: the next stage's first-block weights arrive every `man_every` steps (count known ahead).
    man = method.sends_weights_back
    weight_msgs = len(range(start, cfg.train.steps, cfg.local.man_every)) if man else 0
    weights_numel = sum(p.numel() for p in trainer.head.ema.parameters()) if man and not layout.last else 0
    weights_got = 0
    # The batch streams through as `grad_accum` micro-batches (message i*M + m), each stage
    # accumulating their gradients: the update of the whole batch, with one micro-batch of
    # activations alive at a time.
    micro = cfg.train.grad_accum
    progress = Progress(total=cfg.train.steps, initial=start,
                        enabled=cfg.telemetry.progress if layout.last and layout.lead else False,
                        echo=layout.last and layout.lead and cfg.telemetry.progress != "off")

    with ctx.phase("steady"):
        ctx.barrier()
        t0, busy, loss_acc, window = time.perf_counter(), 0.0, torch.zeros((), device=ctx.device), 0
        for step in range(start, cfg.train.steps):
            backend.set_lr(lr := lr_at(step, cfg.optim, cfg.train.steps))
            idx = sampler.next_indices(layout.dp_rank, layout.dp_size)  # every stage keeps the data position
            for m, part in enumerate(idx.chunk(micro)):
                msg = step * micro + m
                if reads_targets:
                    x, y = (t.to(ctx.device) for t in data.get_batch("train", part))
                if not layout.first and not independent:
                    # Asynchronous mode (one micro-batch per step): rather than idle until the
                    # next activation arrives, train on a replayed batch.
                    while replay is not None and not link.ready() and (old := replay.sample()) is not None:
                        busy_t0 = time.perf_counter()
                        forward_backward(old[0], old[1], None, True)
                        backend.step()
                        busy += time.perf_counter() - busy_t0
                    x, sent_y = link.recv(msg, prefetch=msg + 1 < cfg.train.steps * micro)
                    y = sent_y if sent_y is not None else y
                    if replay is not None:
                        replay.add(x, y, step)
                if man and m == 0 and not layout.last and weights_got < weight_msgs:
                    if (flat := link.poll_weights(weights_numel)) is not None:
                        method.update_ema(trainer.head, flat)
                        weights_got += 1
                busy_t0 = time.perf_counter()
                # A device tensor, read at log time: a float() here would sync the GPU every micro-batch.
                loss_acc += forward_backward(x, y, msg, m == micro - 1) / micro
                busy += time.perf_counter() - busy_t0
            busy_t0 = time.perf_counter()
            backend.step()
            busy += time.perf_counter() - busy_t0
            if man and not layout.first and (step - start) % cfg.local.man_every == 0:
                link.send_weights(flat_block_weights(trainer.stage.blocks[0]))
            window += 1
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                elapsed = time.perf_counter() - t0
                record = {"step": done, "loss": replica_mean(backend, float(loss_acc) / window), "lr": lr,
                          "samples_per_s": window * cfg.train.batch_size / elapsed,
                          "idle_fraction": max(0.0, 1.0 - busy / elapsed),
                          "bytes_sent": link.bytes_sent, "tensors_sent": link.tensors_sent,
                          "sent_requires_grad": link.sent_requires_grad,
                          **({"weight_bytes_sent": link.weight_bytes_sent, "weight_msgs_received": weights_got}
                             if man else {}),
                          **(_replay_metrics(replay) if replay is not None else {}),
                          "peak_mem_bytes": peak_memory_bytes(ctx.device), "stage": layout.stage}
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != cfg.train.steps:
                    record.update(evaluate_pipeline(cfg, ctx, data, backend, link, layout))
                    if "val_loss" in record:
                        progress.note(f"step {done}/{cfg.train.steps}  loss {record['loss']:.4f}  "
                                      f"val_loss {record['val_loss']:.4f}  {record['samples_per_s']:.0f} samples/s")
                stage_writer.log(done, record)
                progress.update(done, {"loss": record["loss"]})
                if layout.last:
                    last = record
                t0, busy, loss_acc, window = time.perf_counter(), 0.0, torch.zeros((), device=ctx.device), 0
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or \
                    (cfg.checkpoint.at_end and done == cfg.train.steps):
                # Every stage has finished step `done` when the save's barrier passes, and the
                # activations of step `done` have been consumed: a consistent cut of the pipeline.
                saved = trainer_state.capture(done, sampler.state_dict())
                if replay is not None:
                    saved["replay"] = replay.state_dict()
                ckpt.save(done, backend, saved)
                t0 = time.perf_counter()
        while man and not layout.last and weights_got < weight_msgs:  # take the late ones
            method.update_ema(trainer.head, link.poll_weights(weights_numel, block=True))
            weights_got += 1
        link.drain()
        last.update(evaluate_pipeline(cfg, ctx, data, backend, link, layout))
        if "val_loss" in last:
            progress.note(f"step {last['step']}/{cfg.train.steps}  loss {last['loss']:.4f}  "
                          f"val_loss {last['val_loss']:.4f}  {last['samples_per_s']:.0f} samples/s")
        progress.close()
        sample = (generate_pipeline(cfg, ctx, data, backend, layout, run_dir)
                  if cfg.train.sample_tokens and info.task == "lm" else None)
        ctx.barrier()
    # The last stage owns the task loss; hand its record to rank 0 for metrics.jsonl and the summary.
    last = _from_last_stage(ctx, layout, last)
    if sample is not None and ctx.is_main:
        last["sample"] = sample
    if writer is not None:
        writer.log(last["step"], {k: v for k, v in last.items() if k not in ("stage", "sample")})
        writer.close()
    stage_writer.close()
    return last


def _from_last_stage(ctx: DistContext, layout, record: dict) -> dict:
    import torch.distributed as dist

    if not ctx.distributed:
        return record
    objs = [record if (layout.last and layout.lead) else None]
    src = ctx.world_size - layout.dp_size  # the lead rank of the last stage
    dist.broadcast_object_list(objs, src=src)
    return objs[0]


def _replay_metrics(replay: ReplayBuffer) -> dict:
    return {"replays": replay.replays, "max_reuse_seen": replay.max_uses,
            "mean_staleness": replay.staleness_sum / replay.replays if replay.replays else 0.0}
