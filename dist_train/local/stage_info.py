"""What a stage of a local-learning pipeline knows of its place in the model and the task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class StageInfo:
    index: int  # 0-based stage number
    num_stages: int
    task: str  # a key of dist_train.tasks.TASKS
    width: int  # feature size of h (channels for the CNN)
    num_classes: int  # vocab size for "lm", classes for "classify"
    later_blocks: tuple  # the model's blocks after this stage (architecture reference, e.g. AugLocal)
    model_name: str  # "gpt", "mlp" or "cnn"
    input_shape: tuple = ()  # one example of the model input x, e.g. (1, 8, 8); () for token ids
    cut_points: tuple = ()  # the block index where each stage after the first begins (all stages)
    image_norm: Optional[tuple] = None  # DataInfo.image_norm: (mean, std) per channel back to [0, 1] pixels
