"""End-to-end backprop training: the loop every backend runs. Read it top to bottom.

Every rank holds the whole model (replicated, sharded or partitioned by the backend); a step is the
forward and backward of its micro-batches, the gradient transform (clip; DP-SGD's per-example clip
and noise; DIFF2) and the optimizer step. Everything around the steps (run directory, logs,
checkpoints, resume, stop votes) is the `RunSession`'s. The PDE task's hard-constraint experts train
here too: they are layers of the model, spread over the ranks by the task.
"""

from __future__ import annotations

from typing import Optional

import torch

from dist_train.config.layout import check_layout
from dist_train.config.schema import Config
from dist_train.data import build_dataset
from dist_train.optim import lr_at
from dist_train.parallel import build_backend
from dist_train.parallel.parallelize import apply_model_transforms, transform_figures
from dist_train.runtime.dist import DistContext
from dist_train.tasks import get_task
from dist_train.telemetry import achieved_flops, peak_memory_bytes
from dist_train.train.batches import StepBatch, StepBatches
from dist_train.train.checkpoint import checkpoint_layout
from dist_train.train.evaluate import evaluate
from dist_train.train.generate import generate, write_sample
from dist_train.train.hooks import Hooks
from dist_train.train.session import RunSession
from dist_train.train.transforms import build_transform


def train(cfg: Config, ctx: DistContext, command: list[str], data=None, hooks: Optional[Hooks] = None) -> dict:
    """Train `cfg.train.steps` steps (resuming if a checkpoint says so); return the final metrics.
    `data`: the data set `cfg.data` names, already built (a benchmark shares one between runs);
    `hooks`: what the caller observes of the run."""
    check_layout(cfg, ctx.world_size)
    session = RunSession(cfg, ctx, command, lag=2, hooks=hooks)  # first: bad energy or fault settings stop here
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    data = build_dataset(cfg.data, cfg.model.block_size) if data is None else data
    task = get_task(data.info.task)
    model, backend, transform = _build(cfg, ctx, data, task)
    session.hooks.on_setup(backend)
    torch.manual_seed(cfg.train.seed + 1000 * (ctx.rank + 1))  # per-rank stream for dropout
    batches = StepBatches(data, transform, transform.sampler(data), ctx.device, ctx.rank, ctx.world_size,
                          cfg.train.steps, prefetch=cfg.data.prefetch)
    session.resume(backend, batches, transform, checkpoint_layout(backend.name, 1))
    session.open(task.tokens_per_sample(cfg), collector=ctx.is_main)
    flops_per_token = model.num_flops_per_token() if hasattr(model, "num_flops_per_token") else None
    control, window = session.control, session.window

    with session.running(), batches:
        for step in session.steps():
            with window.working(sync=True):  # on CUDA it synchronizes, as backend.step's grad-norm read does anyway
                lr = lr_at(step, cfg.optim, cfg.train.steps)
                backend.set_lr(lr)
                batch = batches.next(step)  # the data position advances; with prefetching, step+1's is made now
                window.waited(batch.wait_s)
                step_loss = _forward_backward(session, batch, step)
                grad_norm = backend.step(transform, accept=control.accept(step))  # never a non-finite update
                window.add(step_loss, control.applied)  # a dropped step's (non-finite) loss stays out of the mean
            session.end_step(step, batch.indices)
            if session.logging():
                record = _record(session, lr, grad_norm, flops_per_token)
                record.update(session.run_metrics(), **task.train_metrics(backend.module), **transform_figures(cfg))
                if session.evaluating():
                    record.update(evaluate(backend, data, ctx, transform.eval_batch_size(data, ctx.world_size),
                                           cfg.train.eval_batches))
                session.log(record)
                session.report(record)
                window.reset()
        session.finish()
        if cfg.train.sample_tokens and task.generates_text:
            session.last["sample"] = generate(cfg, ctx, data, backend)
            if ctx.is_main:
                write_sample(cfg, session.dir, session.last["sample"])
    return session.close(session.last)


