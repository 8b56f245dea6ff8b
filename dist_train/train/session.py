"""The run session: everything a training loop does around its steps, written once for every loop.

A loop builds its model and runs its steps. The session owns the rest of the run:
  - the run directory: the resolved `config.yaml` and `provenance.json` (rank 0);
  - the metrics writers: the run's `metrics.jsonl` and TensorBoard events (one rank, the collector)
    and, in a pipeline, each stage's own log under `stages/stage<k>/` (the stage's lead rank); the
    progress bar; the energy log and the run's energy total, closed with `energy.json`;
  - the control votes (`RunControl`): the non-finite guard, the stop vote, injected faults;
  - checkpoints: the periodic save, the save at the end, and the save of a run that stops early;
  - resume: model and optimizer (the backend), data position and RNG, the gradient transform's
    state (the privacy ledger), the votes' state, and any named state a loop tracks (channels');
  - `Hooks`: what a benchmark or a test observes of a run, instead of patching the loop.

A loop's life with a session (`loop.py` and `local_loop.py` are exactly this):

    session = RunSession(cfg, ctx, command, lag=2)      # energy log and votes: bad input stops here
    ... build the model, backend, transform, batches (train/batches.py) ...
    session.resume(backend, batches, transform, layout)  # before the run directory is touched
    session.open(tokens_per_sample, collector)           # run directory, writers, progress
    with session.running():
        for step in session.steps():                     # saves when due; stops on a vote or the budget
            ... the step, timed in session.window ...
            session.end_step(step, indices)
            if session.logging(): ... session.log(record); session.report(row)
        session.finish()                                 # the early-stop save, the energy summary
    return session.close(last)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from dist_train.config.load import dump_config
from dist_train.config.schema import Config
from dist_train.runtime.dist import DistContext
from dist_train.telemetry import MetricsWriter, Progress, collect_provenance, write_provenance
from dist_train.telemetry.energy_log import EnergyLog, per_rank_scalars
from dist_train.train import state as trainer_state
from dist_train.train.checkpoint import Checkpointer, resolve_resume, resume
from dist_train.train.checkpoint_writer import build_writer
from dist_train.train.control import RunControl
from dist_train.train.energy import finish_energy, open_energy_log, run_totals
from dist_train.train.hooks import Hooks
from dist_train.train.window import Window


@dataclass(frozen=True)
class Replicas:
    """The ranks holding the same weights as this one (a pipeline stage's data-parallel replicas):
    they form the energy group and must skip the same non-finite steps."""

    ranks: Sequence[int]
    group: Any = None  # their process group (None when there is only one)


def due(done: int, every: int) -> bool:
    """Is a periodic action (log, eval, save) due after step `done`? `every` = 0 means never."""
    return every > 0 and done % every == 0


def write_run_info(cfg: Config, ctx: DistContext, run_dir: Path, command: list[str], resume_from,
                   energy: EnergyLog) -> None:
    """The run directory with the resolved config and the run's provenance (rank 0 only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    write_provenance(run_dir / "provenance.json", collect_provenance(
        command, {"world_size": ctx.world_size, "backend": cfg.parallel.backend, "stages": cfg.parallel.stages,
                  "device": str(ctx.device), "resumed_from": str(resume_from) if resume_from else None,
                  "energy": energy.describe()}))


