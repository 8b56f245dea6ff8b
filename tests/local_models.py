"""Tiny GPT / MLP / CNN models, batches and stage descriptions shared by the local-method tests."""

from __future__ import annotations

import torch

from dist_train.local.method import StageInfo
from dist_train.local.split import stage_block_ranges
from dist_train.models import CNN, GPT, MLP


def make_model(name: str, n_layer: int = 4):
    torch.manual_seed(0)
    if name == "gpt":
        return GPT(vocab_size=256, n_layer=n_layer, width=32, n_head=2, block_size=8)
    if name == "mlp":
        return MLP(in_features=64, num_classes=10, n_layer=n_layer, width=32)
    return CNN(in_channels=1, image_size=8, num_classes=10, n_layer=n_layer, width=8)


def make_batch(name: str):
    g = torch.Generator().manual_seed(1)
    if name == "gpt":
        x = torch.randint(0, 256, (4, 8), generator=g)
        return x, torch.roll(x, -1, dims=1)  # learnable next-token-like targets
    if name == "mlp":
        return torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
    return torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def stage_info(model, name: str, index: int, num_stages: int) -> tuple[StageInfo, range]:
    blocks = stage_block_ranges(model, num_stages)[index]
    info = StageInfo(index=index, num_stages=num_stages, task=model.task, width=model.width,
                     num_classes=256 if name == "gpt" else 10,
                     later_blocks=tuple(model.blocks[i] for i in range(blocks.stop, len(model.blocks))),
                     model_name=name)
    return info, blocks


def fit(params, loss_at, steps: int = 20, lr: float = 1e-2) -> float:
    """`steps` Adam steps on `loss_at(step)`; returns the loss afterwards (on the same batch as
    step 7, so it compares with the loss before training)."""
    opt = torch.optim.Adam(list(params), lr=lr)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_at(step).backward()
        opt.step()
    with torch.no_grad():
        return loss_at(7).item()


def assert_stages_match_reference(run_dir, cfg, rel: float = 1e-5) -> None:
    """Each stage's logged losses in a pipeline run (`run_dir/stages/stage<k>/metrics.jsonl`) equal
    the sequential single-process reference of `cfg` (`local_reference`) at `rel`, and the last stage
    really trains (its first and last losses differ)."""
    import json
    from pathlib import Path

    import pytest

    from dist_train.train.local_reference import local_reference

    ref = local_reference(cfg)["losses"]
    for k, expected in enumerate(ref):
        lines = (Path(run_dir) / "stages" / f"stage{k}" / "metrics.jsonl").read_text().splitlines()
        got = [json.loads(line)["loss"] for line in lines if line.strip()]
        assert got == pytest.approx(expected, rel=rel), f"stage {k}"
    assert ref[-1][0] != pytest.approx(ref[-1][-1], rel=1e-3)  # the stages really train
