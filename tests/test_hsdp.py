"""HSDP (`parallel.dp_replicate`): FSDP2 over a ("dp_replicate", "dp_shard") mesh, run for real on 4
gloo ranks as 2 replicas x 2 shards, against one process.

* gpt, as one chain that is also the elastic resume FSDP(4) -> HSDP(2 x 2) -> one process: steps
  1-2 under FSDP on 4 ranks, 3-4 under HSDP, 5-6 in one process, each resuming the last one's
  checkpoint (DCP reshards at each hand-over). Every step's loss and the weights after the HSDP
  phase (its HSDP shards loaded into one process) and at the end equal one uninterrupted process.
  The learning rate is constant after warm-up, so that a run stopped after step k (its end-of-run
  checkpoint) is the prefix of the longer run. The HSDP phase reads the stand-in NVML of
  tests/stand_in: the energy all-gathers (over the flat dp group, not the 2-D mesh) give
  well-formed records.
* llama, HSDP from the start: built on the meta device, each rank initialising only its own rows.
  With the 2-D placements (Replicate(), Shard(0)) the full weights equal the one-process init
  exactly, and a 4-step run gives one process's losses and final weights.
* Local-learning stages with HSDP replicas: 2 stages on 4 ranks leave 2 ranks per stage, so the only
  layout that is HSDP rather than plain FSDP is 2 replicas x 1 shard per stage; its per-stage losses
  equal the sequential reference, as tests/test_local_pipeline.py checks plain replicas.
* `dist-train plan` (both degrees, bytes per rank over dp_shard), the Slurm default (R = the node
  count for a sharding backend), and bad layouts (one line, exit 2), without training.

Tolerances: losses 1e-4 relative (as tests/test_backends_multiproc.py: the same float sums in another
order, ~1e-7 observed); final weights 5e-5 absolute after 6 AdamW steps at lr 3e-3 (observed up to
~3e-6: Adam divides each update by its own gradient scale, so reduction-order noise on a near-zero
gradient moves a weight by more than the gradients' own relative noise; a wrong shard, a missing
average or a skipped replica moves weights by about lr per step, 1e-3 and more).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Optional

import pytest
import torch

from cli_helpers import assert_user_error, forked_cli, forked_ranks, forked_run
from local_models import assert_stages_match_reference
from dist_train.config import load_config

STAND_IN = Path(__file__).parent / "stand_in"
STEPS = 6
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 5e-5
HSDP = ["parallel.backend=fsdp", "parallel.dp_replicate=2"]
COMMON = ["train.batch_size=8", "train.log_every=1", "train.eval_batches=1", "train.sample_tokens=0",
          "optim.warmup_steps=2", "optim.schedule=constant", "telemetry.tensorboard=false",
          "telemetry.progress=off", "runtime.threads=1", "parallel.stages=1", "checkpoint.every=0"]
GPT = ["model.n_layer=2", "model.width=32", "model.n_head=2", "model.block_size=16", "data.max_bytes=200000", *COMMON]
LLAMA = ["model.name=llama", "model.n_layer=2", "model.width=32", "model.n_head=4", "model.n_kv_heads=2",
         "model.multiple_of=32", "model.block_size=16", "data.max_bytes=200000", *COMMON]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _single(run_dir: Path, name: str, *overrides: str, steps: int = STEPS) -> list[dict]:
    forked_run(["quickstart.yaml", f"run.dir={run_dir}", f"run.name={name}", f"train.steps={steps}",
                "parallel.backend=none", *overrides], run_dir, nproc=1)
    return _metrics(run_dir / name)


def _forked(run_dir: Path, name: str, *overrides: str, steps: int = STEPS, nproc: int = 4) -> list[dict]:
    forked_run(["quickstart.yaml", f"run.dir={run_dir}", f"run.name={name}", f"train.steps={steps}", *overrides],
               run_dir, nproc=nproc)
    return _metrics(run_dir / name)


def _weights(run: Path, step: Optional[int] = None) -> dict[str, torch.Tensor]:
    """A committed checkpoint of the run (default: its last), loaded into one process's model: what
    `dist-train export` writes."""
    from safetensors.torch import load_file

    from dist_train.export import export

    return load_file(str(export(run, step, out=run.parent / f"{run.name}-{step}.safetensors")))


def _losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=LOSS_RTOL), f"step {step}: {got[step]} vs {want[step]}"


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=WEIGHT_ATOL, msg=name)


# --- gpt: FSDP(4) -> HSDP(2 x 2) -> one process, against one uninterrupted process --------------------

def _rank_on_stand_in_gpus(rank: int, world: int, argv: list[str], cwd: str, log: str) -> None:
    """A `forked_run` rank whose NVML is the stand-in of tests/stand_in (the fork server's sys.path
    does not have it): GPU r draws 50 + 10 r watts."""
    import sys

    sys.path.insert(0, str(STAND_IN))
    sys.modules.pop("pynvml", None)
    from cli_helpers import _cli_rank

    _cli_rank(rank, world, argv, cwd, log)


@pytest.fixture(scope="module")
def gpt_chain(tmp_path_factory) -> dict[str, Path]:
    """One process for 6 steps (checkpoints at 4 and 6); and the same 6 steps as FSDP on 4 ranks for
    steps 1-2, HSDP 2 x 2 on stand-in GPUs for 3-4, one process for 5-6, each resuming the last's
    end-of-run checkpoint."""
    root = tmp_path_factory.mktemp("gpt")
    runs = {k: root / k / "e" for k in ("single", "fsdp4", "hsdp", "one")}
    _single(root / "single", "e", *GPT, "checkpoint.every=4")
    _forked(root / "fsdp4", "e", *GPT, "parallel.backend=fsdp", steps=2)
    step2 = runs["fsdp4"] / "checkpoints" / "step-2"
    log = root / "hsdp-rank"
    argv = ["run", "quickstart.yaml", f"run.dir={root / 'hsdp'}", "run.name=e", "train.steps=4", *GPT, *HSDP,
            "telemetry.energy=nvml", f"checkpoint.resume={step2}"]
    (root / "hsdp").mkdir()
    try:
        forked_ranks(_rank_on_stand_in_gpus, nprocs=4, args=(argv, str(root / "hsdp"), str(log)))
    except Exception as e:
        pytest.fail(f"HSDP run failed: {e}\n" + "\n".join(
            Path(f"{log}{r}").read_text()[-3000:] for r in range(4) if Path(f"{log}{r}").exists()), pytrace=False)
    (root / "hsdp-output").write_text(Path(f"{log}0").read_text())
    _single(root / "one", "e", *GPT, f"checkpoint.resume={runs['hsdp'] / 'checkpoints' / 'step-4'}")
    return {**runs, "hsdp_output": root / "hsdp-output", "step2": step2}


@pytest.mark.slow
def test_gpt_hsdp_2x2_equals_one_process(gpt_chain: dict[str, Path]) -> None:
    """The HSDP phase's losses and its step-4 weights (saved as HSDP shards, loaded into one process)."""
    want = _losses(_metrics(gpt_chain["single"]))
    got = _losses(_metrics(gpt_chain["hsdp"]))
    assert sorted(got) == [3, 4]
    assert_same_losses(got, {s: want[s] for s in got})
    assert json.loads((gpt_chain["hsdp"] / "checkpoints" / "step-4" / "COMMITTED").read_text())["world_size"] == 4
    assert_same_weights(_weights(gpt_chain["hsdp"], 4), _weights(gpt_chain["single"], 4))