class RunSession:
    def __init__(self, cfg: Config, ctx: DistContext, command: list[str], lag: int,
                 replicas: Optional[Replicas] = None, hooks: Optional[Hooks] = None):
        """Open the energy log and the votes (a forced energy source this machine cannot read, or a
        malformed fault list, is bad input and stops here). `lag`: how many steps the stop vote may
        trail (see `stopping.py`); `replicas`: this rank's replica group (default: the world)."""
        self.cfg, self.ctx, self.command = cfg, ctx, command
        self.hooks = hooks or Hooks()
        self.dir = Path(cfg.run.dir) / cfg.run.name
        ranks, group = (None, None) if replicas is None else (replicas.ranks, replicas.group)
        self.energy = open_energy_log(cfg, ctx, ranks, group)
        self.control = RunControl(cfg, ctx, self.dir, ctx.rank, lag=lag, replica_group=group,
                                  replicas=None if replicas is None else len(replicas.ranks))
        self.ckpt = Checkpointer(self.dir / "checkpoints", ctx, cfg.checkpoint.keep, writer=build_writer(cfg, ctx))
        self.stall_s: Optional[float] = None  # training time lost to saves since the last logged row
        self.window_stall_s: Optional[float] = None  # ... and the part of it the row being logged carries
        self.window = Window(ctx.device)
        self.backend = self.sampler = self.transform = None  # the trainer's, handed over by `resume`
        self.start = self.done = 0
        self.last_step = False  # the stop vote made the current step the run's last
        self.last: dict = {}  # the run's latest logged row: what the loop returns
        self.saved: dict = {}  # this rank's trainer state from the checkpoint resumed from
        self.resumed_from: Optional[Path] = None
        self._named: list = []

    # --- resume -------------------------------------------------------------------------------
    def resuming(self) -> bool:
        """Will `resume` load a checkpoint? (Decided by `checkpoint.resume` and what is on disk.)"""
        return resolve_resume(self.cfg.checkpoint.resume, self.ckpt.root) is not None

    def resume(self, backend, sampler, transform, layout: dict) -> int:
        """Load the checkpoint `checkpoint.resume` names, if any, into the backend (model, optimizer),
        the sampler (the data position: the loop's `StepBatches`, whose state is the position the
        loop consumed, not a prefetched one), the RNG and the transform; return the first step to run.
        Called before the run directory is touched: a bad checkpoint leaves everything as it was.
        `layout` (`checkpoint_layout`) is required of the checkpoint and written into every save."""
        self.backend, self.sampler, self.transform = backend, sampler, transform
        self.ckpt.layout = layout
        with transform.checkpointing():
            self.start, self.resumed_from = resume(self.ckpt, self.cfg.checkpoint.resume, backend, sampler,
                                                   on_state=self.saved.update)
        if self.saved:
            transform.load_state_dict(self.saved.get("transform"))
        self.done = self.start
        return self.start

    def track(self, named: Iterable) -> None:
        """Save each of `named` (with `name`, `state_dict()`, `load_state_dict()`: a stage's channels)
        in every checkpoint under its name, and restore it now from the checkpoint resumed from."""
        for obj in named:
            self._named.append(obj)
            if obj.state_dict() is not None and obj.name in self.saved:
                obj.load_state_dict(self.saved[obj.name])

    # --- the run directory and the writers ------------------------------------------------------
    def open(self, tokens_per_sample: int, collector: bool, stage=None) -> None:
        """Rank 0 writes the resolved config and provenance; the writers open and drop what was logged
        past the resume point. `collector`: this rank writes the run's metrics and shows progress;
        `stage`: a pipeline rank's `StageLayout` (its stage's lead writes the stage's own log)."""
        cfg = self.cfg
        self.tokens_per_sample = tokens_per_sample
        if self.ctx.is_main:
            write_run_info(cfg, self.ctx, self.dir, self.command, self.resumed_from, self.energy)
        self.ctx.barrier()  # the run dir exists before the collector opens its writer there
        self.writer = MetricsWriter(self.dir, enabled=collector, tensorboard=cfg.telemetry.tensorboard)
        self.stage_writer = self.writer  # end-to-end: the one model's log is the run's
        if stage is not None:
            self.stage_writer = MetricsWriter(self.dir / "stages" / f"stage{stage.stage}", enabled=stage.lead,
                                              tensorboard=cfg.telemetry.tensorboard)
            self.stage_writer.truncate_from(self.start + 1)
        self.writer.truncate_from(self.start + 1)
        self.control.resume(self.start, self.saved)
        self.progress = Progress(total=cfg.train.steps, initial=self.start,
                                 enabled=cfg.telemetry.progress if collector else False,
                                 echo=collector and cfg.telemetry.progress != "off")
        self.totals = run_totals(cfg, self.writer, self.energy, self.progress)

    # --- the steps ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The steady phase: stop signals go to the vote, the attempt is noted, the meter starts."""
        with self.ctx.phase("steady"), self.control.signals():
            self.ctx.barrier()
            self.control.started(self.start, self.resumed_from)
            self.energy.start()
            self.window.reset()
            yield

    def steps(self) -> Iterator[int]:
        """The steps to run, from the resume point. Before each: the transform may end the run (the
        next step would overspend the privacy budget) and the stop vote may make it the last
        (preempted, or a non-finite step under `stop`). After each: the checkpoint, when due."""
        for step in range(self.start, self.cfg.train.steps):
            if stop := self.transform.stop_reason():  # every rank reaches the same verdict (same ledger)
                self.progress.note(stop)
                return
            self.last_step = self.control.last_step()  # agreed by every rank
            yield step
            if self.checkpoint_due():
                # Every rank has finished step `done` when the save's barrier passes (in a pipeline, the
                # activations of step `done` are consumed too): a consistent cut of the run.
                self.save()
            if self.last_step:
                self.progress.note(f"stopping after step {self.done}: {self.control.reason}")
                return

    def end_step(self, step: int, indices) -> int:
        """After the update of `step`: post this rank's stop vote, log the example ids it trained on,
        fire an injected fault, write the transform's per-step figures; returns the steps done."""
        self.done = step + 1
        self.control.end_step(self.done, indices)
        self.stage_writer.scalars(self.done, self.transform.step_scalars())
        self.hooks.on_step(self.done)
        return self.done

    def evaluating(self) -> bool:
        """Is an evaluation due after the step just done (every `train.eval_every`, and at the end)?"""
        return due(self.done, self.cfg.train.eval_every) or self.done == self.cfg.train.steps

    def logging(self) -> bool:
        """Is a log record due after the step just done (every `train.log_every`, and with every evaluation)?"""
        return due(self.done, self.cfg.train.log_every) or self.evaluating()

    # --- the logs -----------------------------------------------------------------------------
    def energy_window(self, steps: int) -> dict:
        """The energy group's figures for a window of `steps` steps (collective over the group)."""
        return self.energy.window(steps * self.cfg.train.batch_size, self.tokens_per_sample, steps)

    def run_metrics(self) -> dict:
        """The transform's figures (privacy spent) and the votes' (steps skipped as non-finite)."""
        return {**self.transform.metrics(), **self.control.metrics()}

    def log(self, record: dict) -> None:
        """This rank's figures for the window just closed: to its log (a pipeline stage's own, else the
        run's) with TensorBoard's per-rank curves, and to the hooks."""
        self.window_stall_s, self.stall_s = self.stall_s, None
        self._add_stall(record)
        self.stage_writer.log(self.done, record)
        self.stage_writer.scalars(self.done, per_rank_scalars(record, self.energy.group_ranks))
        self.hooks.on_window(self.done, record)

    def report(self, row: dict) -> None:
        """The run's row for the window (the collector's): to metrics.jsonl (a pipeline's; end-to-end,
        `log` wrote it), the progress bar and, after an evaluation, its line; kept as the run's result."""
        if self.writer is not self.stage_writer:
            self._add_stall(row)
            self.writer.log(self.done, row)
        self.progress.update(row["step"], {"loss": row["loss"], "compile_s": row.get("compile_s")})
        if "val_loss" in row:
            self.progress.evaluation(self.cfg.train.steps, row)
        self.last = row

    # --- checkpoints and the end ----------------------------------------------------------------
    def checkpoint_due(self) -> bool:
        return due(self.done, self.cfg.checkpoint.every) or (self.cfg.checkpoint.at_end
                                                              and self.done == self.cfg.train.steps)

    def save(self) -> None:
        """Commit a checkpoint of step `done`: the backend's shards and this rank's trainer state."""
        state = trainer_state.capture(self.done, self.sampler.state_dict())
        state.update(self.control.state_dict())
        state.update({obj.name: s for obj in self._named if (s := obj.state_dict()) is not None})
        if (extra := self.transform.state_dict()) is not None:
            state["transform"] = extra  # the privacy accountant: what was spent survives a resume
        t0 = time.perf_counter()
        with self.transform.checkpointing():
            self.ckpt.save(self.done, self.backend, state)
        # The training time the save cost: all of it when written in place; under checkpoint.async
        # the wait for the previous save and the copy to host memory only.
        stall = time.perf_counter() - t0
        self.stall_s = (self.stall_s or 0.0) + stall
        self.hooks.on_save(self.done, stall)
        self.window.restart_clock()  # the save's time is not the window's

    def _add_stall(self, record: dict) -> None:
        """The row after a save carries the training time the saves since the previous row cost (in
        metrics.jsonl and TensorBoard, like every figure of the row)."""
        if self.window_stall_s is not None:
            record["checkpoint_stall_s"] = self.window_stall_s

    def finish(self) -> None:
        """After the last step: a run that stopped early (privacy budget spent, preempted, non-finite
        step) keeps its work in a checkpoint, the votes end, and the collector writes the energy
        summary into the run's result."""
        done, cfg = self.done, self.cfg
        stopped_early = self.start < done < cfg.train.steps and not due(done, cfg.checkpoint.every)
        if stopped_early and (cfg.checkpoint.at_end or self.control.reason):
            self.save()
        self.ckpt.wait()  # a save still being written in the background is committed before the run ends
        self.ckpt.close()
        self.control.finish()
        if self.writer.enabled:
            self.last.update(finish_energy(cfg, self.dir, self.energy, self.totals, done, self.tokens_per_sample))
        self.progress.close()

    def close(self, last: dict) -> dict:
        """Close the writers and the meter; `last` (the run's result) says why the run stopped early."""
        self.writer.close()
        if self.stage_writer is not self.writer:
            self.stage_writer.close()
        self.energy.close()
        if self.control.reason:
            last.update(stopped=self.control.reason, stopped_at=self.done, exit_code=self.control.exit_code)
        return last
