"""Local-learning pipeline training: this rank trains one gradient-isolated stage.

Stage 0 reads the data; every later stage receives (activation, targets) from the stage before it,
runs forward, its local loss (the task loss on the last stage), backward and its own optimizer step,
and streams the detached activation on. Nothing ever flows backward, so no stage waits for
another's backward pass: after a one-time fill the stages run concurrently.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from dist_train.config.layout import check_layout
from dist_train.config.schema import Config
from dist_train.data import build_dataset
from dist_train.local.layout import stage_layout
from dist_train.local.link import EVAL_TAG, StageLink
from dist_train.local.method import StageInfo
from dist_train.local.methods import get_method
from dist_train.local.methods.man import flat_block_weights
from dist_train.local.replay import ReplayBuffer
from dist_train.local.split import split_model, stage_block_ranges
from dist_train.models import build_model
from dist_train.optim import lr_at, optimizer_spec
from dist_train.runtime.dist import DistContext
from dist_train.telemetry import MetricsWriter, peak_memory_bytes
from dist_train.train import state as trainer_state
from dist_train.train.checkpoint import Checkpointer, resume
from dist_train.train.loop import _open_run_dir


class StageTrainer(nn.Module):
    """The stage's blocks plus (except on the last stage) the method's auxiliary head."""

    def __init__(self, stage: nn.Module, head: nn.Module | None):
        super().__init__()
        self.stage = stage
        self.head = head


class StageState:
    """What a stage checkpoints: its blocks, head and optimizer, under a `stage{k}` prefix so the
    stages' shards sit side by side in one torch.distributed.checkpoint folder."""

    def __init__(self, index: int, module: nn.Module, optimizer: torch.optim.Optimizer):
        self.key, self.module, self.optimizer = f"stage{index}", module, optimizer

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        return {self.key: {"model": model_sd, "optim": optim_sd}}

    def save(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=path)

    def load(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.module, self.optimizer, model_state_dict=state[self.key]["model"],
                       optim_state_dict=state[self.key]["optim"])


