"""DeepSpeed ZeRO stages 0-3, configured from the run's YAML (optionally merged with a DeepSpeed JSON).

DeepSpeed owns gradient accumulation, clipping and its checkpoint format (its ZeRO optimizer keeps
flat partitioned buffers that torch.distributed.checkpoint cannot describe), so this backend routes
those calls to the engine. On CPU it runs over gloo with torch's own optimizers.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch.distributed as dist
from torch import nn

from dist_train.config.load import merge_dicts
from dist_train.config.schema import Config
from dist_train.errors import UserError
from dist_train.parallel.base import Backend, OptimizerFactory


def deepspeed_config(cfg: Config, world: int) -> dict:
    """The DeepSpeed JSON this run implies; a user file (`parallel.deepspeed_config`) overrides keys."""
    micro = cfg.train.batch_size // (cfg.train.grad_accum * world)
    ds = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # Our optimizers are plain torch ones; DeepSpeed only vouches for its own by default.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.train.grad_clip > 0:
        ds["gradient_clipping"] = cfg.train.grad_clip
    if cfg.parallel.mixed_precision == "bf16":
        ds["bf16"] = {"enabled": True}
    if cfg.parallel.deepspeed_config:
        path = Path(cfg.parallel.deepspeed_config)
        if not path.is_file():
            raise UserError(f"parallel.deepspeed_config: file not found: {path}")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"parallel.deepspeed_config: {path} is not valid JSON (line {e.lineno})") from None
        ds = merge_dicts(ds, user)
    return ds


def _weights_only_engine():
    """DeepSpeed's checkpoint engine, but loading with `weights_only=True`.

    DeepSpeed unpickles with weights_only=False (arbitrary code on load). Its checkpoints hold
    only tensors, containers and three small DeepSpeed classes, so allow exactly those.
    """
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine()


class _SubMeshMPU:
    """The parallel-state object DeepSpeed accepts (Megatron's `mpu` protocol) for one stage.

    Data parallelism is the stage's sub-mesh. The "model-parallel" group is this rank alone: a stage
    is a whole model of its own, and DeepSpeed all-reduces gradient norms over that group, which
    would otherwise couple the stages' clipping and make one stage wait for another.
    """

    def __init__(self, mesh):
        self._dp = mesh.get_group()
        me = dist.get_rank()
        alone = None
        for rank in range(dist.get_world_size()):  # new_group is collective: every rank makes every group
            group = dist.new_group([rank])
            if rank == me:
                alone = group
        self._alone = alone

    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._dp)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self._dp)

    def get_model_parallel_group(self):
        return self._alone

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    # Newer DeepSpeed asks for the tensor-parallel names; there is no tensor parallelism here.
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank


def _decline_inference_shm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce, which training never calls.

    DeepSpeed's torch comm backend builds the `deepspeed_shm_comm` op with ninja whenever it starts
    on the CPU accelerator: about 25 s on 2 cores, and again for every new virtual environment,
    since the build file holds the venv's absolute paths. The op serves only `inference_all_reduce`
    (DeepSpeed-Inference's tensor-parallel layers); a training engine's collectives are
    torch.distributed's. DeepSpeed reads `deepspeed.ops.__compatible_ops__` before building, so the
    op is marked unavailable there.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    shards_parameters = True  # ZeRO partitions what the whole-weight consumers (MAN) would need
    flattens_parameters = True
    compiles_blocks = False  # ZeRO-3 gathers parameters in hooks inside each block; its own engine.compile() is not wired in
    async_checkpoints = False  # DeepSpeed's own checkpoint format, written by its engine

    @classmethod
    def bytes_per_param(cls, world: int, cfg: Config) -> tuple[float, float, float]:
        stage = cfg.parallel.zero_stage
        return (4.0 / world if stage >= 3 else 4.0, 4.0 / world if stage >= 2 else 4.0,
                8.0 / world if stage >= 1 else 8.0)

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        if self.ctx.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        _decline_inference_shm_op()
        ds_logger.setLevel(logging.WARNING)  # its INFO lines drown the training log
        # On a sub-mesh (a local-learning stage's replicas) DeepSpeed learns its data-parallel group
        # from a Megatron-style `mpu`; on the whole world it needs none.
        mpu = _SubMeshMPU(self.mesh) if self.dp_size != self.ctx.world_size else None
        config = deepspeed_config(self.cfg, self.dp_size)
        if self.checkpoint_key:  # stages save under different tags on purpose
            config.setdefault("checkpoint", {})["tag_validation"] = "Ignore"
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=make_optimizer(model, self.mesh).build(), mpu=mpu, config=config,
            dist_init_required=False)
        engine.checkpoint_engine = _weights_only_engine()
        self.model = self.engine = engine
        self.module = engine.module
        self.optimizer = optimizer

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()  # bf16 is applied by the engine to the parameters

    def backward(self, loss, is_last: bool) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        if not is_last:
            self.engine.step()  # a non-boundary step only advances DeepSpeed's micro-step counter

    def step(self, transform=None, accept=None) -> float:
        # The engine clips (gradient_clipping) and steps its own flattened partitions; a transform
        # that rewrites gradients cannot run between the two, and such a transform's own check refuses DeepSpeed.
        if transform is not None and not transform.plain:
            raise ValueError(f"deepspeed backend: gradient transform {transform.name!r} is not supported")
        # The gradient norm exists only inside the engine's step, so the guard judges the loss here
        # (a non-finite loss makes non-finite gradients); a vetoed step drops the gradients instead.
        if accept is not None and not accept(None):
            # What the engine's own step would do around an update: clear the (partitioned)
            # gradients and count the micro-step, so accumulation boundaries stay where they were.
            if hasattr(self.engine.optimizer, "zero_grad"):
                self.engine.optimizer.zero_grad()
            self.engine.zero_grad()
            self.engine.micro_steps += 1
            return float("nan")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    # Stages of a pipeline are separate models: each saves under its own tag (its checkpoint key).
    def save(self, path: str) -> None:
        self.engine.save_checkpoint(path, tag=self.checkpoint_key or "deepspeed")

    def load(self, path: str) -> None:
        load_path, _ = self.engine.load_checkpoint(path, tag=self.checkpoint_key or "deepspeed",
                                                   load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise UserError(f"checkpoint {path}: no DeepSpeed state found")
