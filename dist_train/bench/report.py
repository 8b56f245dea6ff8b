"""Print a benchmark's result as tables, write its JSON document, and the helpers to build one.

The JSON document every benchmark's `run()` returns (what `dist-train bench NAME --json FILE` writes):

    {"name": str, "machine": str, "command": str, "date": ISO-8601 UTC, "provenance": {...},
     "results": [{...one row per measurement...}, ...],
     "targets": [{"metric": str, "value": float, "op": ">=" | "<=", "target": float, "met": bool,
                  "description": str (optional)}, ...],
     "reported": [{"metric": str, "value": float, "description": str}, ...] (optional: figures with no target)}

A missed target is a finding, not a failure: `finish` prints MISSED and still returns 0, so a
benchmark on a slow or noisy machine reports honestly instead of crashing a script.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from dist_train.telemetry import atomic_write_text
from dist_train.telemetry.provenance import cpu_model, total_ram_bytes, usable_cpus

OPS = (">=", "<=")


def _compare(value: float, op: str, target: float) -> bool:
    return value >= target if op == ">=" else value <= target


def make_target(metric: str, value: Optional[float], op: str, target: float,
                description: Optional[str] = None) -> dict[str, Any]:
    """One `targets` entry; `met` is computed here, so no benchmark can claim a target by hand.

    `metric` is the target's stable name (tests and BENCHMARKS.md use it); `description` says in words what is
    divided by what. A missing or non-finite value never meets its target.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    finite = value is not None and math.isfinite(float(value))
    entry = {"metric": metric, "value": float(value) if finite else None, "op": op, "target": float(target),
             "met": bool(finite and _compare(float(value), op, float(target)))}
    if description is not None:
        entry["description"] = description
    return entry


def machine_summary() -> str:
    """One line naming the hardware a figure was measured on: CPU, cores, RAM, GPUs."""
    parts = [cpu_model() or platform.machine() or "unknown CPU"]
    total, usable = os.cpu_count(), usable_cpus()
    parts.append(f"{total} cores" if usable in (None, total) else f"{usable} of {total} cores usable")
    ram = total_ram_bytes()
    if ram:
        parts.append(f"{ram / 2**30:.1f} GiB RAM")
    gpus: list[str] = []
    try:
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # a broken driver must not stop a CPU benchmark from reporting
        pass
    if gpus:
        names = sorted(set(gpus))
        parts.append(", ".join(f"{gpus.count(n)}x {n}" for n in names))
    else:
        parts.append("no GPU")
    return ", ".join(parts) + f"; {platform.system()} {platform.release()}"


def command_line(argv: Optional[list[str]] = None) -> str:
    """The command as the user typed it (program name without its venv path)."""
    argv = list(sys.argv if argv is None else argv)
    prog = Path(argv[0]).name if argv else "dist-train"
    if prog in ("__main__.py", "-m"):
        prog = "python -m dist_train"
    return " ".join([prog, *(shlex.quote(a) for a in argv[1:])])


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def document(name: str, command: str, started: str, setup: dict, results: list, targets: list,
             reported: Optional[list] = None) -> dict[str, Any]:
    """A benchmark's result in the shape BENCHMARKS.md and `--json` use, with the run's provenance.
    `reported`: figures shown beside the targets that have no target of their own."""
    from dist_train.telemetry import collect_provenance

    doc = {"name": name, "machine": machine_summary(), "command": command, "date": started,
           "provenance": collect_provenance(command.split(), setup), "results": results, "targets": targets}
    if reported:
        doc["reported"] = [{"metric": r["metric"], "description": r.get("description"),
                            "value": float(r["value"]) if r.get("value") is not None else None} for r in reported]
    return doc