@pytest.mark.slow
def test_elastic_resume_fsdp_then_hsdp_then_one_process(gpt_chain: dict[str, Path]) -> None:
    assert json.loads((gpt_chain["step2"] / "COMMITTED").read_text())["world_size"] == 4
    phases = [_losses(_metrics(gpt_chain[k])) for k in ("fsdp4", "hsdp", "one")]
    assert [sorted(p) for p in phases] == [[1, 2], [3, 4], [5, 6]]
    want = _losses(_metrics(gpt_chain["single"]))
    assert_same_losses({s: v for p in phases for s, v in p.items()}, want)
    assert want[1] != pytest.approx(want[STEPS], rel=1e-3)  # it trains
    assert_same_weights(_weights(gpt_chain["one"]), _weights(gpt_chain["single"]))


@pytest.mark.slow
def test_hsdp_energy_records_are_well_formed(gpt_chain: dict[str, Path]) -> None:
    """Four stand-in GPUs of 50, 60, 70 and 80 W: one figure per rank, the world total their sum."""
    run = gpt_chain["hsdp"]
    rows = [r for r in _metrics(run) if "energy_source" in r]
    assert [r["step"] for r in rows] == [3, 4]
    for r in rows:
        assert r["energy_source"] == "nvml"
        assert r["power_rank_w"] == [pytest.approx(w, rel=0.1) for w in (50.0, 60.0, 70.0, 80.0)]
        assert r["energy_j"] == pytest.approx(sum(r["energy_rank_j"]), rel=1e-12)
    summary = json.loads((run / "energy.json").read_text())
    assert summary["energy_total_j"] == pytest.approx(sum(r["energy_j"] for r in rows), rel=1e-12)
    assert "energy:" in gpt_chain["hsdp_output"].read_text()


