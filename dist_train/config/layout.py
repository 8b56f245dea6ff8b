"""Checks that need the world size as well as the config: is this run possible on these ranks?"""

from __future__ import annotations

from dist_train.config.schema import Config
from dist_train.errors import UserError
from dist_train.tasks import get_task
from dist_train.tasks.names import MODEL_TASKS


def check_layout(cfg: Config, world_size: int) -> None:
    """Raise UserError naming the key when the config cannot run on `world_size` ranks."""
    get_task(MODEL_TASKS[cfg.model.name]).check(cfg, world_size)  # the task's own rules (PDE: ddp/none only)
    stages = cfg.parallel.stages
    if stages > 1:
        if stages > cfg.model.n_layer:
            raise UserError(f"parallel.stages: {stages} stages but the model has only {cfg.model.n_layer} blocks "
                            "(model.n_layer)")
        if world_size < stages:
            raise UserError(f"parallel.stages: {stages} stages need at least {stages} ranks, got {world_size} "
                            f"(launch with: dist-train launch <config> --nproc {stages}; or set parallel.stages=1)")
        if world_size % stages != 0:
            raise UserError(f"parallel.stages: {stages} stages do not divide the world size {world_size} "
                            "(each stage needs the same number of data-parallel ranks)")
        cuts = cfg.parallel.cut_points
        if cuts is not None and (len(cuts) != stages - 1 or
                                 any(b <= a for a, b in zip([0, *cuts], [*cuts, cfg.model.n_layer]))):
            raise UserError(f"parallel.cut_points: {cuts} must be {stages - 1} strictly increasing block "
                            f"indices inside 1..{cfg.model.n_layer - 1}")
        dp = world_size // stages
        if cfg.parallel.backend == "fairscale" and dp > 1:
            raise UserError("parallel.backend: fairscale is not offered inside local-learning stages; "
                            "use ddp, fsdp or deepspeed")
        if cfg.local.method == "man" and cfg.parallel.backend in ("fsdp", "deepspeed") and dp > 1:
            raise UserError(f"local.method: man sends its first block's whole weights backward, which a sharded "
                            f"stage ({cfg.parallel.backend}) does not hold; use parallel.backend ddp")
        if cfg.local.method == "forward_forward" and cfg.model.name == "gpt":
            raise UserError("local.method: forward_forward needs a classifier (model.name mlp or cnn): its "
                            "prediction embeds each candidate label in the input")
        t = cfg.local.noprop.steps
        if cfg.local.method == "noprop" and t is not None and t % stages:
            raise UserError(f"local.noprop.steps: {t} diffusion steps cannot be shared evenly by {stages} "
                            "stages (use a multiple of parallel.stages)")
        if cfg.local.method == "noprop" and cfg.local.asynchronous:
            raise UserError("local.asynchronous: noprop stages never wait for each other, so there is nothing "
                            "to replay; set it to false")
        if cfg.local.asynchronous and world_size != stages:
            raise UserError("local.asynchronous: replay needs one rank per stage (replicas would replay "
                            "different batches and their gradient averaging would deadlock)")
        if cfg.local.asynchronous and cfg.train.grad_accum != 1:
            raise UserError("local.asynchronous: replay trains on whole batches; use train.grad_accum=1")
    if cfg.parallel.backend == "none" and world_size > stages:
        raise UserError(f"parallel.backend: none runs one process, but {world_size} ranks were requested")
    dp = world_size // stages if world_size % stages == 0 else world_size
    wrapped = dp > 1 or stages == 1  # a pipeline stage with one replica runs unwrapped
    if cfg.optim.name in ("muon", "normuon") and cfg.parallel.backend in ("deepspeed", "fairscale") and wrapped:
        raise UserError(f"optim.name: {cfg.optim.name} orthogonalises whole matrices, but "
                        f"{cfg.parallel.backend} flattens parameters into partitions it steps itself; "
                        "use parallel.backend ddp or fsdp")
    if cfg.optim.name == "dp_sgd":
        if stages > 1 and cfg.local.method != "dgl":
            raise UserError(f"local.method: dp_sgd inside local-learning stages is offered for dgl (per-example "
                            f"local losses); {cfg.local.method} is not supported")
        if stages > 1 and cfg.local.asynchronous:
            raise UserError("local.asynchronous: replayed batches would be extra releases the accountant does not "
                            "see; set it to false with dp_sgd")
        if stages > 1 and cfg.parallel.backend == "fsdp":
            raise UserError("parallel.backend: dp_sgd inside local-learning stages runs under ddp (or one replica)")
        if cfg.parallel.backend not in ("ddp", "fsdp", "none"):
            raise UserError(f"optim.name: dp_sgd clips per example and reduces the noised sum itself; "
                            f"parallel.backend {cfg.parallel.backend} is not supported (use ddp, fsdp or none)")
    if cfg.optim.name == "diff2" and cfg.parallel.backend not in ("ddp", "none"):
        raise UserError(f"optim.name: diff2 averages its workers' clipped directions itself; parallel.backend "
                        f"{cfg.parallel.backend} is not supported (use ddp or none)")
    per_step = dp * cfg.train.grad_accum
    # dp_sgd: an expected size; diff2: the whole training set, split as evenly as it goes
    if cfg.train.batch_size % per_step != 0 and cfg.optim.name not in ("dp_sgd", "diff2"):
        raise UserError(f"train.batch_size: {cfg.train.batch_size} is not divisible by data-parallel size x "
                        f"grad_accum ({dp} x {cfg.train.grad_accum} = {per_step})")
