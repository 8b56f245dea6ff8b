"""A model of one's own: `model.name: "package.module:factory"` (imported, called with the data set's
sizes and model.options) and `register_model` from Python; the example in examples/ trains under
`dist-train launch`; a model lacking what a feature needs, an import path that does not resolve and a
factory that returns no module each end in one line and exit 2, with nothing trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cli_helpers import CLI, assert_user_error, clean_env, forked_cli, forked_run
from dist_train.config import load_config
from dist_train.models import build_model, register_model
from dist_train.data import build_dataset
from dist_train.registry import MODELS

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = ["examples/tiny_decoder.yaml", "train.steps=3", "train.log_every=1", "train.batch_size=8",
           "model.block_size=16", "data.max_bytes=100000", "train.eval_batches=1", "telemetry.progress=off",
           "telemetry.tensorboard=false", "runtime.threads=1"]

# A module of one's own, written to a temporary folder and named by file path.
MODULE = '''
import torch.nn as nn

def build(vocab_size, block_size, width=8):
    return nn.Sequential(nn.Embedding(vocab_size, width), nn.Linear(width, vocab_size))

def not_a_module(vocab_size, block_size):
    return {"weights": 1}

def classifier(num_classes, input_shape, hidden=16):
    import math
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
'''

# embed -> blocks -> head and a width, but no local_kind (the test appends one)
STACKED = '''
import torch.nn as nn

def build(vocab_size, block_size):
    model = nn.Module()
    model.embed = nn.Embedding(vocab_size, 8)
    model.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
    model.head = nn.Linear(8, vocab_size)
    model.width = 8
    model.forward = lambda x: model.head(model.blocks[1](model.blocks[0](model.embed(x))))
'''

SMALL = ["train.steps=2", "train.batch_size=4", "model.block_size=8", "data.max_bytes=20000", "train.eval_batches=1",
         "telemetry.progress=off", "telemetry.tensorboard=false", "runtime.threads=1"]


@pytest.fixture
def module(tmp_path) -> str:
    path = tmp_path / "my_models.py"
    path.write_text(MODULE)
    return str(path)


def test_import_path_passes_sizes_and_options(module):
    cfg = load_config("quickstart.yaml", [f"model.name={module}:build", "model.options={width: 12}",
                                          "parallel.stages=1", *SMALL])
    model = build_model(cfg.model, build_dataset(cfg.data, cfg.model.block_size).info)
    assert model[0].num_embeddings == 256 and model[0].embedding_dim == 12
    out = model(torch.zeros(2, 8, dtype=torch.long))
    # No loss of its own: the default, mean cross-entropy, against the next tokens.
    assert torch.isclose(model.loss(out, torch.zeros(2, 8, dtype=torch.long)),
                         nn.functional.cross_entropy(out.reshape(-1, 256), torch.zeros(16, dtype=torch.long)))


def test_import_path_task_follows_the_factory(module):
    """A factory that takes num_classes reads image data: it gets num_classes and input_shape."""
    cfg = load_config("quickstart.yaml", [f"model.name={module}:classifier", "data.name=digits", "parallel.stages=1"])
    assert MODELS.get(cfg.model.name).task == "classify"
    model = build_model(cfg.model, build_dataset(cfg.data, cfg.model.block_size).info)
    assert model[-1].out_features == 10 and model[1].in_features == 64


def test_register_model_from_python():
    def build(vocab_size, block_size, depth=1):
        return nn.Sequential(nn.Embedding(vocab_size, 4), *[nn.Linear(4, 4) for _ in range(depth)], nn.Linear(4, vocab_size))

    register_model("test_factory_model", build, task="lm")
    try:
        cfg = load_config("quickstart.yaml", ["model.name=test_factory_model", "model.options={depth: 3}", "parallel.stages=1"])
        model = build_model(cfg.model, build_dataset(cfg.data, cfg.model.block_size).info)
        assert len(model) == 5
    finally:
        MODELS.unregister("test_factory_model")


def test_example_trains_on_two_forked_ranks(tmp_path):
    out = forked_run([*EXAMPLE, f"run.dir={tmp_path}"], cwd=REPO, nproc=2)
    assert "done: step 3" in out
    assert (tmp_path / "tiny_decoder" / "checkpoints").is_dir()


def test_example_trains_as_local_learning_stages(tmp_path):
    out = forked_run([*EXAMPLE, "parallel.stages=2", "parallel.backend=ddp", f"run.dir={tmp_path}"], cwd=REPO, nproc=2)
    assert "done: step 3" in out


@pytest.mark.slow
def test_example_trains_under_launch(tmp_path):
    import subprocess

    proc = subprocess.run([*CLI, "launch", *EXAMPLE[:1], "--nproc", "2", "--threads", "1", *EXAMPLE[1:],
                           f"run.dir={tmp_path}"], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: step 3" in proc.stdout


@pytest.mark.parametrize("name, needles", [
    ("no_such_package.models:build", ["model.name: cannot import 'no_such_package.models'"]),
    ("{module}:missing", ["has no attribute 'missing'"]),
    ("{module}:not_a_module", ["model.name: ", ":not_a_module returned dict, not a torch.nn.Module"]),
])
def test_bad_factory_is_one_line_and_trains_nothing(tmp_path, module, name, needles):
    proc = forked_cli(["run", "quickstart.yaml", f"model.name={name.format(module=module)}", "parallel.stages=1",
                       *SMALL, f"run.dir={tmp_path}"], cwd=tmp_path)
    assert_user_error(proc, *needles)
    assert not list(tmp_path.rglob("checkpoints"))


def test_missing_feature_names_attribute_and_feature(tmp_path, module):
    proc = forked_cli(["plan", "quickstart.yaml", f"model.name={module}:build", "parallel.stages=2", "--nproc", "2"],
                      cwd=tmp_path)
    assert_user_error(proc, f"model: {module}:build has no `embed` (nn.Module), which parallel.stages=2 needs")
    proc = forked_cli(["plan", "quickstart.yaml", f"model.name={module}:build", "parallel.stages=1",
                       "parallel.activation_checkpointing=true"], cwd=tmp_path)
    assert_user_error(proc, "has no `blocks` (nn.ModuleList), which parallel.activation_checkpointing=full needs")


def test_stages_need_width_and_local_kind(tmp_path):
    """The local methods shape their auxiliary heads by the block outputs' width and layout."""
    path = tmp_path / "stacked.py"
    path.write_text(STACKED + "    return model\n")
    proc = forked_cli(["plan", "quickstart.yaml", f"model.name={path}:build", "parallel.stages=2", "--nproc", "2"],
                      cwd=tmp_path)
    assert_user_error(proc, "has no `local_kind` ('gpt', 'mlp' or 'cnn'), which parallel.stages=2 needs")
    path.write_text(STACKED + "    model.local_kind = 'gpt'\n    return model\n")
    proc = forked_cli(["plan", "quickstart.yaml", f"model.name={path}:build", "parallel.stages=2", "--nproc", "2"],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
