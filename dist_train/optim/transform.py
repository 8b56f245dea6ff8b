"""What a training step does around its gradients: the seam DP-SGD and DIFF2 plug into.

A step is: draw this rank's examples -> split them into micro-batches -> forward, backward of each
(the data-parallel wrapper reduces its gradients in backward hooks) -> gradient transform -> the
optimizer step. The default transform clips the global gradient norm; a private one (DP-SGD)
clips per example, adds noise once across the world and reduces the gradients itself, and for
that it also chooses the sampling (Poisson), the loss reduction (a sum over examples) and claims the
parameters whose gradients it reduces. No backend contains code for a particular transform.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch

from dist_train.config.schema import Config
from dist_train.errors import UserError


class GradientTransform:
    """The default step: uniform batches, `train.grad_accum` equal micro-batches, mean loss,
    global-norm clipping at `train.grad_clip` (0: no clipping), then the optimizer step.

    Each `optim.name` is a subclass registered in `dist_train.registry.OPTIMIZERS` (the plain ones in
    `dist_train.optim.choices`), and owns its configuration: its rules (`check_config` at load,
    `check` once the world size is known), what `dist-train plan` says of it (`plan_rows`,
    `state_bytes`, `plan_micro_batch`) and how a run builds it (`build`)."""

    name = "clip"
    # The plain step: clip the reduced gradients, then the optimizer. False for a transform that
    # reduces or differentiates itself (DP-SGD, DIFF2): a backend that steps on its own (DeepSpeed)
    # cannot run it.
    plain: bool = True

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # --- configuration (class-level: no run needed) -----------------------------------------
    @classmethod
    def build(cls, cfg: Config, data, ctx, model: torch.nn.Module) -> "GradientTransform":
        """The transform a run uses (`data`: the data set, `ctx`: the DistContext, `model`: unwrapped)."""
        return cls(cfg)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Rules that need only the config, run when it is loaded: raise ValueError naming the key."""

    @classmethod
    def check(cls, cfg: Config, world_size: int) -> None:
        """Rules that need the world size: raise UserError naming the key. The default: every
        data-parallel rank takes the same whole number of examples per micro-batch."""
        stages = cfg.parallel.stages
        dp = world_size // stages if world_size % stages == 0 else world_size
        per_step = dp * cfg.train.grad_accum
        if cfg.train.batch_size % per_step != 0:
            raise UserError(f"train.batch_size: {cfg.train.batch_size} is not divisible by data-parallel size x "
                            f"grad_accum ({dp} x {cfg.train.grad_accum} = {per_step})")

    @classmethod
    def plan_micro_batch(cls, cfg: Config, micro: int) -> int:
        """The micro-batch per rank `dist-train plan` estimates activations for (`micro`: the even split)."""
        return micro

    @classmethod
    def state_bytes(cls, cfg: Config, model: torch.nn.Module, num_outputs: int, backend, dp: int,
                    adamw_bytes: float) -> tuple[float, str]:
        """Optimizer-state bytes per rank for the whole model, and the optimizer in words, for
        `dist-train plan`. `backend`: the backend class; `adamw_bytes`: its per-parameter figure for
        AdamW's two fp32 moments (8, or 8/dp where it shards them)."""
        from dist_train.models import count_parameters

        return count_parameters(model) * adamw_bytes, cfg.optim.name

    @classmethod
    def torch_optimizer(cls, cfg_optim, model: torch.nn.Module, mesh, num_outputs: Optional[int]):
        """The `OptimizerSpec` of the torch optimizer this choice steps with (a private transform has
        none of its own: it builds its base optimizer's)."""
        raise ValueError(f"optim.name: {cfg_optim.name} is not a torch optimizer (it wraps one)")

    @classmethod
    def plan_rows(cls, cfg: Config, plan) -> None:
        """Add or replace rows of `dist-train plan`'s table (`plan.set(label, text)`; `plan.data`,
        `plan.dp` and `plan.world` describe the run)."""

    # --- set-up ---------------------------------------------------------------------------
    def optimizer_spec(self, model: torch.nn.Module, mesh, num_outputs: Optional[int]):
        """The optimizer the backend builds (a private transform picks its base optimizer and claims
        the parameters whose gradients it reduces itself)."""
        from dist_train.optim.build import optimizer_spec

        return optimizer_spec(self.cfg.optim, model, mesh, num_outputs=num_outputs)

    def attach(self, backend) -> None:
        """Called once the backend has wrapped the model and built the optimizer."""

    # Micro-batches of one size: a pipeline link needs no padding. A transform whose micro-batches
    # vary in size names the physical size they are padded to on the wire.
    physical_size: Optional[int] = None

    def sampler(self, data):
        """The training sampler: `next_indices(rank, world)`, `state_dict`, `load_state_dict`."""
        return data.sampler("train", self.cfg.train.seed, self.cfg.train.batch_size)

    def eval_batch_size(self, data, world: int) -> int:
        """Global batch of the evaluation passes (default: the training batch)."""
        return self.cfg.train.batch_size

    # --- one step -------------------------------------------------------------------------
    # False: the transform differentiates on its own (DIFF2's per-example gradients at two iterates);
    # the loop's forward then only gives the logged loss and runs without recording a graph.
    builds_graph = True

    def stop_reason(self) -> Optional[str]:
        """Checked before each step: a reason to end training now (a spent privacy budget), or None."""
        return None

    def micro_batches(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """This rank's step indices as micro-batches (every rank must get the same count here:
        a DDP/FSDP wrapper reduces in the last micro-batch's backward)."""
        return list(indices.chunk(self.cfg.train.grad_accum))

    def backward(self, backend, loss: torch.Tensor, examples: int, is_last: bool, batch=None) -> None:
        """Backward of one micro-batch's mean loss over `examples` examples. `batch`: the micro-batch's
        (inputs, targets) where the loop has them, for a transform that differentiates on its own
        (DIFF2's per-example gradients at two iterates)."""
        backend.backward(loss, is_last)

    def __call__(self, backend) -> float:
        """Transform the (reduced) gradients in place; return the gradient norm to log."""
        return backend.clip_grad_norm(self.cfg.train.grad_clip)

    def metrics(self) -> dict:
        """Extra figures for the step's log record."""
        return {}

    def step_scalars(self) -> dict:
        """Figures written to TensorBoard after every step, not only logging steps."""
        return {}

    # --- checkpoint -----------------------------------------------------------------------
    def checkpointing(self) -> ContextManager:
        """Around saving and loading the backend's state (DP-SGD makes its frozen-for-autograd
        parameters visible to torch's optimizer state-dict helpers, which skip frozen ones)."""
        return contextlib.nullcontext()

    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass
