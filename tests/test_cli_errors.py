"""The bad-input contract, through the real CLI in a subprocess (at least one case per command; the
others in a process forked from the fork server, `cli_helpers.forked_cli`: the same exit status,
stdout and stderr, without an interpreter start and torch's import each).

Bad input (unknown key, wrong type, impossible layout, missing file, corrupt checkpoint) must exit
with status 2 and print exactly ONE line on stderr, `dist-train: error: <what is wrong>`, with no
traceback, and must leave an existing run directory exactly as it was.
"""

from __future__ import annotations

import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dist_train.runtime.env import routable_address

from cli_helpers import assert_user_error, clean_env, cli, forked_cli, forked_run, free_port, snapshot  # tests/ is on sys.path



# ------------------------------------------------------------------------------ bad config / layout

# case -> (overrides, needs two ranks, text the error line must contain)
CASES = {
    "unknown_key": (["optim.foo=1"], False, ["optim.foo: unknown key"]),
    "wrong_type": (["optim.lr=fast"], False, ["optim.lr: expected a number, got 'fast'"]),
    # (max_bytes back at its default: the tiny config caps the byte corpus, which token_bin never reads)
    "missing_data": (["data.name=token_bin", "data.max_bytes=4000000", "data.path=/nonexistent.bin"], False,
                     ["data.path", "/nonexistent.bin", "not found"]),
    "batch_not_divisible": (["train.batch_size=7"], True, ["train.batch_size", "7", "data-parallel size"]),
    "stages": (["parallel.stages=3"], False, ["parallel.stages", "3"]),
    "backend_none_two_ranks": (["parallel.backend=none"], True, ["parallel.backend", "none", "2"]),
    "missing_config": ([], False, ["config file not found", "nope.yaml"]),
}
COMMANDS = ("run", "plan", "launch")


def _command(command: str, config: str, overrides: list[str], two_ranks: bool) -> tuple[list[str], dict]:
    """argv and environment for `command`; two_ranks puts `run` inside a (fake) 2-rank torchrun world."""
    if command == "run":
        env = clean_env()
        if two_ranks:
            # Layout is checked before any collective, so rank 0 of a 2-rank world must fail at once
            # (never waiting for a rank 1 that will not come).
            env.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        return ["run", config, *overrides], env
    if command == "plan":
        return ["plan", config, *overrides, *(["--nproc", "2"] if two_ranks else [])], clean_env()
    return ["launch", config, "--nproc", "2", *overrides], clean_env()


# Other one-line errors: id -> (argv, text the error line must contain)
EXTRA = {
    "launch-loopback_multinode": (["launch", "{config}", "--nnodes", "2", "--master-addr", "127.0.0.1"],
                                  ["--master-addr 127.0.0.1", "loopback"]),
    "launch-unresolvable_master": (["launch", "{config}", "--nnodes", "2", "--node-rank", "1", "--master-addr",
                                    "no-such-host.invalid"], ["--master-addr no-such-host.invalid", "does not resolve"]),
    # this machine's routable address, on a port nobody listens on: node 0 is not there
    "launch-unreachable_master": (["launch", "{config}", "--nnodes", "2", "--node-rank", "1", "--master-addr",
                                   "{addr}", "--master-port", "{port}", "runtime.start_timeout_s=3"],
                                  ["--master-addr {addr}:{port}", "cannot be reached within 3s"]),
    # node 0 hosts the store: a --master-port something already listens on is named, not a traceback
    "launch-master_port_in_use": (["launch", "{config}", "--nproc", "2", "--master-port", "{busy}"],
                                  ["rendezvous port {busy} (--master-port) is already in use"]),
    "plan-malformed_override": (["plan", "{config}", "train.steps"],
                                ["override 'train.steps': expected key.path=value"]),
    "bench-unknown": (["bench", "nosuch"], ["unknown benchmark 'nosuch'"]),
}

JOBS = [f"{command}-{case}" for command in COMMANDS for case in sorted(CASES)] + sorted(EXTRA)
# These jobs run as real `dist-train` processes: the process-level contract (nothing else on stderr from
# the interpreter's start to its exit) for each command. Both `run` cases in a (fake) 2-rank world
# are here: a forked process is always a world of one. The others run in a process forked from the
# fork server (`forked_cli`), where the claim is the message, the exit status and the untouched run
# directory: the same code from `main(argv)` on.
REAL = {"run-backend_none_two_ranks", "run-batch_not_divisible", "plan-malformed_override",
        "launch-master_port_in_use", "bench-unknown"}