# ------------------------------------------------------------------------------------ printing


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def _columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The table's columns: every scalar field of any row, in first-seen order. Lists and dicts
    (a row's config overrides, per-lr figures) stay in the JSON; they would not fit a cell."""
    rows = list(rows)
    nested = {k for row in rows for k, v in row.items() if isinstance(v, (list, dict))}
    cols: list[str] = []
    for row in rows:
        cols.extend(k for k in row if k not in cols and k not in nested)
    return cols


def _groups(rows: list[Mapping[str, Any]]) -> list[tuple[str, list[Mapping[str, Any]], list[str]]]:
    """(title, rows, columns) of each table: one per `part` when rows name several parts (each
    part has its own columns), else one table of all rows."""
    parts: list[str] = []
    for row in rows:
        if row.get("part") not in parts:
            parts.append(row.get("part"))
    if len(parts) < 2 or None in parts:
        return [("results", rows, _columns(rows))]
    out = []
    for part in parts:
        mine = [r for r in rows if r.get("part") == part]
        out.append((str(part), mine, [c for c in _columns(mine) if c != "part"]))
    return out


def _target_cells(t: Mapping[str, Any]) -> list[str]:
    return [str(t["metric"]), _cell(t["value"]), f"{t['op']} {_cell(t['target'])}", "met" if t["met"] else "MISSED"]


def _described(result: Mapping[str, Any], key: str) -> bool:
    return any(t.get("description") for t in result.get(key) or [])


def _print_rich(result: Mapping[str, Any], groups: list) -> None:
    from rich.console import Console
    from rich.table import Table

    widest = max((len(cols) for _, _, cols in groups), default=4)
    # A fixed width keeps the table whole in logs and pipes, where rich would assume 80 columns.
    console = Console(width=max(100, min(200, 14 * widest + 10)), highlight=False)
    for title, rows, cols in groups:
        table = Table(title=f"{result.get('name')} — {title}")
        for c in cols:
            table.add_column(c, justify="left" if c in ("repeat", "order", "task", "method", "mode") else "right")
        for row in rows:
            table.add_row(*(_cell(row.get(c)) for c in cols))
        console.print(table)
    described = _described(result, "targets")
    targets = Table(title="targets")
    for c in ("metric", "value", "target", "status", *(["description"] if described else [])):
        targets.add_column(c, justify="left" if c in ("metric", "description") else "right")
    for t in result.get("targets", []):
        cells = _target_cells(t)
        cells[-1] = "[green]met[/green]" if t["met"] else "[bold red]MISSED[/bold red]"
        targets.add_row(*cells, *([t.get("description") or ""] if described else []))
    console.print(targets)
    if result.get("reported"):
        reported = Table(title="reported (no target)")
        for c in ("metric", "value", "description"):
            reported.add_column(c, justify="right" if c == "value" else "left")
        for r in result["reported"]:
            reported.add_row(str(r["metric"]), _cell(r["value"]), r.get("description") or "")
        console.print(reported)


def _print_plain(result: Mapping[str, Any], groups: list) -> None:
    def table(header: list[str], body: list[list[str]]) -> None:
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        for r in [header, ["-" * w for w in widths], *body]:
            print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))

    for title, rows, cols in groups:
        print(f"{result.get('name')} — {title}")
        table(cols, [[_cell(row.get(c)) for c in cols] for row in rows])
        print()
    print("targets")
    described = _described(result, "targets")
    table(["metric", "value", "target", "status", *(["description"] if described else [])],
          [[*_target_cells(t), *([t.get("description") or ""] if described else [])] for t in result.get("targets", [])])
    if result.get("reported"):
        print("\nreported (no target)")
        table(["metric", "value", "description"],
              [[str(r["metric"]), _cell(r["value"]), r.get("description") or ""] for r in result["reported"]])


def print_result(result: Mapping[str, Any]) -> None:
    print(f"benchmark: {result.get('name')}\nmachine:   {result.get('machine')}\n"
          f"command:   {result.get('command')}\ndate:      {result.get('date')}\n")
    groups = _groups(list(result.get("results", [])))
    try:
        _print_rich(result, groups)
    except ImportError:
        _print_plain(result, groups)
    for t in result.get("targets", []):
        status = "met" if t["met"] else "MISSED"
        print(f"TARGET {status}: {t['metric']} = {_cell(t['value'])} (target {t['op']} {_cell(t['target'])})")
    for r in result.get("reported") or []:
        print(f"REPORTED: {r['metric']} = {_cell(r['value'])}")


def finish(result: dict, json_path: Optional[str]) -> int:
    """Print `result`, write it to `json_path` when given. Returns the exit status: always 0."""
    print_result(result)
    if json_path:
        atomic_write_text(Path(json_path), json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {json_path}")
    return 0


SIZE_ENV = "DIST_TRAIN_BENCH_SIZE"  # smoke | quick | full: tests ask for a tiny size this way


def pick_size(sizes: dict, quick: bool) -> tuple[str, dict]:
    """The benchmark size: `DIST_TRAIN_BENCH_SIZE` if set, else quick or full."""
    import os

    name = os.environ.get(SIZE_ENV) or ("quick" if quick else "full")
    if name not in sizes:
        raise ValueError(f"{SIZE_ENV}={name!r}: expected one of {sorted(sizes)}")
    return name, sizes[name]