def build_stage(cfg: Config, data_info, layout):
    """The same full model on every rank (same seed), then keep only this rank's stage."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data_info)
    ranges = stage_block_ranges(model, layout.num_stages, cfg.parallel.cut_points)
    stage = split_model(model, layout.num_stages, cfg.parallel.cut_points)[layout.stage]
    method = get_method(cfg.local.method)
    info = StageInfo(index=layout.stage, num_stages=layout.num_stages, task=model.task, width=cfg.model.width,
                     num_classes=data_info.vocab_size if model.task == "lm" else data_info.num_classes,
                     later_blocks=tuple(model.blocks[i] for i in range(ranges[layout.stage].stop, len(model.blocks))),
                     model_name=cfg.model.name)
    head = None if layout.last else method.build_head(info)
    return model, StageTrainer(stage, head), method, info


def train_local(cfg: Config, ctx: DistContext, command: list[str]) -> dict:
    check_layout(cfg, ctx.world_size)
    layout = stage_layout(ctx.rank, ctx.world_size, cfg.parallel.stages)
    data = build_dataset(cfg.data, cfg.model.block_size)
    model, trainer, method, info = build_stage(cfg, data.info, layout)
    trainer.to(ctx.device)
    optimizer = optimizer_spec(cfg.optim, trainer).build()
    dp_group = _dp_groups(ctx, layout)
    link = StageLink(layout.prev_rank, layout.next_rank, ctx.device, cfg.local.max_in_flight)
    sampler = data.sampler("train", cfg.train.seed, cfg.train.batch_size)
    run_dir = Path(cfg.run.dir) / cfg.run.name

    # Each stage saves its own shard (keys prefixed by stage); resume before touching the run dir.
    state = StageState(layout.stage, trainer, optimizer)
    ckpt = Checkpointer(run_dir / "checkpoints", ctx, cfg.checkpoint.keep)
    start, resume_from = resume(ckpt, cfg.checkpoint.resume, state, sampler)
    writer = _open_run_dir(cfg, ctx, run_dir, start, command, resume_from) if ctx.is_main else None
    stage_writer = MetricsWriter(run_dir / "stages" / f"stage{layout.stage}", enabled=layout.lead,
                                 tensorboard=cfg.telemetry.tensorboard)
    if layout.lead:
        stage_writer.truncate_from(start + 1)
    last: dict = {}
    loss_fn = model.loss

    def update(x: torch.Tensor, y: torch.Tensor, send_step: int | None) -> torch.Tensor:
        """Forward, (send on), local loss, backward, step: one update of this stage."""
        h = trainer.stage(x)
        if not layout.last:
            if send_step is not None:
                if send_step == start:
                    link.send_shapes(h, y)
                link.send(h.detach(), y, send_step)  # before backward: the next stage starts at once
            loss = method.local_loss(trainer.head, h, y, x.detach(), info)
        else:
            loss = loss_fn(h.float(), y)
        loss.backward()
        _average_gradients(trainer, dp_group, layout.dp_size)
        if cfg.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(trainer.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # Stage 0 reads its own data and never waits, so only later stages replay.
    # MAN: the next stage's first-block weights arrive every `man_every` steps (count known ahead).
    man = getattr(method, "sends_weights_back", False)
    weight_msgs = len(range(start, cfg.train.steps, cfg.local.man_every)) if man else 0
    weights_numel = sum(p.numel() for p in trainer.head.ema.parameters()) if man and not layout.last else 0
    weights_got = 0

    replay = (ReplayBuffer(cfg.local.replay_size, cfg.local.max_reuse)
              if cfg.local.asynchronous and not layout.first else None)
    with ctx.phase("steady"):
        ctx.barrier()
        t0, busy, loss_acc, window = time.perf_counter(), 0.0, 0.0, 0
        for step in range(start, cfg.train.steps):
            lr = lr_at(step, cfg.optim, cfg.train.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if layout.first:
                idx = sampler.next_indices(layout.dp_rank, layout.dp_size)
                x, y = (t.to(ctx.device) for t in data.get_batch("train", idx))
            else:
                if link.act_shape is None:
                    link.recv_shapes()
                # Asynchronous mode: rather than idle until the next activation arrives, replay.
                while replay is not None and not link.ready() and (old := replay.sample()) is not None:
                    busy_t0 = time.perf_counter()
                    update(old[0], old[1], None)
                    busy += time.perf_counter() - busy_t0
                x, y = link.recv(step, prefetch=step + 1 < cfg.train.steps)
                if replay is not None:
                    replay.add(x, y, step)
            if man and not layout.last and weights_got < weight_msgs:
                if (flat := link.poll_weights(weights_numel)) is not None:
                    method.update_ema(trainer.head, flat)
                    weights_got += 1
            busy_t0 = time.perf_counter()
            loss = update(x, y, step)
            busy += time.perf_counter() - busy_t0
            if man and not layout.first and (step - start) % cfg.local.man_every == 0:
                link.send_weights(flat_block_weights(trainer.stage.blocks[0]))
            loss_acc += float(loss.detach())
            window += 1
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                elapsed = time.perf_counter() - t0
                record = {"step": done, "loss": loss_acc / window, "lr": lr,
                          "samples_per_s": window * cfg.train.batch_size / elapsed,
                          "idle_fraction": max(0.0, 1.0 - busy / elapsed),
                          "bytes_sent": link.bytes_sent, "tensors_sent": link.tensors_sent,
                          "sent_requires_grad": link.sent_requires_grad,
                          **({"weight_bytes_sent": link.weight_bytes_sent, "weight_msgs_received": weights_got}
                             if man else {}),
                          **(_replay_metrics(replay) if replay is not None else {}), "peak_mem_bytes": peak_memory_bytes(ctx.device),
                          "stage": layout.stage}
                stage_writer.log(done, record)
                if layout.last:
                    last = record
                t0, busy, loss_acc, window = time.perf_counter(), 0.0, 0.0, 0
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or \
                    (cfg.checkpoint.at_end and done == cfg.train.steps):
                # Every stage has finished step `done` when the save's barrier passes, and the
                # activations of step `done` have been consumed: a consistent cut of the pipeline.
                ckpt.save(done, state, trainer_state.capture(done, sampler.state_dict()))
                t0 = time.perf_counter()
        while man and not layout.last and weights_got < weight_msgs:  # take the late ones
            method.update_ema(trainer.head, link.poll_weights(weights_numel, block=True))
            weights_got += 1
        link.drain()
        last.update(evaluate_pipeline(cfg, ctx, data, trainer, link, layout, loss_fn))
        ctx.barrier()
    # The last stage owns the task loss; hand its record to rank 0 for metrics.jsonl and the summary.
    last = _from_last_stage(ctx, layout, last)
    if writer is not None:
        writer.log(last["step"], {k: v for k, v in last.items() if k != "stage"})
        writer.close()
    stage_writer.close()
    return last


@torch.no_grad()
def evaluate_pipeline(cfg, ctx, data, trainer, link, layout, loss_fn) -> dict:
    """Main path through all stages (no auxiliary heads): val loss measured on the last stage."""
    trainer.eval()
    sampler = data.sampler("val", 0, cfg.train.batch_size)
    total = 0.0
    for i in range(cfg.train.eval_batches):
        if layout.first:
            x, y = (t.to(ctx.device) for t in data.get_batch("val", sampler.next_indices(layout.dp_rank, layout.dp_size)))
        else:
            x, y = link.recv(i, tag=EVAL_TAG, prefetch=False)
        h = trainer.stage(x)
        if layout.last:
            total += float(loss_fn(h.float(), y))
        else:
            link.send(h, y, i, tag=EVAL_TAG)
    link.drain()
    trainer.train()
    return {"val_loss": total / cfg.train.eval_batches} if layout.last else {}


def _from_last_stage(ctx: DistContext, layout, record: dict) -> dict:
    import torch.distributed as dist

    if not ctx.distributed:
        return record
    objs = [record if (layout.last and layout.lead) else None]
    src = ctx.world_size - layout.dp_size  # the lead rank of the last stage
    dist.broadcast_object_list(objs, src=src)
    return objs[0]


def _dp_groups(ctx: DistContext, layout):
    """One process group per stage over its data-parallel replicas (every rank creates every group)."""
    import torch.distributed as dist

    if layout.dp_size == 1 or not ctx.distributed:
        return None
    mine = None
    for k in range(layout.num_stages):
        group = dist.new_group(list(range(k * layout.dp_size, (k + 1) * layout.dp_size)))
        if k == layout.stage:
            mine = group
    return mine


def _average_gradients(module: nn.Module, group, dp_size: int) -> None:
    """Data parallelism inside a stage: mean of the replicas' gradients, one flat all-reduce."""
    if group is None:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    flat /= dp_size
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


def _replay_metrics(replay: ReplayBuffer) -> dict:
    return {"replays": replay.replays, "max_reuse_seen": replay.max_uses,
            "mean_staleness": replay.staleness_sum / replay.replays if replay.replays else 0.0}
