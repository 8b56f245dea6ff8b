"""Checkpoints in `checkpoints/step-N/`, committed by a marker written last.

A folder without its marker is an interrupted save: resume ignores it and the next save removes it,
so a crash mid-save never costs the previous checkpoint. Model and optimizer state go through the
backend (torch.distributed.checkpoint, or DeepSpeed's own format); the trainer's small state (step,
RNG, data position) is one file per rank, loaded with `weights_only=True`. Every pickle in a folder is
scanned before loading (`pickle_scan`): DCP's metadata and DeepSpeed's files are full pickles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from dist_train.errors import UserError
from dist_train.parallel.base import Backend
from dist_train.train import pickle_scan
from dist_train.train.checkpoint_writer import SyncWriter
from dist_train.runtime.dist import DistContext

MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def committed_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every committed checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(resume: str, root: Path) -> Optional[Path]:
    """`checkpoint.resume` -> the folder to load, or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        found = committed_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"checkpoint.resume: no checkpoint folder at {path}")
    if not (path / MARKER).is_file():
        raise UserError(f"checkpoint.resume: {path} is not a committed checkpoint (no {MARKER} marker)")
    return path


# Backends whose checkpoints load into one another (torch.distributed.checkpoint reshards between
# them); DeepSpeed and FairScale OSS write their own formats.
_FORMAT = {"deepspeed": "deepspeed", "fairscale": "fairscale"}


def checkpoint_layout(backend: str, stages: int, cut_points=()) -> dict:
    """What a checkpoint's shards depend on besides the world size (which DCP reshards)."""
    return {"stages": stages, "cut_points": list(cut_points), "format": _FORMAT.get(backend, "dcp")}


def _describe_layout(layout: dict) -> str:
    cuts = f" cut at blocks {layout['cut_points']}" if layout.get("cut_points") else ""
    return f"parallel.stages={layout['stages']}{cuts}, {layout['format']} format"


class Checkpointer:
    def __init__(self, root: Path, ctx: DistContext, keep: int, layout: Optional[dict] = None, writer=None):
        """`layout` (`checkpoint_layout`): written into each marker and required of a checkpoint
        to resume, so that a checkpoint of another layout is refused by name, not called corrupt.
        `writer` (`checkpoint_writer`): how the shards are written; default: in place."""
        self.root = root
        self.ctx = ctx
        self.keep = keep
        self.layout = layout
        self.writer = writer if writer is not None else SyncWriter(ctx)

    def save(self, step: int, backend: Backend, trainer_state: dict) -> Path:
        """Start the checkpoint of `step`: the folder, this rank's trainer state, then the writer,
        which commits it once every rank's shards are written (before returning, unless async)."""
        path = self.root / f"step-{step}"
        with self.ctx.phase("save"):
            self.writer.wait()  # a save still in flight is committed first: one folder at a time
            if self.ctx.is_main:
                if path.exists():  # a leftover of an interrupted save of this same step
                    shutil.rmtree(path)
                path.mkdir(parents=True)
            self.ctx.barrier()
            torch.save(trainer_state, path / f"trainer_rank{self.ctx.rank}.pt")
            self.writer.write(step, path, backend, self.commit)
        return path

    def commit(self, step: int, path: Path) -> None:
        """Called by the writer once every rank's part of `path` is on disk (on every rank; rank 0
        acts): the marker, written last and atomically, then the prune."""
        if not self.ctx.is_main:
            return
        marker = {"step": step, "world_size": self.ctx.world_size, "time": time.time(),
                  **({"layout": self.layout} if self.layout else {})}
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps(marker))
        os.replace(tmp, path / MARKER)
        self._prune()

    def wait(self) -> None:
        """Until no save is in flight, the last one committed (the end of a run, or a stop)."""
        with self.ctx.phase("save"):
            self.writer.wait()

    def close(self) -> None:
        self.writer.close()

    def _check_layout(self, path: Path) -> None:
        """Refuse a checkpoint written under another layout (stages, cuts, backend family) with a
        line naming both; the world size may differ (DCP reshards, the data order is global)."""
        try:
            saved = json.loads((path / MARKER).read_text()).get("layout")
        except (OSError, ValueError):
            raise UserError(f"checkpoint {path} is unreadable or corrupt: its {MARKER} marker is not JSON")
        if saved is None or self.layout is None or saved == self.layout:
            return  # (a checkpoint from before layouts were recorded is taken as it is)
        raise UserError(f"checkpoint {path} was written under another layout ({_describe_layout(saved)}) than this "
                        f"run's ({_describe_layout(self.layout)}); resume it with its own layout, or start fresh "
                        f"with checkpoint.resume=never or another run.name")

    def _prune(self) -> None:
        found = committed_checkpoints(self.root)
        for _, old in found[: max(0, len(found) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        # Uncommitted folders older than the newest committed one are dead saves.
        newest = found[-1][0] if found else -1
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and int(m.group(1)) < newest and not (p / MARKER).exists():
                shutil.rmtree(p, ignore_errors=True)

    def load(self, path: Path, backend: Backend) -> dict:
        """Load model/optimizer into `backend`; return this rank's trainer state.

        Every rank must agree the load worked before anyone goes on: a rank that failed alone would
        otherwise leave the others to overwrite the run directory and then hang at a barrier.
        """
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        error = None
        with self.ctx.phase("save"):
            try:
                self._check_layout(path)
                if (unsafe := pickle_scan.unsafe_member(path)) is not None:  # before any unpickling
                    raise UserError(f"checkpoint {path} refused: {unsafe}, which is not plain data "
                                    f"(a crafted or foreign file)")
                backend.load(str(path))
                state_file = path / f"trainer_rank{self.ctx.rank}.pt"
                if not state_file.is_file():
                    # More ranks than when saved: the data position is global, only RNG is per rank.
                    state_file = path / "trainer_rank0.pt"
                state = torch.load(state_file, weights_only=True)
                if not isinstance(state, dict) or "step" not in state:
                    raise UserError(f"checkpoint {path} is unreadable or corrupt: {state_file.name} has no step")
            except UserError as e:
                error = str(e)
            except (Exception, CheckpointException) as e:  # DCP, pickle and zip errors mean the same here
                error = f"checkpoint {path} is unreadable or corrupt: {_describe(e)}"
            failed = self.ctx.all_reduce_max(1.0 if error else 0.0)
        if error:
            raise UserError(error)
        if failed:
            raise UserError(f"checkpoint {path} is unreadable or corrupt: another rank could not load its part")
        return state


def _describe(e: BaseException) -> str:
    """One short clause for a load failure; torch's own text can be a page of advice."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    if not first or "Weights only load failed" in first or len(first) > 200:
        cause = e.__cause__ or e.__context__
        return type(e).__name__ + (f" ({type(cause).__name__})" if cause else "")
    return first


def resume(ckpt: Checkpointer, resume_setting: str, holder, sampler,
           on_state: Optional[Callable[[dict], None]] = None) -> tuple[int, Optional[Path]]:
    """Load the checkpoint `checkpoint.resume` names (if any) into `holder` (a backend, or anything
    with save/load), restore the data position and RNG, hand the rank's saved trainer state to
    `on_state` (for extra state such as a replay buffer); return (first step to run, folder)."""
    from dist_train.train import state as trainer_state

    folder = resolve_resume(resume_setting, ckpt.root)
    if folder is None:
        return 0, None
    saved = ckpt.load(folder, holder)
    sampler.load_state_dict(saved["sampler"])
    trainer_state.restore_rng(saved)
    if on_state is not None:
        on_state(saved)
    return int(saved["step"]), folder
