"""`dist-train plan`: validate config and layout and print what a run would do, training nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from dist_train.config import load_config
from dist_train.config.layout import check_layout
from dist_train.config.schema import Config
from dist_train.data import build_dataset
from dist_train.models import count_parameters
from dist_train.optim import MATRIX_OPTIMIZERS
from dist_train.optim.routing import route_parameters
from dist_train.parallel import backend_class
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


def _optimizer_state(cfg: Config, model: torch.nn.Module, info, backend: str, dp: int,
                     adamw_bytes: float) -> tuple[float, str]:
    """Optimizer-state bytes per rank for the whole model, and the optimizer's description
    (dp_sgd: its base optimizer's; diff2: its two parameter copies).

    `adamw_bytes`: the backend's per-parameter figure for AdamW's two fp32 moments (8 bytes, or
    8/dp where it shards them). Muon keeps one fp32 momentum per matrix element, NorMuon that plus
    one value per row; owner-computes keeps a matrix's state on its owner only, so under DDP as
    well as FSDP2 it is divided over the dp ranks.
    """
    name = cfg.optim.name
    if name == "diff2":  # x_(r-1) and v_(r-1), whole on every worker; its step is plain SGD
        return count_parameters(model) * 8.0, "diff2 (x_(r-1) and v_(r-1): two fp32 parameter copies per rank)"
    if name == "dp_sgd":  # the clipping and noise keep no state; the base optimizer does
        name = cfg.privacy.base_optimizer
    if name == "sgd":  # one momentum buffer (sharded as AdamW's moments are), none without momentum
        per = adamw_bytes / 2 if cfg.optim.beta1 > 0 else 0.0
        return count_parameters(model) * per, cfg.optim.name + (" (SGD momentum)" if per else " (SGD, no state)")
    if name not in MATRIX_OPTIMIZERS:
        return count_parameters(model) * adamw_bytes, cfg.optim.name
    routes = route_parameters(model, get_task(info.task).num_outputs(info),
                              cfg.optim.matrix.matrix_params, cfg.optim.matrix.adamw_params)
    n_matrix = sum(p.numel() for _, p in routes.matrix)
    rows = sum(p.shape[0] for _, p in routes.matrix) if name == "normuon" else 0
    n_other = sum(p.numel() for _, p in routes.adamw_decay + routes.adamw_no_decay)
    owner_share = 1.0 / dp if (backend in ("ddp", "fsdp") and cfg.optim.matrix.owner_compute) else 1.0
    total = (n_matrix + rows) * 4.0 * owner_share + n_other * adamw_bytes
    text = (f"{name} ({len(routes.matrix)} hidden matrices, {n_matrix / 1e6:.2f} M parameters, "
            f"orthogonalised {'by one owner rank each' if owner_share < 1 else 'on this rank'}; "
            f"AdamW for {n_other / 1e6:.2f} M)")
    return total, text


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def plan(config: str, overrides: list[str], nproc: Optional[int], nnodes: int) -> str:
    cfg: Config = load_config(config, overrides)
    world = (nproc * nnodes) if nproc else discover(use_mpi4py=False).world_size
    check_layout(cfg, world)
    data = build_dataset(cfg.data, cfg.model.block_size)
    task = get_task(data.info.task)
    with torch.device("meta" if task.meta_buildable else "cpu"):
        model = task.build_for_run(cfg, data.info, mesh=None)
    n_params = count_parameters(model)
    dp = world // cfg.parallel.stages
    micro = cfg.train.batch_size // (dp * cfg.train.grad_accum)
    if cfg.optim.name == "dp_sgd":  # Poisson batches are split into physical micro-batches
        micro = min(cfg.privacy.max_physical_batch, max(1, micro))
    example = task.example_input(cfg, data.info, micro)
    act = activation_bytes(model, example) if example is not None else 0
    # A stage with one replica runs unwrapped: nothing to average or shard.
    backend = "none" if cfg.parallel.stages > 1 and dp == 1 else cfg.parallel.backend
    w, g, o = backend_class(backend).bytes_per_param(dp, cfg)
    # A pipeline rank holds one stage: about 1/K of the parameters and of the activations.
    per_rank = n_params / cfg.parallel.stages
    optim_bytes, optim_text = _optimizer_state(cfg, model, data.info, backend, dp, o)
    act = act / cfg.parallel.stages
    device = "cuda (nccl)" if torch.cuda.is_available() and cfg.runtime.device != "cpu" else "cpu (gloo)"
    resume = resolve_resume(cfg.checkpoint.resume, Path(cfg.run.dir) / cfg.run.name / "checkpoints")
    zero = f" ZeRO-{cfg.parallel.zero_stage}" if backend == "deepspeed" else ""
    where = (" inside each stage" if dp > 1 else " (one replica per stage)") if cfg.parallel.stages > 1 else ""
    rows = [
        ("run", f"{cfg.run.name} -> {Path(cfg.run.dir) / cfg.run.name}"),
        ("world", f"{world} ranks ({nnodes} node(s) x {world // nnodes}), device {device}"),
        ("mesh", (f"stage={cfg.parallel.stages} x " if cfg.parallel.stages > 1 else "") + f"dp={dp}"),
        ("backend", f"{backend}{zero}{where}, precision {cfg.parallel.mixed_precision}"),
        ("model", f"{cfg.model.name}: {cfg.model.n_layer} layers, width {cfg.model.width}, "
                  f"{n_params / 1e6:.2f} M parameters"),
        ("data", f"{cfg.data.name}: {data.info.train_size:,} train / {data.info.val_size:,} val"),
        ("batch", f"{cfg.train.batch_size} global = {dp} dp ranks x {cfg.train.grad_accum} micro-batches x {micro}"),
        ("memory/rank", f"weights {_mb(per_rank * w)}, grads {_mb(per_rank * g)}, optimizer {_mb(optim_bytes / cfg.parallel.stages)}, "
                        + (f"activations ~{_mb(act)} (estimate, fp32)" if example is not None
                           else "activations not estimated")),
        ("optimizer", f"{optim_text} lr {cfg.optim.lr:g}, {cfg.optim.schedule} after {cfg.optim.warmup_steps} warm-up"),
        ("steps", f"{cfg.train.steps}, checkpoint every {cfg.checkpoint.every or 'end'} (keep {cfg.checkpoint.keep}), "
                  f"resume: {resume if resume else 'fresh start'}"),
    ]
    if cfg.optim.name == "dp_sgd":
        from dist_train.privacy.dp_sgd import describe

        rows.insert(-1, ("privacy", describe(cfg, data.num_samples("train"), dp)))
        rows[6] = ("batch", f"{cfg.train.batch_size} expected (Poisson), physical micro-batches of at most "
                            f"{cfg.privacy.max_physical_batch} per rank")
    if cfg.optim.name == "diff2":
        from dist_train.privacy.diff2_transform import describe as describe_diff2

        rows.insert(-1, ("privacy", describe_diff2(cfg, data.num_samples("train"), dp)))
        rows[6] = ("batch", f"the whole training set every round ({data.num_samples('train')}), "
                            f"~{data.num_samples('train') // dp} per worker")
    if cfg.parallel.stages > 1:
        from dist_train.local.split import stage_block_ranges

        ranges = stage_block_ranges(model, cfg.parallel.stages, cfg.parallel.cut_points)
        last = len(ranges) - 1
        if cfg.local.method == "noprop":  # every stage encodes x itself and denoises T/K steps
            per = (cfg.local.noprop.steps or cfg.parallel.stages) // cfg.parallel.stages
            parts = [f"{per} x (own embed + blocks {r.start}-{r.stop - 1} + denoiser)" + (" + head" if i == last else "")
                     for i, r in enumerate(ranges)]
            traffic = "no activations in training" + (", label-embedding all-reduce per step"
                                                      if cfg.local.noprop.learn_embedding else "")
        else:
            parts = [("embed + " if i == 0 else "") + f"blocks {r.start}-{r.stop - 1}" +
                     (" + head" if i == last else " + aux head") for i, r in enumerate(ranges)]
            traffic = ("positive and negative activations forward (2x)" if cfg.local.method == "forward_forward"
                       else "activations forward") + ("" if cfg.local.send_targets else " (targets read locally)")
            if cfg.local.method == "man":
                traffic += f", weights back every {cfg.local.man.every} step(s)"
        if cfg.parallel.balance == "measured" and cfg.parallel.cut_points is None:
            traffic += "; cuts shown by parameter count, the run measures its own at start"
        rows.insert(3, ("stages", f"{cfg.local.method}: " + " | ".join(parts) +
                        f"; {world // cfg.parallel.stages} data-parallel rank(s) per stage; {traffic}"))
    for row in task.plan_rows(cfg, model, dp):
        rows.insert(-2, row)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
