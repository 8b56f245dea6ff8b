"""End-to-end backprop training: the loop every backend runs. Read it top to bottom."""

from __future__ import annotations

from pathlib import Path

import torch

from dist_train.config.layout import check_layout
from dist_train.config.load import dump_config
from dist_train.config.schema import Config
from dist_train.data import build_dataset
from dist_train.optim import lr_at
from dist_train.train.transforms import build_transform
from dist_train.parallel import build_backend
from dist_train.runtime.dist import DistContext
from dist_train.tasks import get_task
from dist_train.telemetry import (MetricsWriter, Progress, StepTimer, achieved_flops, collect_provenance,
                                  peak_memory_bytes, write_provenance)
from dist_train.telemetry.energy_log import EnergyLog, EnergyTotals, per_rank_scalars
from dist_train.train.energy import finish_energy, open_energy_log, run_totals
from dist_train.train import state as trainer_state
from dist_train.train.checkpoint import Checkpointer, checkpoint_layout, resume
from dist_train.train.control import RunControl
from dist_train.train.evaluate import evaluate
from dist_train.train.generate import generate, write_sample


def train(cfg: Config, ctx: DistContext, command: list[str]) -> dict:
    """Train `cfg.train.steps` steps (resuming if a checkpoint says so); return the final metrics."""
    check_layout(cfg, ctx.world_size)
    energy = open_energy_log(cfg, ctx)  # first: a forced source this machine cannot read stops here
    run_dir = Path(cfg.run.dir) / cfg.run.name
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    data = build_dataset(cfg.data, cfg.model.block_size)
    task = get_task(data.info.task)
    model = task.build_for_run(cfg, data.info, ctx.mesh).to(ctx.device)
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(model)  # before the backend wraps or shards the blocks
    backend = build_backend(cfg, ctx)
    transform = build_transform(cfg, data, ctx, model)  # clip, or DP-SGD's per-example clip + noise
    with ctx.phase("start"):
        outputs = task.num_outputs(data.info)
        backend.setup(model, lambda m, mesh: transform.optimizer_spec(m, mesh, num_outputs=outputs))
        transform.attach(backend)
    torch.manual_seed(cfg.train.seed + 1000 * (ctx.rank + 1))  # per-rank stream for dropout
    sampler = transform.sampler(data)

    # Resume before touching the run directory: a bad checkpoint must leave everything as it was.
    ckpt = Checkpointer(run_dir / "checkpoints", ctx, cfg.checkpoint.keep, checkpoint_layout(backend.name, 1))
    control = RunControl(cfg, ctx, run_dir, ctx.rank, lag=2)  # non-finite guard, stop vote, sample ids
    box: dict = {}
    with transform.checkpointing():
        start, resume_from = resume(ckpt, cfg.checkpoint.resume, backend, sampler, on_state=box.update)
    if box:
        transform.load_state_dict(box.get("transform"))

    writer = _open_run_dir(cfg, ctx, run_dir, start, command, resume_from, energy)
    control.resume(start, box)
    progress = Progress(total=cfg.train.steps, initial=start,
                        enabled=cfg.telemetry.progress if ctx.is_main else False,
                        echo=ctx.is_main and cfg.telemetry.progress != "off")
    totals = run_totals(cfg, writer, energy, progress)
    tokens_per_sample = task.tokens_per_sample(cfg)
    flops_per_token = model.num_flops_per_token() if hasattr(model, "num_flops_per_token") else None
    timer = StepTimer(ctx.device)  # on CUDA it synchronizes, as backend.step's grad-norm read does anyway
    last: dict = {}

    with ctx.phase("steady"), control.signals():
        ctx.barrier()
        control.started(start, resume_from)
        energy.start()
        loss_acc, applied = torch.zeros((), device=ctx.device), 0
        done = start
        for step in range(start, cfg.train.steps):
            if stop := transform.stop_reason():  # e.g. the next step would overspend the privacy budget
                progress.note(stop)
                break
            last_step = control.last_step()  # a preemption signal or a non-finite stop, agreed by all
            timer.start()
            lr = lr_at(step, cfg.optim, cfg.train.steps)
            backend.set_lr(lr)
            idx = sampler.next_indices(ctx.rank, ctx.world_size)  # advances the data position
            parts = transform.micro_batches(idx)  # DP-SGD: Poisson-sized, possibly none on this rank
            filled = sum(1 for part in parts if part.numel())
            step_loss = torch.zeros((), device=ctx.device)
            for i, micro in enumerate(parts):
                is_last = i == len(parts) - 1
                x, y = (t.to(ctx.device, non_blocking=True) for t in data.get_batch("train", micro))
                with backend.sync_context(is_last):
                    with backend.autocast(), torch.set_grad_enabled(transform.builds_graph):
                        out = backend.model(x)
                    loss = control.poison(backend.module.loss(out.float(), y), step)
                    transform.backward(backend, loss, x.size(0), is_last, batch=(x, y))
                if x.size(0):  # an empty micro-batch (a DP rank that drew few examples) has no loss
                    step_loss += control.observe(loss).detach() / filled
            grad_norm = backend.step(transform, accept=control.accept(step))  # never a non-finite update
            if control.applied:  # a dropped step's (non-finite) loss stays out of the logged mean
                loss_acc, applied = loss_acc + step_loss, applied + 1
            timer.stop()
            done = step + 1
            control.end_step(done, idx)
            writer.scalars(done, transform.step_scalars())

            evaluating = due(done, cfg.train.eval_every) or done == cfg.train.steps
            if due(done, cfg.train.log_every) or evaluating:
                last = _window_metrics(cfg, ctx, energy, totals, done, lr, grad_norm, loss_acc, applied, timer,
                                       tokens_per_sample, flops_per_token, backend.compute_dtype)
                last.update(transform.metrics(), **control.metrics(), **task.train_metrics(backend.module))
                writer.scalars(done, per_rank_scalars(last, range(ctx.world_size)))
                if evaluating:
                    last.update(evaluate(backend, data, ctx, transform.eval_batch_size(data, ctx.world_size),
                                         cfg.train.eval_batches))
                    progress.evaluation(cfg.train.steps, last)
                writer.log(done, last)
                progress.update(done, {"loss": last["loss"]})
                loss_acc, applied = torch.zeros((), device=ctx.device), 0

            if due(done, cfg.checkpoint.every) or (cfg.checkpoint.at_end and done == cfg.train.steps):
                with transform.checkpointing():
                    ckpt.save(done, backend, _trainer_state(done, sampler, transform, control))
            if last_step:
                progress.note(f"stopping after step {done}: {control.reason}")
                break
        stopped_early = start < done < cfg.train.steps and not due(done, cfg.checkpoint.every)
        if stopped_early and (cfg.checkpoint.at_end or control.reason):
            with transform.checkpointing():  # privacy budget spent, preempted, non-finite: keep the work
                ckpt.save(done, backend, _trainer_state(done, sampler, transform, control))
        control.finish()
        if cfg.train.sample_tokens and task.generates_text:
            last["sample"] = generate(cfg, ctx, data, backend)
            if ctx.is_main:
                write_sample(cfg, run_dir, last["sample"])
    if ctx.is_main:
        last.update(finish_energy(cfg, run_dir, energy, totals, done, tokens_per_sample))
    progress.close()
    writer.close()
    energy.close()
    if control.reason:
        last.update(stopped=control.reason, stopped_at=done, exit_code=control.exit_code)
    return last