# --- llama: built on meta, each rank initialising its own rows of the 2-D placements -----------------

def _hsdp_full_weights(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard

    from dist_train.parallel.meta_init import materialize

    dist.init_process_group("gloo")
    try:
        with torch.device("meta"):
            model = _tiny_llama()
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp_replicate", "dp_shard"))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        materialize(model, torch.device("cpu"), seed=3)
        p = model.embed.tok.weight
        assert tuple(p.placements) == (Replicate(), Shard(0)), p.placements
        return {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()


def _tiny_llama():
    from dist_train.models.llama import Llama

    # 131 rows: a multiple neither of the row blocks nor of the 2 shards, so blocks straddle shard edges
    return Llama(vocab_size=131, n_layer=2, width=64, n_head=4, n_kv_heads=2, hidden=160, block_size=16)


@pytest.mark.slow
def test_llama_meta_init_under_hsdp_equals_one_process_init() -> None:
    from dist_train.parallel.meta_init import materialize

    with torch.device("meta"):
        ref = _tiny_llama()
    materialize(ref, torch.device("cpu"), seed=3)
    got = forked_ranks(_hsdp_full_weights, nprocs=4)
    assert got.keys() == dict(ref.named_parameters()).keys()
    for name, p in ref.named_parameters():
        assert torch.equal(got[name], p.detach()), name


@pytest.mark.slow
def test_llama_hsdp_2x2_equals_one_process(tmp_path_factory) -> None:
    ref_dir, run_dir = tmp_path_factory.mktemp("llama-single"), tmp_path_factory.mktemp("llama-hsdp")
    want = _single(ref_dir, "single", *LLAMA, steps=4)
    got = _forked(run_dir, "hsdp", *LLAMA, *HSDP, steps=4)
    assert_same_losses(_losses(got), _losses(want))
    assert_same_weights(_weights(run_dir / "hsdp"), _weights(ref_dir / "single"))


# --- local-learning stages with HSDP replicas ---------------------------------------------------------

@pytest.mark.slow
def test_local_stages_with_hsdp_replicas_equal_the_sequential_reference(tmp_path: Path) -> None:
    """2 stages x (2 replicas x 1 shard): 4 ranks leave 2 per stage, and 2 x 1 is the one split of 2
    ranks that is HSDP (1 x 2 is plain FSDP). Each stage's FSDP2 units replicate over its 2 ranks
    through the 2-D mesh, whose all-reduce must give the sequential reference's per-stage losses."""
    overrides = [*GPT, "model.n_layer=4", "train.steps=4", "parallel.stages=2", "local.method=dgl",
                 *HSDP, f"run.dir={tmp_path}", "run.name=pipe"]
    forked_run(["quickstart.yaml", *overrides], tmp_path, nproc=4)
    assert_stages_match_reference(tmp_path / "pipe", load_config(None, overrides))


# --- dist-train plan, Slurm's default, bad input: one process each, no training -----------------------

def _plan_rows(proc: subprocess.CompletedProcess) -> dict[str, str]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {line.split()[0]: line.split(None, 1)[1] for line in proc.stdout.splitlines() if line.strip()}


def test_plan_shows_both_degrees_and_bytes_per_rank_over_dp_shard(tmp_path: Path) -> None:
    args = ["plan", "quickstart.yaml", "--nproc", "8", "parallel.stages=1", "parallel.backend=fsdp", "model.width=512",
            "data.max_bytes=200000", f"run.dir={tmp_path}"]  # wide enough that the MiB figures show the ratio
    fsdp, hsdp = (_plan_rows(forked_cli([*args, f"parallel.dp_replicate={r}"], tmp_path)) for r in (1, 4))
    assert fsdp["mesh"] == "dp=8" and "hsdp" not in fsdp
    assert hsdp["mesh"] == "dp=8 (dp_replicate=4 x dp_shard=2)"
    assert "sharded over the 2 rank(s) of a shard group" in hsdp["hsdp"] and "replicated over 4 groups" in hsdp["hsdp"]

    def mib(rows: dict, what: str) -> float:
        return float(rows["memory/rank"].split(f"{what} ")[1].split(" MiB")[0])

    for what in ("weights", "grads", "optimizer"):  # sharded over dp_shard = 2 instead of dp = 8
        assert mib(hsdp, what) == pytest.approx(4 * mib(fsdp, what), rel=0.02), what


def _slurm_argv(tmp_path: Path, *args: str) -> list[str]:
    """`dist-train slurm --dry-run` for 2 nodes x 2 tasks, then the rendered script run by bash with
    stand-ins for srun, scontrol and getent: the arguments the tasks' `dist-train run` would get."""
    proc = forked_cli(["slurm", "configs/gpt_ddp.yaml", "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "2",
                       "--dry-run", f"run.dir={tmp_path / 'runs'}", *args], Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    script = next((tmp_path / "runs").rglob("train_multinode.sbatch"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stubs = {"srun": 'printf "%s\\n" "$@"', "scontrol": "echo n1", "getent": "echo 10.0.0.1 STREAM n1"}
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_NNODES": "2", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_NTASKS": "4"}
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_slurm_sets_dp_replicate_to_the_node_count_for_a_sharding_backend(tmp_path: Path) -> None:
    assert "parallel.dp_replicate=2" in _slurm_argv(tmp_path / "fsdp", "parallel.backend=fsdp")
    explicit = _slurm_argv(tmp_path / "explicit", "parallel.backend=fsdp", "parallel.dp_replicate=1")
    assert [a for a in explicit if a.startswith("parallel.dp_replicate")] == ["parallel.dp_replicate=1"]  # it wins
    assert not any(a.startswith("parallel.dp_replicate") for a in _slurm_argv(tmp_path / "ddp"))  # ddp shards nothing


BAD = {  # case -> (command and arguments, text of the one error line)
    "not_dividing": (["launch", "quickstart.yaml", "--nproc", "4", "parallel.backend=fsdp", "parallel.dp_replicate=3"],
                     ["parallel.dp_replicate: 3 does not divide the 4 data-parallel ranks"]),
    "ddp": (["plan", "quickstart.yaml", "--nproc", "4", "parallel.backend=ddp", "parallel.dp_replicate=2"],
            ["parallel.dp_replicate: 2 (HSDP)", "ddp does not"]),
    "none": (["plan", "quickstart.yaml", "parallel.backend=none", "parallel.dp_replicate=2"],
             ["parallel.dp_replicate: 2 (HSDP)", "none does not"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_hsdp_layout_is_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    """`launch` checks the layout before it starts a worker, so a wrong degree costs no rank."""
    args, needles = BAD[case]
    proc = forked_cli([*args, "parallel.stages=1", f"run.dir={tmp_path / 'runs'}"], tmp_path)
    assert_user_error(proc, *needles)
    assert not (tmp_path / "runs").exists()
