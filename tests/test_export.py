"""`dist-train export`: a run's model as one safetensors file that loads with
strict=True into the model built from the exported config, for DDP, FSDP2, DeepSpeed ZeRO-3 and a
2-stage local pipeline.

The independent check: the run evaluated its final weights on the validation batches (its last
`val_loss`); the exported model, rebuilt outside the framework's training code, must give the same
loss on the same batches (1e-5 relative: the same float operations, but a pipeline's stages chained
in one process).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_user_error, clean_env, config_file, forked_cli, forked_run
from tiers import fast_first
from layouts import LAYOUTS

YAML = """\
run: {name: x}
model: {name: mlp, n_layer: 4, width: 32}
data: {name: digits}
train: {batch_size: 16, steps: 4, log_every: 2, eval_batches: 3}
optim: {name: adamw, lr: 1.0e-2, warmup_steps: 1}
runtime: {threads: 1}
telemetry: {progress: "off", tensorboard: false}
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return config_file(tmp_path_factory, YAML)


def _val_loss(model: torch.nn.Module, batches: int, batch_size: int) -> float:
    """The run's evaluation, by hand: mean cross-entropy over the first validation batches."""
    from dist_train.data import build_dataset
    from dist_train.config.schema import DataSection

    data = build_dataset(DataSection(name="digits"), block_size=64)
    sampler = data.sampler("val", 0, batch_size)
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(batches):
            x, y = data.get_batch("val", sampler.global_indices(i))
            losses.append(float(torch.nn.functional.cross_entropy(model(x).float(), y)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("layout", fast_first("ddp", *sorted(set(LAYOUTS) - {"ddp"})))
def test_export_loads_strict_and_gives_the_runs_val_loss(layout: str, config: Path, tmp_path: Path) -> None:
    from dist_train.export import load_exported

    env = clean_env(OMP_NUM_THREADS="1")
    forked_run([str(config), f"run.dir={tmp_path}", *LAYOUTS[layout]], tmp_path, nproc=2)
    run = tmp_path / "x"
    out = tmp_path / "model.safetensors"
    exported = forked_cli(["export", str(run), "--out", str(out)], tmp_path, env=env)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert out.is_file() and out.with_suffix(".yaml").is_file()

    from safetensors.torch import load_file

    names = set(load_file(str(out)))
    assert all(n.startswith(("embed.", "blocks.", "head.")) for n in names), sorted(names)  # no aux heads
    model = load_exported(out)  # strict=True inside
    want = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
    got = _val_loss(model, batches=3, batch_size=16)
    assert abs(got - want) <= 1e-5 * abs(want), (got, want)


def test_export_refuses_a_run_without_a_committed_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("run: {name: r}\n")
    assert_user_error(forked_cli(["export", str(run)], tmp_path), "no committed checkpoint")
    assert_user_error(forked_cli(["export", str(tmp_path / "nothing")], tmp_path), "not a run directory")
    assert not (run / "export").exists()