def _trainer_state(done: int, sampler, transform, control: RunControl) -> dict:
    state = trainer_state.capture(done, sampler.state_dict())
    state.update(control.state_dict())
    if (extra := transform.state_dict()) is not None:
        state["transform"] = extra  # e.g. the privacy accountant: spent budget survives a resume
    return state


def due(done: int, every: int) -> bool:
    """Is a periodic action (log, eval, save) due after step `done`? `every` = 0 means never."""
    return every > 0 and done % every == 0


def write_run_info(cfg: Config, ctx: DistContext, run_dir: Path, command: list[str], resume_from,
                   energy: EnergyLog) -> None:
    """The run directory with the resolved config and the run's provenance (rank 0 only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    write_provenance(run_dir / "provenance.json", collect_provenance(
        command, {"world_size": ctx.world_size, "backend": cfg.parallel.backend, "stages": cfg.parallel.stages,
                  "device": str(ctx.device), "resumed_from": str(resume_from) if resume_from else None,
                  "energy": energy.describe()}))


def apply_activation_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute every block's activations in backward instead of keeping them (full activation
    checkpointing, applied from outside the model as torchtitan does): each `model.blocks[i]` is
    replaced in place by torch's `checkpoint_wrapper` around it (non-reentrant, RNG state replayed,
    so dropout masks match). A block then keeps only its input between forward and backward.

    State-dict and DCP names are unchanged (the wrapper strips its prefix), so checkpoints move
    between runs with and without it; FSDP shards the wrapped blocks as its units.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return model


def _open_run_dir(cfg: Config, ctx: DistContext, run_dir: Path, start: int, command: list[str],
                  resume_from, energy: EnergyLog) -> MetricsWriter:
    """Rank 0 writes the resolved config and provenance, and drops metrics past the resume point."""
    writer = MetricsWriter(run_dir, enabled=ctx.is_main, tensorboard=cfg.telemetry.tensorboard)
    if ctx.is_main:
        write_run_info(cfg, ctx, run_dir, command, resume_from, energy)
        writer.truncate_from(start + 1)
    return writer


def _window_metrics(cfg: Config, ctx: DistContext, energy: EnergyLog, totals: EnergyTotals, done: int, lr: float,
                    grad_norm: float, loss_acc: torch.Tensor, applied: int, timer: StepTimer,
                    tokens_per_sample: int, flops_per_token, dtype: torch.dtype) -> dict:
    """The logged record for the window since the last one. The loss is the mean over the window's
    applied steps (every replica drops the same steps) and over ranks; None if every step was dropped."""
    steps, elapsed = timer.pop_window()
    samples_per_s = steps * cfg.train.batch_size / elapsed
    tokens_per_s = samples_per_s * tokens_per_sample
    figures = energy.window(steps * cfg.train.batch_size, tokens_per_sample, steps)
    for key in ("energy_j_counted", "power_w_counted"):  # the world is the group: the same as energy_j
        figures.pop(key)
    return {"step": done, "loss": ctx.all_reduce_mean(float(loss_acc) / applied) if applied else None, "lr": lr,
            "grad_norm": grad_norm, "step_time_s": elapsed / steps,
            "samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s,
            **achieved_flops(flops_per_token, tokens_per_s, ctx.device, dtype, ctx.world_size),
            "peak_mem_bytes": ctx.all_reduce_max(peak_memory_bytes(ctx.device)),
            **figures, "energy_total_j": totals.add(figures["energy_j"])}
