"""Progress bar for rank 0, a silent no-op everywhere else.

"auto" shows the bar only when stderr is a terminal: in batch jobs (SLURM, CI, `> log`) tqdm's
carriage-return redraws turn log files into megabytes of noise, and metrics.jsonl already has
the numbers.
"""

from __future__ import annotations

import sys
from typing import Any, Literal, Mapping, Optional, Union

ProgressMode = Union[bool, Literal["auto", "on", "off"]]


def _resolve(enabled: ProgressMode) -> bool:
    if enabled == "auto":
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty and isatty())
    if enabled in ("on", "off"):
        return enabled == "on"
    return bool(enabled)


def _fmt(value: Any) -> str:
    # Four significant digits keep the bar one line wide while loss still moves visibly.
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """tqdm bar over optimizer steps; `update` takes the absolute step, not an increment."""

    def __init__(self, total: int, initial: int = 0, enabled: ProgressMode = "auto", echo: bool = False) -> None:
        self.enabled = _resolve(enabled)
        self.echo = echo  # print `note` lines even without a bar (rank 0 in a batch job)
        self._bar: Optional[Any] = None
        if self.enabled:
            from tqdm import tqdm

            # initial: a resumed run starts the bar where the checkpoint left off, so the ETA is
            # computed from the steps this process actually runs.
            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             file=sys.stderr, leave=True)

    def update(self, step: int, postfix: Optional[Mapping[str, Any]] = None) -> None:
        """Move the bar to `step` (steps done so far) and show `postfix` (None values hidden)."""
        if self._bar is None:
            return
        if postfix:
            shown = {k: _fmt(v) for k, v in postfix.items() if v is not None}
            self._bar.set_postfix(shown, refresh=False)
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        else:
            self._bar.refresh()

    def evaluation(self, total: int, row: Mapping[str, Any]) -> None:
        """The line both training loops print at an evaluation; a figure the row lacks (a window whose
        every step was dropped as non-finite has no loss) shows as '-'."""
        def fig(key: str, spec: str) -> str:
            value = row.get(key)
            return "-" if value is None else format(value, spec)

        self.note(f"step {row['step']}/{total}  loss {fig('loss', '.4f')}  val_loss {fig('val_loss', '.4f')}  "
                  f"{fig('samples_per_s', '.0f')} samples/s")

    def note(self, line: str) -> None:
        """A line of its own above the bar (or plain, when there is no bar); only where enabled or forced."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        elif self.echo:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
