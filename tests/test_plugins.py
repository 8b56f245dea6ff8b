"""A component of one's own, with no edit to the package: a local-learning method and a data set
defined in this file and registered here (`register_toys`); a config lists a plugin that calls it
under `plugins:`, and `dist-train launch` / `run` / `plan` train and describe them like the built-in
ones.

Registration is a call rather than a side effect of importing this file, so that the toys do not
appear in the choices other tests in the same pytest worker see (pytest imports every test file
before it runs any)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from cli_helpers import assert_user_error, forked_cli, forked_run
from dist_train.config.options import Options
from dist_train.data.base import DataInfo, DatasetSpec, InMemoryDataset
from dist_train.errors import UserError
from dist_train.local.method import LocalMethod, StageInfo
from dist_train.models.loss import cross_entropy
from dist_train.registry import DATASETS, LOCAL_METHODS

HERE = Path(__file__).resolve()


# --- a toy local-learning method --------------------------------------------------------------------

class ToyLocalOptions(Options):
    scale: float = Field(1.0, gt=0, description="Weight of the local loss (a plain multiplier).")


class ToyLocal(LocalMethod):
    """Each non-last stage trains a linear read-out of its features on `scale` x cross-entropy."""

    name = "toy_local"
    options = ToyLocalOptions

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    @classmethod
    def check(cls, cfg, world_size: int) -> None:
        if cfg.model.name != "mlp":
            raise UserError("local.method: toy_local reads [B, width] features: use model.name mlp")

    @classmethod
    def plan_stages(cls, cfg, ranges):
        parts, traffic = super().plan_stages(cfg, ranges)
        return parts, traffic + f", toy loss x {cfg.local.options('toy_local')['scale']:g}"

    def build_head(self, info: StageInfo) -> nn.Module:
        return nn.Linear(info.width, info.num_classes)

    def local_loss(self, head, h, targets, x, info) -> torch.Tensor:
        return self.scale * cross_entropy(head(h), targets)




# --- a toy data set ---------------------------------------------------------------------------------

class ToyBlobsOptions(Options):
    num_examples: int = Field(600, ge=30, description="Examples generated in all (train + val).")
    noise: float = Field(0.5, gt=0, description="Standard deviation of each pixel around its class's mean.")


class ToyBlobsDataset(InMemoryDataset):
    """10 classes of 1x8x8 'images': a seeded random mean per class plus Gaussian noise."""

    def __init__(self, n: int, noise: float, val_fraction: float):
        g = torch.Generator().manual_seed(0)
        means = torch.randn(10, 1, 8, 8, generator=g)
        y = torch.arange(n) % 10
        x = means[y] + noise * torch.randn(n, 1, 8, 8, generator=g)
        n_val = max(1, round(n * val_fraction))
        self._splits = {"val": (x[:n_val], y[:n_val]), "train": (x[n_val:], y[n_val:])}
        self.info = DataInfo(task="classify", vocab_size=None, input_shape=(1, 8, 8), num_classes=10,
                             train_size=n - n_val, val_size=n_val)


class ToyBlobs(DatasetSpec):
    task = "classify"
    options = ToyBlobsOptions

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.data.test_fraction:
            raise ValueError("data.test_fraction: toy_blobs has no test split")

    @classmethod
    def build(cls, cfg_data, block_size: int) -> ToyBlobsDataset:
        own = cfg_data.options()
        return ToyBlobsDataset(own.num_examples, own.noise, cfg_data.val_fraction)


def register_toys() -> None:
    """What a plugin module does on import: register its components by name."""
    LOCAL_METHODS.register("toy_local", ToyLocal)
    DATASETS.register("toy_blobs", ToyBlobs)


# --- the tests --------------------------------------------------------------------------------------

def _config(tmp_path: Path, extra: str = "") -> Path:
    # The plugin a user would write: a module that registers the components when imported.
    plugin = tmp_path / "toy_plugin.py"
    plugin.write_text(f"import sys\nsys.path.insert(0, {str(HERE.parent)!r})\n"
                      "import test_plugins\ntest_plugins.register_toys()\n")
    path = tmp_path / "toy.yaml"
    path.write_text(f"""plugins: [{plugin}]
