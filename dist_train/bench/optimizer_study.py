"""The training runs of `dist-train bench optimizers`: a pool of single-thread workers, each run the
framework's own end-to-end training (`dist_train.train.loop.train`, what `dist-train run` calls) in
one process on the CPU, and the order in which the study asks for them.

Per arm, on every model size (see `optimizers.py` for the sizes and horizons):
  1. full coordinate descent over all its hyperparameters at the short horizon, on the validation
     split, seed 0 (the larger model's descent starts from the smaller one's result);
  2. coordinate descent over the learning rates only at the long horizon, starting from 1.'s result;
  3. the final runs, seeds 0 and 1, each evaluated on the held-out test split: AdamW at the two
     horizons, the matrix optimizers at every budget of the ladder (for reading speed-ups), each
     budget with the setting tuned at the nearer horizon in log-steps (the longer on a tie).
Step 2 re-tunes only what the paper found to move with the budget (its phase II re-sweeps the
"scaling-sensitive" hyperparameters only; here: the lrs). A run already made is never made again: the
seed-0 final runs at the two horizons are the descents' own runs.
"""

from __future__ import annotations

import math
import multiprocessing
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Optional

from dist_train.bench import optimizer_space as space
from dist_train.bench._spawn import one_thread_env
from dist_train.bench.tuning import CoordinateDescent, DescentResult, Setting

WORKERS = 2  # one per core of the 2-core reference machine, one thread each

# Every run: CPU, one thread, single process, evaluated only at its end, nothing written that the
# figures do not need.
COMMON = ["runtime.device=cpu", "runtime.threads=1", "parallel.backend=none", "parallel.stages=1",
          "checkpoint.every=0", "checkpoint.at_end=false", "checkpoint.resume=never", "telemetry.tensorboard=false",
          'telemetry.progress="off"', "telemetry.energy=none", "train.sample_tokens=0", "train.grad_accum=1",
          "train.grad_clip=1.0", "optim.schedule=cosine", "optim.min_lr_ratio=0.1", "model.dropout=0.0",
          "data.name=stdlib_bytes", "data.prefetch=false"]


def model_overrides(size: dict[str, Any], model: str) -> list[str]:
    n_layer, width, n_head = size["models"][model]
    return ["model.name=gpt", f"model.n_layer={n_layer}", f"model.width={width}", f"model.n_head={n_head}",
            f"model.block_size={size['block']}", f"data.max_bytes={size['max_bytes']}",
            f"data.val_fraction={size['held_out']}", f"data.test_fraction={size['held_out']}",
            f"train.batch_size={size['batch']}", f"train.eval_batches={size['eval_batches']}"]


def run_overrides(size: dict[str, Any], arm: str, model: str, steps: int, setting: Setting, seed: int) -> list[str]:
    """Everything one run sets (over COMMON and the defaults)."""
    return [*model_overrides(size, model), *space.overrides(arm, setting, steps), f"train.steps={steps}",
            f"train.log_every={steps}", f"train.seed={seed}"]


# ------------------------------------------------------------------------------- in a worker

_DATA: dict[tuple, Any] = {}  # this worker's data sets, built once per data config


