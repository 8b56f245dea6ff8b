"""`dist-train bench muon`: the distributed optimizer step, owner-computes vs naive, and NS work per
rank for W = 1, 2, 4.

Target: owner-computes ≥ 1.6× faster than the naive scheme at W = 2. Shown beside it: each rank's
share of the NS FLOPs (1/W when the owners are balanced). How AdamW, Muon and NorMuon compare in
training (each tuned alike, at two sizes and two horizons) is `dist-train bench optimizers`, which
also reports this benchmark's former convergence targets at the tuned settings.
"""

from __future__ import annotations

import time
from typing import Any

from dist_train.bench.muon_step import step_time
from dist_train.bench.report import command_line, document, make_target, pick_size, utc_now

SIZES = {
    "smoke": {"width": 32, "layers": 1, "vocab": 64, "warmup": 1, "repeats": 3},
    "quick": {"width": 128, "layers": 4, "vocab": 256, "warmup": 2, "repeats": 7},
    "full": {"width": 256, "layers": 4, "vocab": 256, "warmup": 3, "repeats": 15},
}


def run(quick: bool) -> dict[str, Any]:
    size_name, size = pick_size(SIZES, quick)
    command, started = command_line(), utc_now()
    t0 = time.perf_counter()
    step_rows, fig = step_time(size)
    t_step = time.perf_counter() - t0
    targets = [make_target("owner_vs_naive_step_speedup_w2", fig["speedup_w2"], ">=", 1.6,
                           description="naive / owner-computes optimizer-step time (gradient communication "
                                       "included; median of per-repetition ratios), 2 gloo ranks, 1 thread each")]
    reported = [{"metric": f"ns_flops_share_max_rank_w{w}", "value": share,
                 "description": f"largest rank's share of the NS FLOPs at W={w} (balanced: {1 / w:g})"}
                for w, share in fig["flops_share"].items()]
    setup = {"size": size_name, "step": {**size, "threads_per_rank": 1, "process_group": "gloo",
                                         "dtype": "float32", "optimizer": "muon",
                                         "owner_vs_naive_max_weight_diff": fig["max_weight_diff"],
                                         "times_s": fig["times"], "speedup_per_repeat": fig["speedup_per_repeat"],
                                         "seconds": t_step},
             "seconds": time.perf_counter() - t0}
    return document("muon", command, started, setup, step_rows, targets, reported)
