"""AugLocal: auxiliary networks made of fresh copies of layers sampled from those that follow.

Ma, Wu, Si, Tan, "Scaling Supervised Local Learning with Augmented Auxiliary Networks", ICLR 2024,
arXiv 2402.17318; official code github.com/ChenxiangMA/AugLocal.

WHY: a local layer is short-sighted because its head looks nothing like the network that will
consume its output. AugLocal builds the auxiliary network of hidden layer l from d_l layers
sampled uniformly from the layers after l -- their *architecture*, with fresh weights (no weights or
gradients travel between stages) -- followed by the model's kind of output head, and trains the
layer and that network on the task loss:

    L_l = CE( out_l( b_{j_{d_l}} ∘ … ∘ b_{j_1}(h_l) ), y ).                                 (1)

Pyramidal depth (the paper's depth rule; `networks/resnet.py` of the official code, `is_pyramid`):
for local layer i = 0..L-2 of L,

    d_i = max(d_min, round(d·(1 − τ·i/(L−2)) + d_min·τ·i/(L−2)))    (i/(L−2) := 0 when L = 2), (2)

a linear fall from d at the first layer towards d_min, at rate τ (the decay coefficient); round() is
Python's, as in the official code. When d_i is at least the number n of layers after l, the
auxiliary network takes all of them (official code).

Uniform sampling (official `unifSamp`): the later layers are taken at evenly spaced positions that
end at the network's last layer, position round(n·s/d_i) for s = 1..d_i, i.e. later block
j_s = round(n·s/d_i) − 1 (0-based among the n later blocks).                                   (3)

Defaults: d = 3, τ = 0.5, d_min = 1 -- the official README's ResNet-110 command
(`--aux_net_depth 3 --pyramid --pyramid_coeff 0.5`; d_min is 1 in the official code).

Adaptations (named): a pipeline stage plays the paper's hidden layer, so i is the stage index and
L = K, and "the layers after l" are the model's blocks after the stage. The official code rounds
j_s as round(l + n·s/d_i) with the layer's absolute index l (Python's round, ties to even, so the
choice at an exact tie depends on l's parity); a stage does not know its absolute index, so (3)
rounds ties up. The output head is the model's own kind (`_common.output_head`: the GPT's
LayerNorm + Linear to the vocabulary, pool + Linear for the CNN, Linear for the MLP).

Copies: `copy.deepcopy` of the block (so they never share tensors with the model), then every
submodule with `reset_parameters` is re-initialised, so only the architecture is borrowed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from pydantic import Field

from dist_train.config.options import Options
from dist_train.errors import UserError
from dist_train.local.method import LocalMethod, StageInfo
from dist_train.local.methods._common import check_info, fresh_copy, output_head
from dist_train.models.loss import cross_entropy


def head_depth(index: int, num_stages: int, depth: int, decay: float, min_depth: int) -> int:
    """d_i of Eq. (2), before the cap at the number of later blocks."""
    r = index / (num_stages - 2) if num_stages > 2 else 0.0
    return max(min_depth, round(depth * (1 - decay * r) + min_depth * decay * r))


def sample_indices(num_later: int, depth: int) -> list[int]:
    """Eq. (3): `depth` evenly spaced indices into range(num_later), ending at the last one; all of
    them when depth >= num_later."""
    if depth >= num_later:
        return list(range(num_later))
    return [math.floor(num_later * s / depth + 0.5) - 1 for s in range(1, depth + 1)]


class AugLocalHead(nn.Module):
    def __init__(self, blocks: list[nn.Module], out: nn.Module, sampled: list[int]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.out = out
        self.sampled = tuple(sampled)  # which later blocks were copied (for logs and tests)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)
        return self.out(h)


class AugLocalOptions(Options):
    depth: int = Field(3, ge=1, description="AugLocal: d, the auxiliary depth (layers copied from the later ones) of the first stage (official README, ResNet-110: 3).")
    decay: float = Field(0.5, ge=0, le=1, description="AugLocal: tau, the pyramidal decay coefficient: the depth falls linearly from d towards min_depth over the local stages (official README: 0.5).")
    min_depth: int = Field(1, ge=1, description="AugLocal: d_min, the smallest auxiliary depth (official code: 1).")


class AugLocal(LocalMethod):
    name = "auglocal"
    options = AugLocalOptions

    def __init__(self, depth: int = 3, decay: float = 0.5, min_depth: int = 1):
        if min_depth < 1 or depth < min_depth:
            raise UserError(f"local.auglocal: need 1 <= min_depth <= depth, got min_depth={min_depth}, "
                            f"depth={depth}")
        if not 0 <= decay <= 1:
            raise UserError(f"local.auglocal.decay: must be in [0, 1], got {decay}")
        self.depth, self.decay, self.min_depth = depth, decay, min_depth

    def build_head(self, info: StageInfo) -> nn.Module:
        check_info(info)
        later = list(info.later_blocks)
        if not later:
            raise UserError(f"local.method: auglocal stage {info.index} has no later blocks to copy "
                            f"(only non-last stages get a head)")
        d = head_depth(info.index, info.num_stages, self.depth, self.decay, self.min_depth)
        idx = sample_indices(len(later), d)
        return AugLocalHead([fresh_copy(later[i]) for i in idx], output_head(info), idx)

    def local_loss(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   x: Optional[torch.Tensor], info: StageInfo) -> torch.Tensor:
        return cross_entropy(head(h), targets)
