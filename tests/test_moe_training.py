"""The PDE task through the framework: `dist-train run` on 2 gloo ranks (DDP over the basis network,
experts spread over the ranks) against one process, the metrics it reports, resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import assert_user_error, forked_cli, forked_run

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "moe_pde.yaml"
SMALL = ["train.steps=6", "train.log_every=2", "train.eval_every=3", "train.eval_batches=1", "train.batch_size=4",
         "data.nx=33", "data.nt=17", "data.num_examples=40", "moe.points=128", "moe.basis=8", "model.width=16",
         "model.n_layer=2", "telemetry.progress=off", "telemetry.energy=none", "checkpoint.every=3",
         "runtime.threads=1"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(tmp: Path, name: str, *extra: str, nproc: int = 2) -> Path:
    forked_run([str(CONFIG), *SMALL, f"run.dir={tmp}", f"run.name={name}", *extra], tmp, nproc=nproc)
    return tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("moe")
    return {"two": _run(tmp, "two"), "one": _run(tmp, "one", "parallel.backend=none", nproc=1), "tmp": tmp}


def test_two_ranks_match_one_process(runs) -> None:
    # float32 basis network on batch slices vs the whole batch; the float64 solves agree to ~1e-8.
    two, one = _rows(runs["two"]), _rows(runs["one"])
    assert [r["step"] for r in two] == [r["step"] for r in one] == [2, 3, 4, 6]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
        if "val_rel_l2" in b:
            assert a["val_rel_l2"] == pytest.approx(b["val_rel_l2"], rel=1e-4)
    assert two[-1]["loss"] != two[0]["loss"]


def test_fno_basis_two_ranks_match_one_process(runs) -> None:
    # The FNO basis (its Fourier weights stored as real tensors) through DDP and the expert exchange.
    fno = ["model.name=basis_fno", "model.modes=4", "train.steps=3", "train.eval_every=3"]
    two = _rows(_run(runs["tmp"], "fno_two", *fno))
    one = _rows(_run(runs["tmp"], "fno_one", *fno, "parallel.backend=none", nproc=1))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [2, 3]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
    assert two[-1]["val_rel_l2"] == pytest.approx(one[-1]["val_rel_l2"], rel=1e-4)
    assert two[-1]["loss"] != two[0]["loss"]


def test_two_expert_groups_on_four_ranks_match_one_process(runs) -> None:
    # The mesh's "ep" view on 4 real ranks: ranks {0, 1} and {2, 3} each hold all 4 experts.
    four = _rows(_run(runs["tmp"], "groups", "moe.expert_parallel=2", nproc=4))
    one = _rows(runs["one"])
    assert [r["step"] for r in four] == [r["step"] for r in one]
    for a, b in zip(four, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
    # every expert's solve time is the largest over all four ranks, both groups included
    assert all(four[-1][f"expert{k}_solve_s"] > 0 for k in range(4))


def test_metrics_report_error_residual_and_each_expert(runs) -> None:
    last = _rows(runs["two"])[-1]
    assert 0 < last["val_rel_l2"] < 1 and last["val_residual"] > 0
    assert all(last[f"expert{k}_solve_s"] > 0 for k in range(4))  # experts 1 and 3 live on rank 1
    assert all(0 < last[f"val_rel_l2_expert{k}"] < last["val_rel_l2"] for k in range(4)), last
    # rho = 1: the linearised start is never the solution, so LM iterates, within its cap (moe.lm_max_iter)
    assert last["lm_iterations"] >= 1, last
    assert last["lm_iterations"] < 50, last
    assert last["lm_unconverged"] == 0, last  # every sample met the tolerance
    assert last["constraint_grad_norm"] < 1e-6
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["two"] / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/rel_l2", "eval/residual", "moe/lm_iterations", "moe/expert3_solve_s", "moe/constraint_grad_norm",
            "train/loss"} <= tags, sorted(tags)


def test_resume_continues_exactly(runs) -> None:
    tmp = runs["tmp"]
    full = _rows(runs["two"])
    cut = _run(tmp, "cut", "train.steps=3")
    resumed = _rows(_run(tmp, "cut"))  # same run name: resumes from step 3's checkpoint
    assert [r["step"] for r in resumed] == [2, 3, 4, 6] and cut.exists()
    for a, b in zip(resumed[2:], full[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


@pytest.mark.parametrize("constraint", [["moe.constraint=soft"], ["moe.experts=1"]])
def test_baselines_train_in_the_same_code(runs, constraint) -> None:
    rows = _rows(_run(runs["tmp"], constraint[0].replace("=", "_").replace(".", "_"), *constraint))
    assert rows[-1]["val_rel_l2"] > 0
    if constraint == ["moe.constraint=soft"]:
        assert "lm_iterations" not in rows[-1]
    else:
        assert rows[-1]["expert0_solve_s"] > 0


@pytest.mark.parametrize("override,needles", [
    ("moe.experts=40", ["moe.experts: 40 sub-domains in space do not fit the 31 interior columns"]),
    ("moe.points=5000", ["moe.points: expert 0 would need 1250 residual points"]),
    ("moe.time_splits=3", ["moe.time_splits: 3 does not divide moe.experts=4"]),
    ("moe.overlap=33", ["moe.overlap: 33 columns must be at least 0 and below the grid's 33 columns"]),
    ("moe.expert_parallel=2", ["moe.expert_parallel: expert groups of 2 ranks do not divide the 1 data-parallel"]),
    ("parallel.backend=fsdp", ["parallel.backend: the PDE task runs under ddp or none"]),
    ("parallel.stages=2", ["parallel.stages: the PDE task trains end to end"]),
    ("model.name=mlp", ["model.name: mlp needs an image data set"]),
])
def test_bad_input_is_one_line(tmp_path, override, needles) -> None:
    proc = forked_cli(["run", str(CONFIG), *SMALL, f"run.dir={tmp_path}", "parallel.backend=none", override], tmp_path)
    assert_user_error(proc, *needles)
    assert not (tmp_path / "moe_pde").exists()


def test_export_refuses_a_pde_run_in_one_line(runs) -> None:
    proc = forked_cli(["export", str(runs["two"])], runs["tmp"])
    assert_user_error(proc, "export: PDE runs (model.name basis_mlp, basis_fno) are not exported")