assert REAL <= set(JOBS) and {job.split("-")[0] for job in REAL} == {*COMMANDS, "bench"}


@pytest.fixture(scope="module")
def bad_input_results(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run every bad-input invocation once: the REAL ones a few at a time (each is mostly interpreter
    start-up) while the others run forked, one after the other.

    Returns job id -> (CompletedProcess, run dir that must not exist afterwards, needles).
    """
    specs = {}
    busy = socket.socket()  # held (listening) until every job has run
    busy.bind(("", 0))
    busy.listen()
    for job in JOBS:
        work = tmp_path_factory.mktemp(job)
        run_dir = work / "runs"
        if job in EXTRA:
            template, needles = EXTRA[job]
            fill = dict(config=tiny_config, addr=routable_address(), port=free_port(),
                        busy=busy.getsockname()[1])
            argv = [a.format(**fill) for a in template]
            needles = [n.format(**fill) for n in needles]
            if argv[0] != "bench":
                argv.append(f"run.dir={run_dir}")
            env = clean_env()
        else:
            command, case = job.split("-", 1)
            overrides, two_ranks, needles = CASES[case]
            config = str(work / "nope.yaml") if case == "missing_config" else str(tiny_config)
            argv, env = _command(command, config, [*overrides, f"run.dir={run_dir}"], two_ranks)
        specs[job] = (argv, env, work, run_dir, needles)
    with busy, ThreadPoolExecutor(max_workers=3) as pool:
        futures = {job: pool.submit(cli, argv, work, env, 150) for job, (argv, env, work, _, _) in specs.items()
                   if job in REAL}
        procs = {job: forked_cli(argv, work, env, 150) for job, (argv, env, work, _, _) in specs.items()
                 if job not in REAL}
        procs.update({job: f.result() for job, f in futures.items()})
    return {job: (procs[job], specs[job][3], specs[job][4]) for job in JOBS}


@pytest.mark.slow  # its fixture runs ~25 CLI commands (5 as processes of their own)
@pytest.mark.parametrize("job", JOBS)
def test_bad_input_exits_2_with_one_line(job: str, bad_input_results: dict) -> None:
    proc, run_dir, needles = bad_input_results[job]
    assert_user_error(proc, *needles)
    assert not run_dir.exists(), "bad input must not create the run directory"
    assert "done:" not in proc.stdout


def test_resolve_resume(tmp_path: Path) -> None:
    """checkpoint.resume: auto / never / a path (in process: the CLI wiring is covered above)."""
    from dist_train.errors import UserError
    from dist_train.train.checkpoint import MARKER, resolve_resume

    root = tmp_path / "checkpoints"
    assert resolve_resume("auto", root) is None  # nothing yet: fresh start
    for step, committed in ((2, True), (4, True), (6, False)):  # step-6: an interrupted save
        (root / f"step-{step}").mkdir(parents=True)
        if committed:
            (root / f"step-{step}" / MARKER).write_text("{}")
    assert resolve_resume("auto", root) == root / "step-4"
    assert resolve_resume("never", root) is None
    assert resolve_resume(str(root / "step-2"), root) == root / "step-2"
    with pytest.raises(UserError, match="checkpoint.resume: no checkpoint folder at /nonexistent"):
        resolve_resume("/nonexistent", root)
    with pytest.raises(UserError, match="checkpoint.resume: .*step-6 is not a committed checkpoint"):
        resolve_resume(str(root / "step-6"), root)


# --------------------------------------------------------------------------------- corrupt checkpoint


def _train_args(command: str, config: Path, run_dir: Path, steps: int) -> list[str]:
    common = [f"run.dir={run_dir}", f"train.steps={steps}"]
    if command == "run":
        return ["run", str(config), "parallel.backend=none", *common]
    return ["launch", str(config), "--nproc", "2", "parallel.backend=ddp", *common]


@pytest.fixture(scope="module")
def trained(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One finished 4-step run per command (checkpoint at the end), trained once and copied per test.
    The ranks are forked from the fork server (what `launch --nproc 2` starts, without the agent):
    these runs only make the checkpoints the tests corrupt; `forked_run` fails on a non-zero exit."""
    out = {}
    for command in ("run", "launch"):
        base = tmp_path_factory.mktemp(f"trained-{command}")
        backend, nproc = ("none", 1) if command == "run" else ("ddp", 2)  # as _train_args has them
        forked_run([str(tiny_config), f"parallel.backend={backend}", f"run.dir={base / 'runs'}", "train.steps=4"],
                   base, nproc=nproc, timeout=180)
        out[command] = base / "runs"
    return out


def _garble(path: Path) -> None:
    size = max(64, path.stat().st_size)
    path.write_bytes(bytes((i * 131 + 7) % 256 for i in range(size)))  # garbage, not a pickle, not a zip


_KNOWN: dict = {}  # (command, what) -> pytest mark, for known library bugs (none open)


def _corrupt_params():
    for command, what in [("run", "shards"), ("run", "trainer"), ("launch", "shards"), ("launch", "trainer"),
                          ("launch", "trainer_rank1")]:
        marks = [_KNOWN[(command, what)]] if (command, what) in _KNOWN else []
        if (command, what) != ("run", "shards"):  # the fast tier corrupts one; make test all five
            marks.append(pytest.mark.slow)
        yield pytest.param(command, what, marks=marks, id=f"{command}-{what}")


@pytest.mark.parametrize("command, what", _corrupt_params())
def test_corrupt_checkpoint(command: str, what: str, trained: dict[str, Path], tiny_config: Path,
                            tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(trained[command], runs)
    run_dir = runs / "tiny"
    step_dir = run_dir / "checkpoints" / "step-4"
    assert (step_dir / "COMMITTED").is_file()
    patterns = {"shards": "*.distcp", "trainer": "trainer_rank*.pt", "trainer_rank1": "trainer_rank1.pt"}[what]
    victims = sorted(step_dir.glob(patterns))
    assert victims, f"no {patterns} in {sorted(p.name for p in step_dir.iterdir())}"
    for f in victims:
        _garble(f)
    metrics_before = (run_dir / "metrics.jsonl").read_bytes()
    before = snapshot(run_dir)
    assert "config.yaml" in before and "provenance.json" in before

    # A real process for run-shards (the fast tier's case) and every launch (the launcher's one line
    # for its workers' error); run-trainer forked: the same `main(argv)`, its message and exit status.
    call = forked_cli if (command, what) == ("run", "trainer") else cli
    proc = call(_train_args(command, tiny_config, runs, 8), tmp_path, timeout=180)

    line = assert_user_error(proc, "step-4")
    assert "corrupt" in line or "unreadable" in line, line
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics_before
    assert snapshot(run_dir) == before, "a failed resume must leave the run directory untouched"


def test_resume_from_nonexistent_path_leaves_run_untouched(trained: dict[str, Path], tiny_config: Path,
                                                           tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(trained["run"], runs)
    before = snapshot(runs)
    # forked: the message, the exit status and the untouched folder (run-shards above is a real process)
    proc = forked_cli([*_train_args("run", tiny_config, runs, 8), "checkpoint.resume=/nonexistent"], tmp_path)
    assert_user_error(proc, "checkpoint.resume", "/nonexistent")
    assert snapshot(runs) == before


@pytest.mark.slow
def test_running_a_finished_run_again_says_so_in_one_line(tmp_path) -> None:
    # `make demo` twice: the second launch resumes a run already at train.steps and trains nothing.
    args = ["run", "quickstart.yaml", f"run.dir={tmp_path}", "run.name=done", "parallel.backend=none",
            "parallel.stages=1", "model.n_layer=1", "model.width=16", "model.n_head=2", "model.block_size=8",
            "data.max_bytes=50000", "train.steps=2", "train.batch_size=4", "train.eval_batches=1",
            "train.sample_tokens=0", "telemetry.tensorboard=false", "checkpoint.at_end=true"]
    # Both forked from the fork server (`forked_run` fails on a non-zero exit): the claim is what the
    # second run prints and returns, not the interpreter's start.
    forked_run(args[1:], tmp_path, nproc=1)
    again = forked_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Traceback" not in again.stderr
    assert "had already reached train.steps=2; nothing was trained" in again.stdout
