"""What a caller may observe of a training run (a benchmark's timestamps, a test's spy) without
patching the loops: callbacks the run session fires at fixed points of every loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


def _nothing(*_: Any) -> None:
    pass


@dataclass
class Hooks:
    # The backend has wrapped the model and built its optimizer (a benchmark registers its probes).
    on_setup: Callable[[Any], None] = _nothing
    # Step `done` (1-based: steps done so far) has taken its update, before any log, evaluation or save.
    on_step: Callable[[int], None] = _nothing
    # The window ending at step `done` is logged; `record` is this rank's logged figures for it.
    on_window: Callable[[int, dict], None] = _nothing
    # The checkpoint of step `done` is saved (or, under checkpoint.async, staged and being written);
    # the float is the training time the save call took (`checkpoint_stall_s`).
    on_save: Callable[[int, float], None] = _nothing
