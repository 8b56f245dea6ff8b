"""Named benchmarks behind `dist-train bench NAME`; each measures its baseline in the same run."""

from __future__ import annotations

import importlib

from dist_train.errors import UserError

# name -> module exposing `run(quick: bool) -> dict` (the JSON document of bench/report.py), and
# optionally `write_artifacts(result, json_path)` for files beside the JSON (a plot)
BENCHMARKS = {"overhead": "dist_train.bench.overhead", "local-vs-bp": "dist_train.bench.local_vs_bp",
              "local-methods": "dist_train.bench.local_methods", "muon": "dist_train.bench.muon",
              "dp": "dist_train.bench.dp", "energy": "dist_train.bench.energy",
              "diff2": "dist_train.bench.diff2", "soak": "dist_train.bench.soak",
              "moe": "dist_train.bench.moe", "models": "dist_train.bench.models",
              "scale": "dist_train.bench.scale", "optimizers": "dist_train.bench.optimizers"}


def run_benchmark(name: str, quick: bool, json_path: str | None) -> int:
    if name == "list":
        print("\n".join(sorted(BENCHMARKS)))
        return 0
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark '{name}'; available: {', '.join(sorted(BENCHMARKS))}")
    from dist_train.bench.report import finish

    module = importlib.import_module(BENCHMARKS[name])
    result = module.run(quick=quick)
    status = finish(result, json_path)
    if json_path and hasattr(module, "write_artifacts"):
        from pathlib import Path

        module.write_artifacts(result, Path(json_path))
    return status