run: {{name: toy, dir: {tmp_path / 'runs'}}}
train: {{steps: 40, batch_size: 32, log_every: 10, eval_batches: 2, sample_tokens: 0}}
model: {{name: mlp, n_layer: 4, width: 32}}
data: {{name: toy_blobs, num_examples: 600, noise: 0.5}}
parallel: {{stages: 2, backend: none}}
local: {{method: toy_local, toy_local: {{scale: 2.0}}}}
optim: {{lr: 0.01, warmup_steps: 2}}
telemetry: {{energy: none, tensorboard: false, progress: "off"}}
{extra}""")
    return path


def test_a_plugin_method_and_data_set_train_through_dist_train_run(tmp_path: Path) -> None:
    """2 ranks, one stage each, of `dist-train run` on the plugin's method and data set: both
    stages learn (the local loss of stage 0 and the task loss of stage 1 fall), and the resolved
    config keeps the plugin and the components' own keys."""
    forked_run([str(_config(tmp_path))], tmp_path, nproc=2)
    run = tmp_path / "runs" / "toy"
    stage_loss = []
    for k in range(2):
        rows = [json.loads(line) for line in (run / "stages" / f"stage{k}" / "metrics.jsonl").read_text().splitlines()]
        stage_loss.append([r["loss"] for r in rows if r.get("loss") is not None])
    for k, losses in enumerate(stage_loss):
        assert losses[-1] < 0.7 * losses[0], (k, losses)
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["step"] == 40 and final["val_acc"] > 0.5, final  # 10 classes: chance is 0.1
    resolved = (run / "config.yaml").read_text()
    assert "toy_plugin.py" in resolved and "scale: 2.0" in resolved and "noise: 0.5" in resolved


def test_plan_shows_the_plugins_own_words_and_keys_are_checked(tmp_path: Path) -> None:
    proc = forked_cli(["plan", str(_config(tmp_path)), "--nproc", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "toy_local: embed + blocks 0-1 + aux head | blocks 2-3 + head" in proc.stdout
    assert "toy loss x 2" in proc.stdout and "toy_blobs: 540 train / 60 val" in proc.stdout
    # The plugin's own options model and rules speak for it, in one line and exit 2.
    assert_user_error(forked_cli(["plan", str(_config(tmp_path)), "--nproc", "2", "local.toy_local.scale=-1"], tmp_path),
                      "local.toy_local.scale:")
    assert_user_error(forked_cli(["plan", str(_config(tmp_path)), "--nproc", "2", "data.nois=1"], tmp_path),
                      "data.nois: not read by data.name=toy_blobs")
    assert_user_error(forked_cli(["plan", str(_config(tmp_path)), "--nproc", "2", "model.name=cnn"], tmp_path),
                      "local.method: toy_local reads [B, width] features")


def test_without_the_plugin_the_names_are_unknown_and_a_missing_plugin_is_one_line(tmp_path: Path) -> None:
    text = "\n".join(line for line in _config(tmp_path).read_text().splitlines() if not line.startswith("plugins:"))
    bare = tmp_path / "bare.yaml"
    bare.write_text(text)
    assert_user_error(forked_cli(["plan", str(bare), "--nproc", "2"], tmp_path), "data.name: expected one of", "'toy_blobs'")
    missing = tmp_path / "missing.yaml"
    missing.write_text("plugins: [no_such_plugin_module]\n")
    assert_user_error(forked_cli(["plan", str(missing)], tmp_path), "plugins: cannot import 'no_such_plugin_module'")


def test_a_registry_refuses_a_taken_name_unless_replacing() -> None:
    import pytest

    with pytest.raises(ValueError, match="already registered"):
        DATASETS.register("digits", ToyBlobs)
    try:
        register_toys()
        register_toys()  # the same entries again (a plugin imported twice): no error
        assert "toy_blobs" in DATASETS and "toy_local" in LOCAL_METHODS
    finally:
        DATASETS.unregister("toy_blobs")
        LOCAL_METHODS.unregister("toy_local")
