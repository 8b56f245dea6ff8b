"""Metrics sinks: one JSON object per line in <run>/metrics.jsonl, plus TensorBoard scalars.

Only rank 0 writes (it passes enabled=True); every other rank holds a writer whose calls are
no-ops, so the training loop never branches on rank to log.

metrics.jsonl is the record of truth (easy to diff, grep, load with pandas); TensorBoard is a
view of it. Both are opened lazily on the first `log`, so that `truncate_from` (called on resume)
can rewrite the old file first and tell TensorBoard which steps to hide.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from pathlib import Path
from typing import IO, Any, Mapping, Optional

from ._fs import atomic_write_text

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"

# Known metric keys -> TensorBoard tag. Grouping puts related curves on one dashboard section.
TAGS: dict[str, str] = {
    "loss": "train/loss",
    "train_loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "ppl": "train/ppl",
    "epoch": "train/epoch",
    "tokens": "train/tokens",
    "samples": "train/samples",
    "val_loss": "eval/loss",
    "val_ppl": "eval/ppl",
    "val_acc": "eval/accuracy",
    "val_accuracy": "eval/accuracy",
    "accuracy": "eval/accuracy",
    "step_time_s": "perf/step_time_s",
    "data_wait_s": "perf/data_wait_s",
    "data_wait_frac": "perf/data_wait_frac",
    "tokens_per_s": "perf/tokens_per_s",
    "samples_per_s": "perf/samples_per_s",
    "mfu": "perf/mfu",
    "tflops_per_device": "perf/tflops_per_device",
    "peak_mem_bytes": "perf/peak_mem_bytes",
    "peak_memory_bytes": "perf/peak_mem_bytes",
    "energy_j": "energy/energy_j",
    "power_w": "energy/power_w",
    "energy_total_j": "energy/energy_total_j",
    "joules_per_token": "energy/joules_per_token",
    "tokens_per_j": "energy/tokens_per_j",
    "joules_per_step": "energy/joules_per_step",
    "joules_per_sample": "energy/joules_per_sample",
    "samples_per_j": "energy/samples_per_j",
}
# Fallback grouping by prefix for keys not in TAGS (e.g. "val_top5", "energy_gpu0_j").
_PREFIX_GROUPS: tuple[tuple[str, str], ...] = (
    ("val_", "eval/"),
    ("eval_", "eval/"),
    ("energy_", "energy/"),
    ("power_", "energy/"),
    ("gpu_", "gpu/"),
    ("expert", "moe/expert"),  # the PDE experts' solver figures, under their own names
    ("lm_", "moe/lm_"),
    ("constraint_", "moe/constraint_"),
)


def tag_for(key: str) -> str:
    """TensorBoard tag of a metric key; keys that already contain "/" are taken as tags."""
    if key in TAGS:
        return TAGS[key]
    if "/" in key:
        return key
    for prefix, group in _PREFIX_GROUPS:
        if key.startswith(prefix):
            return group + key[len(prefix):]
    return "misc/" + key


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a metric value.

    0-d tensors and numpy scalars become Python numbers; NaN/inf become null because strict JSON
    has no spelling for them (TensorBoard still receives the real value).
    """
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # a multi-element tensor/array: keep its text form
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _scalar(value: Any) -> Optional[float]:
    """The float TensorBoard should get, or None when the value is not a number."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return None
    # bool is an int subclass, but a flag is not a curve.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


class MetricsWriter:
    """Appends metrics to <run_dir>/metrics.jsonl and <run_dir>/tb. No-op unless enabled."""

    def __init__(self, run_dir: Path | str, enabled: bool, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.path = self.run_dir / METRICS_FILE
        self._file: Optional[IO[str]] = None
        self._tb: Any = None  # torch.utils.tensorboard.SummaryWriter, imported lazily (slow import)
        self._tb_failed = False
        self._purge_step: Optional[int] = None

    # -------------------------------------------------------------------------------- resume
    def truncate_from(self, step: int) -> int:
        """Drop records with step >= `step` from an existing metrics.jsonl; returns lines dropped.

        Called once at start by a resumed run whose first new step is `step`: steps logged after
        the checkpoint by the interrupted run are replayed and must not appear twice. TensorBoard
        events are not rewritten; their writer is told to hide steps >= `step` (purge_step).
        A torn last line (crash mid-write) is dropped too.
        """
        if not self.enabled:
            return 0
        self._close_sinks()  # the rewrite below replaces the file the open handle points to
        self._purge_step = step
        if not self.path.exists():
            return 0
        kept: list[str] = []
        dropped = 0
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    keep = isinstance(record, dict) and int(record["step"]) < step
                except (ValueError, KeyError, TypeError):
                    keep = False
                if keep:
                    kept.append(line if line.endswith("\n") else line + "\n")
                else:
                    dropped += 1
        if dropped:
            atomic_write_text(self.path, "".join(kept))
        return dropped

    # --------------------------------------------------------------------------------- write
    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one record: {"step": step, **metrics} to JSONL, numeric values to TensorBoard."""
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": int(step)}
        record.update((k, _plain(v)) for k, v in metrics.items() if k != "step")
        if self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Line-buffered append: every record reaches the OS as soon as it is written, so a
            # crash loses at most the line being written (and truncate_from drops a torn one).
            self._file = self.path.open("a", buffering=1, encoding="utf-8")
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

        self.scalars(step, metrics)

    def scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Numeric values to TensorBoard only (figures wanted every step, e.g. privacy spent)."""
        tb = self._summary_writer() if self.enabled else None
        if tb is not None:
            for key, value in metrics.items():
                number = _scalar(value)
                if key != "step" and number is not None:
                    tb.add_scalar(tag_for(key), number, global_step=int(step))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._close_sinks()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ internal
    def _summary_writer(self) -> Any:
        if not self.tensorboard or self._tb_failed:
            return None
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                # Losing the TB view is not worth failing a run; metrics.jsonl has everything.
                warnings.warn(f"TensorBoard disabled: {e}", stacklevel=3)
                self._tb_failed = True
                return None
            self._tb = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=self._purge_step, flush_secs=30)
            # Purge once: a writer re-opened later with the same purge_step would hide the steps
            # this run has logged since.
            self._purge_step = None
        return self._tb

    def _close_sinks(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

