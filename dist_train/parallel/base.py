"""One interface over the data-parallel backends.

The trainer never branches on the backend: it asks the backend to wrap the model, run a micro-batch
backward (accumulating without communication until the last micro-batch), take the step (the
trainer's gradient transform, then the optimizer; see `dist_train.optim.transform`), and save or
load its state.
"""

from __future__ import annotations

import contextlib
import warnings
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, ClassVar, ContextManager, Iterator, Optional

import torch
from torch import nn

from dist_train.config.schema import Config
from dist_train.errors import UserError
from dist_train.runtime.dist import DistContext
from dist_train.runtime.mesh import check_replicate

from dist_train.optim.build import OptimizerSpec, set_lr

if TYPE_CHECKING:
    from dist_train.optim.transform import GradientTransform

# Given the (possibly sharded) module and the data-parallel (sub-)mesh it lives on, describe the
# optimizer to build over it (Muon and NorMuon distribute their work over that mesh).
OptimizerFactory = Callable[[nn.Module, object], OptimizerSpec]


class Backend(ABC):
    """A data-parallel backend, registered by name in `dist_train.registry.BACKENDS`. Besides wrapping
    the model it owns its rules (`check`) and tells others what it does to parameters, so that an
    optimizer or a method states its needs by capability, never by a backend's name."""

    name: str = "base"
    # Each rank holds only a shard of a parameter (FSDP2, ZeRO-3 style): a whole tensor must be gathered.
    shards_parameters: ClassVar[bool] = False
    # The backend flattens parameters into partitions that it steps itself (DeepSpeed ZeRO, FairScale
    # OSS): an optimizer that needs whole matrices (Muon) cannot run under it.
    flattens_parameters: ClassVar[bool] = False
    # Muon's owner-computes step can place each matrix's state on one owner rank under it.
    owner_computes: ClassVar[bool] = False
    # Runs inside each stage of a local-learning pipeline (over the stage's replicas).
    in_stages: ClassVar[bool] = True
    # `setup` takes a model still on the meta device, shards it there and materialises each rank's
    # shard (`parallel/meta_init.py`); the others are handed whole, materialised weights.
    shards_meta_model: ClassVar[bool] = False
    # Shards over a 2-D ("dp_replicate", "dp_shard") mesh: `parallel.dp_replicate` > 1 (HSDP).
    hybrid_shards: ClassVar[bool] = False
    # Its checkpoint is the DCP state dict of `checkpoint_state`, which `checkpoint.async` can copy to
    # host memory and write in the background; a backend with its own format writes in place only.
    async_checkpoints: ClassVar[bool] = True
    # Wraps blocks that `parallel.compile` has compiled in place (its hooks stay outside the compiled
    # code); a backend that partitions parameters inside the blocks' forward itself does not.
    compiles_blocks: ClassVar[bool] = True

    @classmethod
    def check(cls, cfg: Config, world_size: int) -> None:
        """Raise UserError naming the key when this backend cannot run `cfg` on `world_size` ranks."""
        stages = cfg.parallel.stages
        if stages > 1 and world_size // stages > 1 and not cls.in_stages:
            raise UserError(f"parallel.backend: {cls.name} is not offered inside local-learning stages; "
                            "use ddp, fsdp or deepspeed")
        if cfg.parallel.dp_replicate > 1:
            if not cls.hybrid_shards:
                raise UserError(f"parallel.dp_replicate: {cfg.parallel.dp_replicate} (HSDP) needs a backend that "
                                f"shards over a replicate x shard mesh (fsdp); {cls.name} does not")
            check_replicate(cfg.parallel.dp_replicate, world_size // stages)
        if cfg.checkpoint.async_ and not cls.async_checkpoints:
            raise UserError(f"checkpoint.async: not offered with parallel.backend={cls.name}, which writes its own "
                            "checkpoint format; use checkpoint.async=false, or ddp or fsdp")
        if cfg.parallel.compile and not cls.compiles_blocks:
            raise UserError(f"parallel.compile: not offered with parallel.backend={cls.name}; use ddp, fsdp or none")
    # Bytes per parameter held by each rank as (weights, gradients, optimizer state) for fp32 AdamW,
    # as a function of the data-parallel size: used by `dist-train plan` for the memory estimate.
    @classmethod
    def bytes_per_param(cls, world: int, cfg: Config) -> tuple[float, float, float]:
        return 4.0, 4.0, 8.0

    @classmethod
    def plan_rows(cls, cfg: Config, plan) -> None:
        """Add or replace rows of `dist-train plan`'s table (`plan.set(label, text)`)."""

    def __init__(self, cfg: Config, ctx: DistContext, mesh=None, checkpoint_key: Optional[str] = None):
        """`mesh`: the 1-D data-parallel DeviceMesh to replicate or shard over (default: every rank;
        a local-learning stage passes its own sub-mesh). `checkpoint_key`: a prefix for this
        backend's entries, so that several stages' shards can share one checkpoint folder."""
        self.cfg = cfg
        self.ctx = ctx
        self.mesh = mesh if mesh is not None else ctx.dp_mesh
        # What a sharding backend shards over: the same ranks, 2-D under HSDP (`DistContext.shard_mesh`).
        self.shard_mesh = ctx.shard_mesh if self.mesh is ctx.dp_mesh else self.mesh
        self.dp_size = self.mesh.size() if self.mesh is not None else 1
        self.checkpoint_key = checkpoint_key
        self.model: nn.Module  # what forward is called on (may be a wrapper)
        self.module: nn.Module  # the user's model inside any wrapper
        self.optimizer: torch.optim.Optimizer
        self.accum = cfg.train.grad_accum

    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        """Apply the parallelism to `model` (already on the device) and build the optimizer."""

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the forward's matmuls run in (bf16 under mixed precision): what MFU's peak is for."""
        return torch.bfloat16 if self.cfg.parallel.mixed_precision == "bf16" else torch.float32

    def autocast(self) -> ContextManager:
        """Mixed-precision context for forward; backends whose wrapper casts parameters return a no-op."""
        if self.compute_dtype == torch.bfloat16:
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def sync_context(self, is_last: bool) -> Iterator[None]:
        """Around forward+backward of a micro-batch: skip gradient communication unless `is_last`."""
        yield

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        """`loss` is the micro-batch mean; scale so accumulated gradients are the global-batch mean."""
        (loss / self.accum).backward()

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)  # each param group keeps its ratio to the scheduled lr

    def step(self, transform: Optional["GradientTransform"] = None,
             accept: Optional[Callable[[Optional[float]], bool]] = None) -> float:
        """Gradient transform (default: clip at train.grad_clip), optimizer step, zero gradients.
        `accept(norm)` may veto the optimizer step (a non-finite step: `train.on_nonfinite`); it
        must give the same verdict on every replica. Returns the gradient norm the transform reports
        (the global norm before clipping)."""
        from dist_train.optim.transform import GradientTransform

        norm = (transform or GradientTransform(self.cfg))(self)
        if accept is None or accept(norm):
            self.optimizer.step()
        self.zero_grad()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def clip_grad_norm(self, max_norm: float) -> float:
        limit = max_norm if max_norm > 0 else float("inf")
        if hasattr(self.optimizer, "clip_grad_norm"):
            # An optimizer that places gradients itself (FairScale's OSS on their owners; owner-
            # computes Muon reduce-scatters matrices) also knows how to count each element once.
            return float(self.optimizer.clip_grad_norm(limit))
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), limit)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # --- checkpoint state -------------------------------------------------------------------
    # Default: torch.distributed.checkpoint with torch's state-dict helpers, which understand DDP,
    # FSDP2 (DTensor shards) and plain modules alike. An optimizer whose state lives on owner ranks
    # (Muon, NorMuon) names its own tensors (`dcp_state_dict`). Backends with their own sharded
    # optimizer format override these.
    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        if hasattr(self.optimizer, "dcp_state_dict"):
            optim_sd = self.optimizer.dcp_state_dict()
        else:
            optim_sd = get_optimizer_state_dict(self.module, self.optimizer)
        return {"model": get_model_state_dict(self.module), "optim": optim_sd}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(self.module, state["model"])
        # A `dcp_state_dict` hands DCP the optimizer's live tensors, which it has loaded in place.
        if not hasattr(self.optimizer, "dcp_state_dict"):
            set_optimizer_state_dict(self.module, self.optimizer, state["optim"])

    def _keyed(self, state: dict) -> dict:
        return {self.checkpoint_key: state} if self.checkpoint_key else state

    def checkpoint_state(self) -> dict:
        """What `save` writes with DCP (and `checkpoint.async` stages): the state under this backend's key."""
        return self._keyed(self.state_dict())

    def save(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            # Without a process group DCP warns that it assumes one process: that is backend none.
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.save(self.checkpoint_state(), checkpoint_id=path)

    def load(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp

        state = self._keyed(self.state_dict())  # the shapes/shardings to load into
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.load(state, checkpoint_id=path)
        self.load_state_dict(state[self.checkpoint_key] if self.checkpoint_key else state)
