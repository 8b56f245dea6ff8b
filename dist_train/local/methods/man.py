"""MAN: Momentum Auxiliary Network (Su et al., "Momentum Auxiliary Network for Supervised Local
Learning", ECCV 2024, arXiv 2407.05623).

A greedy stage is short-sighted: its head knows nothing of what the next stage will do with its
features. MAN gives stage k an auxiliary network whose first layer is an exponential moving average
of the *next* stage's first block θ_{k+1}, updated every step (the paper's Eq. for the EMA)

    θ_ema ← m · θ_ema + (1 − m) · θ_{k+1},    m = `local.man.momentum` (paper: 0.995),

plus a learnable biased interface LB (the paper's learnable bias that corrects the feature
mismatch between the EMA block and stage k's output). The head is

    g_k(h) = C( EMA(h) + LB(h) ),

where EMA is the averaged copy of block θ_{k+1} (no gradient, moved only by the update above), LB is a
trainable block of the same architecture (freshly initialised) and C the DGL-style small
classifier; L_k = CE(g_k(h_k), y).

Across ranks the EMA needs the next stage's weights: stage k+1 sends its first block's parameters
back every `local.man.every` steps (1 = every step, as in the paper) on the link's weight channel —
weights, never gradients, non-blocking; the bytes are counted (`weight_bytes_sent`). Stage k applies
the message sent after step s − d at the start of step s (d = `local.man.delay`, default 2).

Named simplification: the weights stage k averages are d steps old (the pipeline's latency: stage
k+1 runs behind stage k), where the single-process paper averages the same step's weights. A fixed
d, rather than "whatever has arrived", keeps runs deterministic.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from pydantic import Field

from dist_train.config.options import Options
from dist_train.errors import UserError
from dist_train.local.channels import Channel, ChannelContext
from dist_train.local.method import LocalMethod, StageInfo
from dist_train.local.methods._common import fresh_copy, small_classifier
from dist_train.local.stage import HeadStage
from dist_train.models.loss import cross_entropy


class MANHead(nn.Module):
    def __init__(self, next_block: nn.Module, out: nn.Module):
        super().__init__()
        # Starts equal to the next block (θ_ema at step 0 = θ_{k+1} at init, as in the paper).
        self.ema = copy.deepcopy(next_block)
        for p in self.ema.parameters():
            p.requires_grad_(False)  # moved only by the EMA update, never by the optimizer
        self.lb = fresh_copy(next_block)
        self.out = out

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.ema(h) + self.lb(h))


class MANOptions(Options):
    momentum: float = Field(0.995, ge=0, lt=1, description="MAN: EMA momentum m of the next stage's first block (paper: 0.995).")
    every: int = Field(1, ge=1, description="MAN: steps between weight messages from the next stage (1 = every step, as in the paper).")
    delay: int = Field(2, ge=1, description="MAN: a weight message sent after step s is applied at the start of step s + delay (fixed, so runs are deterministic).")


class MAN(LocalMethod):
    name = "man"
    options = MANOptions

    def __init__(self, momentum: float = 0.995, every: int = 1, delay: int = 2):
        if not 0.0 <= momentum < 1.0:
            raise UserError(f"local.man.momentum: must be in [0, 1), got {momentum}")
        if every < 1 or delay < 1:
            raise UserError(f"local.man.every and local.man.delay: must be >= 1, got {every} and {delay}")
        self.momentum, self.every, self.delay = momentum, every, delay

    @classmethod
    def check(cls, cfg, world_size: int) -> None:
        from dist_train.registry import BACKENDS

        dp = world_size // cfg.parallel.stages
        if dp > 1 and BACKENDS.get(cfg.parallel.backend).shards_parameters:
            raise UserError(f"local.method: man sends its first block's whole weights backward, which a sharded "
                            f"stage ({cfg.parallel.backend}) does not hold; use parallel.backend ddp")

    @classmethod
    def plan_stages(cls, cfg, ranges: list[range]) -> tuple[list[str], str]:
        parts, traffic = super().plan_stages(cfg, ranges)
        every = cfg.local.options("man")["every"]
        return parts, traffic + f", weights back every {every} step(s)"

    def build_head(self, info: StageInfo) -> nn.Module:
        if not info.later_blocks:
            raise UserError("local.method: man needs a block after every non-last stage")
        return MANHead(info.later_blocks[0], small_classifier(info))

    def local_loss(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   x: Optional[torch.Tensor], info: StageInfo) -> torch.Tensor:
        return cross_entropy(head(h), targets)

    def build_stage(self, model: nn.Module, blocks: range, info: StageInfo) -> nn.Module:
        return MANStage(model, blocks, self, info)

    @torch.no_grad()
    def update_ema(self, head: MANHead, flat_weights: torch.Tensor) -> None:
        """θ_ema ← m θ_ema + (1 − m) θ_{k+1}, with θ_{k+1} as just received (flattened)."""
        params = list(head.ema.parameters())
        received = torch.split(flat_weights, [p.numel() for p in params])
        for p, w in zip(params, received):
            p.mul_(self.momentum).add_(w.view_as(p).to(p.dtype), alpha=1 - self.momentum)


def flat_block_weights(block: nn.Module) -> torch.Tensor:
    """What the next stage sends back: its first block's parameters, flattened (detached)."""
    return torch.cat([p.detach().reshape(-1).float() for p in block.parameters()])


class MANStage(HeadStage):
    """A HeadStage that owns the weight channel: it receives EMA updates (if not last) and sends its
    own first block back (if not first)."""

    def channels(self, ctx: ChannelContext) -> list[Channel]:
        return [MANWeights(self, ctx)]


class MANWeights(Channel):
    """Stage k+1 sends its first block after steps start, start+every, ...; stage k applies the
    message sent after step s - delay at the start of step s (waiting for it if it is late), so the
    EMA follows a fixed schedule: runs are deterministic and the sequential reference reproduces them.
    Messages still due at the end are applied after the last step."""

    name = "man_weights"

    def __init__(self, stage: MANStage, ctx: ChannelContext):
        self.stage, self.ctx = stage, ctx
        self.method: MAN = stage.method
        self.expected = len(range(ctx.start, ctx.cfg.train.steps, self.method.every)) if not stage.last else 0
        self.numel = sum(p.numel() for p in stage.head.ema.parameters()) if not stage.last else 0
        self.received = 0

    def _take_one(self) -> None:
        self.method.update_ema(self.stage.head, self.ctx.link.poll_weights(self.numel, block=True))
        self.received += 1

    def before_step(self, step: int) -> None:
        sent_at = step - self.method.delay
        if not self.stage.last and sent_at >= self.ctx.start and (sent_at - self.ctx.start) % self.method.every == 0:
            self._take_one()

    def after_step(self, step: int) -> None:
        if not self.stage.first and (step - self.ctx.start) % self.method.every == 0:
            self.ctx.link.send_weights(flat_block_weights(self.stage.blocks[0]))

    def finish(self) -> None:
        while self.received < self.expected:  # every message sent is received
            self._take_one()

    def metrics(self) -> dict:
        return {"weight_bytes_sent": self.ctx.link.weight_bytes_sent, "weight_msgs_received": self.received}