def _warm_worker() -> None:
    import torch

    import dist_train.optim  # noqa: F401
    import dist_train.train.loop  # noqa: F401

    torch.set_num_threads(1)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One training run: its final train loss, validation loss (the loop's own last evaluation) and
    held-out test loss (the same number of batches of the test split), its wall and CPU seconds.
    A failure is a result with `error` (its losses count as infinite), not a crashed study."""
    import torch

    from dist_train.config import load_config
    from dist_train.data import build_dataset
    from dist_train.runtime import discover, init_distributed
    from dist_train.train.evaluate import evaluate
    from dist_train.train.hooks import Hooks
    from dist_train.train.loop import train

    torch.set_num_threads(1)
    name = f"{job['arm']}-{job['model']}-{job['steps']}-{job['seed']}-{job['index']}"
    try:
        cfg = load_config(None, [*COMMON, *job["overrides"], f"run.dir={job['run_dir']}", f"run.name={name}"])
        key = (cfg.data.model_dump_json(), cfg.model.block_size)
        if key not in _DATA:
            _DATA[key] = build_dataset(cfg.data, cfg.model.block_size)
        seen: dict[str, Any] = {}
        ctx = init_distributed(cfg, discover({}))
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            last = train(cfg, ctx, ["dist-train", "bench", "optimizers", name], data=_DATA[key],
                         hooks=Hooks(on_setup=lambda backend: seen.setdefault("backend", backend)))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            test = evaluate(seen["backend"], _DATA[key], ctx, cfg.train.batch_size, cfg.train.eval_batches, "test")
        finally:
            ctx.destroy()
    except Exception as e:  # a diverged or refused setting is a finding of the sweep
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    return {"train_loss": float(last["loss"]), "val_loss": float(last["val_loss"]),
            "test_loss": float(test["test_loss"]), "wall_s": wall, "cpu_s": cpu}


def finite(value: Optional[float]) -> float:
    return float(value) if value is not None and math.isfinite(float(value)) else math.inf


# ------------------------------------------------------------------------------- in the parent


class Runner:
    """Submits runs to the worker pool, each distinct run once (later askers share its future), and
    keeps every result for the report."""

    def __init__(self, pool: ProcessPoolExecutor, size: dict[str, Any], run_dir: str):
        self.pool, self.size, self.run_dir = pool, size, run_dir
        self._futures: dict[tuple, Future] = {}
        self._jobs: dict[tuple, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._done = 0

    def submit(self, arm: str, model: str, steps: int, setting: Setting, seed: int) -> Future:
        key = (arm, model, steps, tuple(sorted(setting.items())), seed)
        with self._lock:
            if key not in self._futures:
                job = {"arm": arm, "model": model, "steps": steps, "seed": seed, "setting": dict(setting),
                       "index": len(self._futures), "run_dir": self.run_dir,
                       "overrides": run_overrides(self.size, arm, model, steps, setting, seed)}
                self._jobs[key] = job
                self._futures[key] = future = self.pool.submit(run_one, job)
                future.add_done_callback(lambda f, job=job: self._progress(job, f))
            return self._futures[key]

    def _progress(self, job: dict[str, Any], future: Future) -> None:
        with self._lock:
            self._done += 1
            done, total = self._done, len(self._futures)
        result = future.result()
        figure = result.get("error") or f"val {result['val_loss']:.4f}"
        print(f"  optimizers: {done}/{total} runs ({job['arm']} {job['model']} {job['steps']} steps seed "
              f"{job['seed']} {space.describe(job['setting'])}: {figure})", file=sys.stderr, flush=True)

    def val_losses(self, arm: str, model: str, steps: int):
        """The objective of a descent: seed-0 validation loss at `steps` steps, a batch of settings at once."""
        def evaluate_many(settings: list[Setting]) -> list[float]:
            futures = [self.submit(arm, model, steps, s, 0) for s in settings]
            return [finite(f.result().get("val_loss")) for f in futures]
        return evaluate_many

    def runs(self) -> list[dict[str, Any]]:
        """Every run made, with its result, in submission order."""
        with self._lock:
            items = list(self._jobs.items())
        return [{**{k: job[k] for k in ("arm", "model", "steps", "seed", "setting")},
                 **self._futures[key].result()} for key, job in items]


def _descend(runner: Runner, arm: str, model: str, steps: int, start: Setting,
             only: Optional[tuple[str, ...]]) -> DescentResult:
    return CoordinateDescent(space.axes(arm, only), start, runner.val_losses(arm, model, steps)).run()


def tune_arm(runner: Runner, arm: str) -> dict[tuple[str, str], DescentResult]:
    """Steps 1 and 2 for one arm on every model size: {(model, horizon): its descent}."""
    size = runner.size
    models, (short, long) = list(size["models"]), (size["horizons"]["short"], size["horizons"]["long"])
    out: dict[tuple[str, str], DescentResult] = {}
    start = space.start(arm)
    with ThreadPoolExecutor(max_workers=2) as threads:
        pending = []
        for model in models:  # each model's short descent starts from the previous model's result
            first = _descend(runner, arm, model, short, start, size["tune_axes"])
            out[model, "short"] = first
            pending.append((model, threads.submit(_descend, runner, arm, model, long, first.best, size["retune"])))
            start = first.best
        for model, future in pending:
            out[model, "long"] = future.result()
    return out


def setting_for(tuned: dict[tuple[str, str], DescentResult], size: dict[str, Any], model: str,
                budget: int) -> Setting:
    """The setting a run of `budget` steps uses: the one tuned at the nearer horizon in log-steps,
    the longer on a tie."""
    horizons = size["horizons"]
    nearest = min(horizons, key=lambda h: (abs(math.log(budget / horizons[h])), -horizons[h]))
    return tuned[model, nearest].best


def budgets(size: dict[str, Any], arm: str) -> list[int]:
    """The run lengths of an arm's final runs: AdamW at the two horizons; a matrix optimizer at every
    budget of the ladder (multiples of the short horizon)."""
    horizons = sorted(size["horizons"].values())
    if arm not in space.MATRIX_ARMS:
        return horizons
    return sorted({max(1, round(f * size["horizons"]["short"])) for f in size["ladder"]} | set(horizons))


def submit_finals(runner: Runner, arm: str, tuned: dict[tuple[str, str], DescentResult]) -> None:
    for model in runner.size["models"]:
        for steps in budgets(runner.size, arm):
            for seed in runner.size["seeds"]:
                runner.submit(arm, model, steps, setting_for(tuned, runner.size, model, steps), seed)


def run_study(size: dict[str, Any], run_dir: str) -> tuple[dict[str, dict], Runner]:
    """Tune every arm, then make its final runs; returns ({arm: {(model, horizon): descent}}, the
    runner holding every run). Arms are tuned side by side so both workers always have runs queued."""
    with one_thread_env(), ProcessPoolExecutor(max_workers=WORKERS, mp_context=multiprocessing.get_context("spawn"),
                                               initializer=_warm_worker) as pool:
        runner = Runner(pool, size, run_dir)

        def arm_study(arm: str) -> dict[tuple[str, str], DescentResult]:
            tuned = tune_arm(runner, arm)
            submit_finals(runner, arm, tuned)
            return tuned

        with ThreadPoolExecutor(max_workers=len(space.ARMS)) as threads:
            futures = {arm: threads.submit(arm_study, arm) for arm in space.ARMS}
            tuned = {arm: f.result() for arm, f in futures.items()}
    return tuned, runner  # leaving the pool waited for the final runs