def _build(cfg: Config, ctx: DistContext, data, task) -> tuple:
    """The model on this rank's device, the backend that wraps it and its optimizer, and the
    gradient transform (clip, or DP-SGD's per-example clip and noise) attached to the backend."""
    backend = build_backend(cfg, ctx)
    model = _build_model(cfg, ctx, data, task, backend)
    apply_model_transforms(model, cfg)  # before the backend wraps or shards the blocks
    transform = build_transform(cfg, data, ctx, model)
    with ctx.phase("start"):
        outputs = task.num_outputs(data.info)
        backend.setup(model, lambda m, mesh: transform.optimizer_spec(m, mesh, num_outputs=outputs))
        transform.attach(backend)
    return model, backend, transform


def _build_model(cfg: Config, ctx: DistContext, data, task, backend) -> torch.nn.Module:
    """The model, on this rank's device unless it is left on meta for the backend to shard first.

    A model with its own `init_weights` is built on the meta device and initialised after sharding
    (`parallel/meta_init.py`): its weights depend on (train.seed, parameter names) only, not on the
    world size, and under FSDP each rank only ever allocates its shard. The others (the GPT, the MLP,
    the CNN, ...) are built eagerly as before, so that what was measured with their init (the
    benchmarks' figures and targets, the tests' loss thresholds and same-loss comparisons) still holds."""
    from dist_train.parallel.meta_init import materialize, wants_meta_init

    if task.meta_buildable:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # no draw from the run's generator
            model = task.build_for_run(cfg, data.info, ctx.mesh)
        if wants_meta_init(model):
            if not backend.shards_meta_model:  # it needs the whole weights: materialise them now
                materialize(model, ctx.device, cfg.train.seed)
            return model
    return task.build_for_run(cfg, data.info, ctx.mesh).to(ctx.device)


def _forward_backward(session: RunSession, batch: StepBatch, step: int) -> torch.Tensor:
    """Forward and backward of the step's micro-batches, gradients accumulating; returns the step's
    mean loss over its non-empty micro-batches, detached on the device (read at log time)."""
    backend, transform, control, device = session.backend, session.transform, session.control, session.ctx.device
    parts = batch.parts  # DP-SGD: Poisson-sized, possibly none on this rank
    filled = sum(1 for part in parts if part.numel())
    step_loss = torch.zeros((), device=device)
    for i, (x, y) in enumerate(batch.inputs):
        is_last = i == len(parts) - 1
        with backend.sync_context(is_last):
            with backend.autocast(), torch.set_grad_enabled(transform.builds_graph):
                out = backend.model(x)
            loss = control.poison(backend.module.loss(out.float(), y), step)
            transform.backward(backend, loss, x.size(0), is_last, batch=(x, y))
        if x.size(0):  # an empty micro-batch (a DP rank that drew few examples) has no loss
            step_loss += control.observe(loss).detach() / filled
    return step_loss


def _record(session: RunSession, lr: float, grad_norm, flops_per_token) -> dict:
    """The logged record for the window since the last one. The loss is the mean over the window's
    applied steps (every replica drops the same steps) and over ranks; None if every step was dropped."""
    cfg, ctx, window = session.cfg, session.ctx, session.window
    samples_per_s = window.steps * cfg.train.batch_size / window.busy
    tokens_per_s = samples_per_s * session.tokens_per_sample
    figures = session.energy_window(window.steps)
    for key in ("energy_j_counted", "power_w_counted"):  # the world is the group: the same as energy_j
        figures.pop(key)
    loss = window.mean_loss()
    return {"step": session.done, "loss": None if loss is None else ctx.all_reduce_mean(loss), "lr": lr,
            "grad_norm": grad_norm, "step_time_s": window.busy / window.steps,
            **window.data_figures(window.busy / window.steps),
            "samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s,
            **achieved_flops(flops_per_token, tokens_per_s, ctx.device, session.backend.compute_dtype,
                             ctx.world_size),
            "peak_mem_bytes": ctx.all_reduce_max(peak_memory_bytes(ctx.device)),
            **figures, "energy_total_j": session.totals.add(figures["energy_j"])}

