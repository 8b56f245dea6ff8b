"""The one loss every reference model uses: mean token/example cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position: [B,T,V] vs [B,T] (lm) or [B,C] vs [B] (classify).

    Flattening makes both tasks one code path, and taking the *mean* over equally sized
    per-rank slices means the average of per-rank losses equals the single-process loss.
    Local-learning auxiliary heads reuse this so their losses are on the same scale.
    """
    # float32 logits: a bf16 log-softmax over a large vocabulary loses visible precision.
    return F.cross_entropy(outputs.reshape(-1, outputs.size(-1)).float(), targets.reshape(-1))
