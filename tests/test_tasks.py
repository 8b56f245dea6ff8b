"""The task registry: every data set and model names a registered task, and each task's parts agree."""

from __future__ import annotations

import pytest
import torch

from dist_train.config.schema import Config, ModelSection
from dist_train.data.base import DataInfo
from dist_train.errors import UserError
from dist_train.tasks import TASKS, get_task
from dist_train.registry import DATASETS, MODELS

DATA_TASKS = {name: DATASETS.get(name).task for name in DATASETS}
MODEL_TASKS = {name: MODELS.get(name).task for name in MODELS}
SMALL = {"n_layer": 2, "width": 16}


def test_every_config_choice_belongs_to_a_registered_task() -> None:
    # A data set or model the schema accepts but no task claims would fail only at run time.
    assert set(DATA_TASKS) >= {"stdlib_bytes", "token_bin", "digits", "shapes32", "reaction_diffusion",
                               "diffusion_sorption"}
    assert set(MODEL_TASKS) >= {"gpt", "mlp", "cnn", "basis_mlp", "basis_fno"}
    assert set(DATA_TASKS.values()) | set(MODEL_TASKS.values()) <= set(TASKS)


def _small(name: str, tmp_path) -> dict:
    """A small instance of each registered model's own options (the hf model reads a config file)."""
    if name == "hf":
        import json

        (tmp_path / "config.json").write_text(json.dumps({
            "model_type": "llama", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}))
        return {"hf_config": str(tmp_path)}
    own = MODELS.get(name).options.model_fields
    return {**SMALL, **({"n_head": 2} if "n_head" in own else {}), **({"n_kv_heads": 1} if "n_kv_heads" in own else {})}


@pytest.mark.parametrize("model_name", [m for m, t in MODEL_TASKS.items() if get_task(t).meta_buildable])
def test_task_builds_its_models_and_their_example_runs(model_name: str, tmp_path) -> None:
    task = get_task(MODEL_TASKS[model_name])
    info = DataInfo(task=task.name, vocab_size=50, input_shape=(1, 8, 8), num_classes=10,
                    train_size=100, val_size=10)
    cfg = Config.model_validate({"model": {"name": model_name, "block_size": 8, **_small(model_name, tmp_path)},
                                 "data": {"name": next(d for d, t in DATA_TASKS.items() if t == task.name)}})
    model = task.build_model(cfg.model, info)
    assert model.task == task.name
    out = model(task.example_input(cfg, info, 3, device="cpu"))
    assert out.shape[-1] == task.num_outputs(info)


def test_pde_task_builds_its_model_from_the_moe_section() -> None:
    from dist_train.pde.grid import PDEGrid

    grid = PDEGrid(nx=17, nt=9, t_end=0.5, nu=0.01, rho=1.0)
    info = DataInfo(task="pde", vocab_size=None, input_shape=(17,), num_classes=None, train_size=10, val_size=2,
                    grid=grid)
    cfg = Config.model_validate({"model": {"name": "basis_mlp", "n_layer": 2, "width": 16},
                                 "data": {"name": "reaction_diffusion", "nx": 17, "nt": 9},
                                 "moe": {"experts": 2, "points": 20, "basis": 5}})
    model = get_task("pde").build_for_run(cfg, info, mesh=None)
    assert model.task == "pde" and len(model.experts.subs) == 2
    assert model(torch.rand(3, 17)).shape == (3, 9, 17)
    assert get_task("pde").example_input(cfg, info, 3) is None  # plan gives no activation estimate


def test_classification_reports_accuracy_and_lm_nothing_else() -> None:
    out = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert get_task("classify").eval_sums(out, torch.tensor([1, 1]), None) == {"acc": 0.5}
    assert get_task("lm").eval_sums(out, torch.tensor([1, 1]), None) == {}


def test_unknown_task_and_wrong_model_are_user_errors() -> None:
    with pytest.raises(UserError, match="unknown task 'speech'"):
        get_task("speech")
    info = DataInfo(task="lm", vocab_size=50, input_shape=None, num_classes=None, train_size=1, val_size=1)
    with pytest.raises(UserError, match="model.name: mlp cannot read a token data set"):
        get_task("lm").build_model(ModelSection(name="mlp"), info)


def test_pde_eval_reports_each_experts_share_of_the_error() -> None:
    from types import SimpleNamespace

    from dist_train.pde.domain import decompose
    from dist_train.pde.grid import PDEGrid

    grid = PDEGrid(nx=16, nt=6, t_end=0.5, nu=0.01, rho=1.0)
    model = SimpleNamespace(grid=grid, constraint="hard", experts=SimpleNamespace(subs=decompose(grid, 4, 1, 0)))
    torch.manual_seed(0)
    ref = torch.rand(1, 6, 16)
    u = ref.clone()
    u[0, :, 4:8] += 0.1  # the columns of expert 1 (16 columns in 4 bands of 4)
    u[0, 2:, 12:] -= 0.2  # part of expert 3's
    sums = get_task("pde").eval_sums(u, ref, model)
    whole = ref.norm()
    assert sums["rel_l2_expert0"] == sums["rel_l2_expert2"] == 0
    assert sums["rel_l2_expert1"] == pytest.approx(float(0.1 * (6 * 4) ** 0.5 / whole), rel=1e-5)
    assert sums["rel_l2_expert3"] == pytest.approx(float(0.2 * (4 * 4) ** 0.5 / whole), rel=1e-5)
    assert sums["rel_l2"] ** 2 == pytest.approx(sums["rel_l2_expert1"] ** 2 + sums["rel_l2_expert3"] ** 2, rel=1e-5)
