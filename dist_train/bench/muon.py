"""`dist-train bench muon`: (a) the distributed optimizer step, owner-computes vs naive, and NS work
per rank for W = 1, 2, 4; (b) convergence of AdamW, Muon and NorMuon on the byte-level GPT.

Targets: owner-computes ≥ 1.6× faster than the naive scheme at W = 2; NorMuon reaches
AdamW's final validation loss in ≤ 0.8× AdamW's steps; NorMuon's final loss ≤ Muon's. Shown beside
them: each rank's share of the NS FLOPs (1/W when the owners are balanced).
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
    from dist_train.bench.muon_convergence import convergence

    size_name, size = pick_size(SIZES, quick)
    command, started = command_line(), utc_now()
    t0 = time.perf_counter()
    step_rows, fig = step_time(size)
    t_step = time.perf_counter() - t0
    conv_rows, conv_targets, conv_setup = convergence(quick)
    targets = [make_target("owner_vs_naive_step_speedup_w2", fig["speedup_w2"], ">=", 1.6,
                           description="naive / owner-computes optimizer-step time (gradient communication "
                                       "included; median of per-repetition ratios), 2 gloo ranks, 1 thread each"),
               *conv_targets]
    reported = [{"metric": f"ns_flops_share_max_rank_w{w}", "value": share,
                 "description": f"largest rank's share of the NS FLOPs at W={w} (balanced: {1 / w:g})"}
                for w, share in fig["flops_share"].items()]
    setup = {"size": size_name, "step": {**size, "threads_per_rank": 1, "process_group": "gloo",
                                         "dtype": "float32", "optimizer": "muon",
                                         "owner_vs_naive_max_weight_diff": fig["max_weight_diff"],
                                         "times_s": fig["times"], "speedup_per_repeat": fig["speedup_per_repeat"],
                                         "seconds": t_step},
             "convergence": conv_setup, "seconds": time.perf_counter() - t0}
    return document("muon", command, started, setup, step_rows + conv_rows, targets, reported)
