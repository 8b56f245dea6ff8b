"""`dist-train bench muon`, part (a): the optimizer step, owner-computes vs the naive scheme.

Both sides are the same optimizer class on the same hidden-matrix shapes of a GPT (qkv, attention
projection, MLP up and down per layer, plus an embedding and biases for AdamW), the same batched
Newton–Schulz, dtype and thread count; they differ only in who orthogonalises:
- owner-computes: reduce-scatter the local gradients to each matrix's owner, NS on the owner,
  all-gather the new weights (the same bytes as one all-reduce);
- naive: all-reduce the gradients, every rank runs NS on every matrix (what most distributed Muon
  code does).
The timed region is the whole optimizer step including its gradient communication
(`clip_grad_norm` + `step`), ended by the slowest rank (max over ranks per repetition); the two sides
alternate in one process, so machine noise falls on both, and the figure is the median over
repetitions of the per-repetition ratio naive / owner. NS FLOPs per rank are read from the
optimizer's own counters for W = 1, 2, 4.
"""

from __future__ import annotations

import statistics
import time

# What the fork server the ranks are forked from imports once (torch's import, seconds on a loaded
# machine, is then paid once rather than by each of the 9 ranks part (a) starts).
PRELOAD = ("torch", "torch.distributed", "dist_train.optim", "dist_train.bench.muon_step")
SHAPES_PER_LAYER = lambda d: [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]  # noqa: E731


def _params(width: int, layers: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02)
            for _ in range(layers) for s in SHAPES_PER_LAYER(width)]
    rest = [torch.nn.Parameter(torch.randn(vocab, width, generator=g) * 0.02),
            torch.nn.Parameter(torch.zeros(width)), torch.nn.Parameter(torch.zeros(4 * width))]
    return mats, rest


def _optimizer(kind: str, mats, rest, owner_compute: bool):
    from dist_train.optim import Muon, NorMuon

    groups = [{"params": mats}, {"params": rest, "algorithm": "adamw", "lr": 3e-3}]
    if kind == "muon":
        return Muon(groups, lr=0.02, owner_compute=owner_compute)
    return NorMuon(groups, lr=3e-3, owner_compute=owner_compute)


def _set_grads(params, rank: int, step: int) -> None:
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def timing_worker(rank: int, world: int, size: dict, kind: str) -> dict:
    """Alternate owner / naive optimizer steps; per repetition the slowest rank's time."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")  # env:// variables come from the spawner
    sides = {}
    for owner in (True, False):
        mats, rest = _params(size["width"], size["layers"], size["vocab"])
        sides["owner" if owner else "naive"] = (mats + rest, _optimizer(kind, mats, rest, owner))
    times = {name: [] for name in sides}
    for rep in range(size["warmup"] + size["repeats"]):
        order = list(sides) if rep % 2 == 0 else list(reversed(sides))
        for name in order:
            params, opt = sides[name]
            _set_grads(params, rank, rep)
            dist.barrier()
            t0 = time.perf_counter()
            opt.clip_grad_norm(1.0)
            opt.step()
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            opt.zero_grad(set_to_none=True)
            if rep >= size["warmup"]:
                times[name].append(float(dt))
    # Both sides ran the same steps from the same start: their weights must agree (a check that the
    # faster side is not faster by skipping work).
    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(sides["owner"][0], sides["naive"][0]))
    return {"times": times, "max_weight_diff": diff}


def flops_worker(rank: int, world: int, size: dict, kind: str) -> dict:
    """One owner-computes step; every rank's NS matrix and FLOP counts."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")  # env:// variables come from the spawner
    mats, rest = _params(size["width"], size["layers"], size["vocab"])
    opt = _optimizer(kind, mats, rest, owner_compute=True)
    _set_grads(mats + rest, rank, 0)
    opt.step()
    counts = torch.tensor([opt.ns_matrices, opt.ns_flops], dtype=torch.float64)
    gathered = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts)
    return {"matrices": [int(c[0]) for c in gathered], "flops": [float(c[1]) for c in gathered]}


def step_time(size: dict, kind: str = "muon") -> tuple[list[dict], dict]:
    """Rows for the table and the figures the targets read."""
    from dist_train.bench._spawn import run_on_ranks

    res = run_on_ranks(timing_worker, nprocs=2, args=(size, kind), threads=1, preload=PRELOAD)
    med = {name: statistics.median(ts) for name, ts in res["times"].items()}
    rows = [{"part": "a: step", "scheme": name, "world": 2, "optimizer": kind,
             "step_ms_median": 1e3 * med[name], "step_ms_min": 1e3 * min(res["times"][name]),
             "step_ms_max": 1e3 * max(res["times"][name]), "repeats": len(res["times"][name])}
            for name in ("owner", "naive")]
    flops = {}
    for world in (1, 2, 4):
        out = run_on_ranks(flops_worker, nprocs=world, args=(size, kind), threads=1, preload=PRELOAD)
        flops[world] = out
        total = sum(out["flops"])
        rows.append({"part": "a: NS work", "scheme": "owner", "world": world, "optimizer": kind,
                     "ns_matrices_per_rank": "/".join(map(str, out["matrices"])),
                     "ns_gflop_max_rank": max(out["flops"]) / 1e9,
                     "ns_flops_max_rank_over_total": max(out["flops"]) / total})
    naive_total = sum(flops[1]["flops"])
    rows.append({"part": "a: NS work", "scheme": "naive", "world": 2, "optimizer": kind,
                 "ns_matrices_per_rank": f"{flops[1]['matrices'][0]}/{flops[1]['matrices'][0]}",
                 "ns_gflop_max_rank": naive_total / 1e9, "ns_flops_max_rank_over_total": 1.0})
    # Per repetition the two sides ran back to back: the ratio of each pair, then their median.
    ratios = [n / o for o, n in zip(res["times"]["owner"], res["times"]["naive"])]
    figures = {"speedup_w2": statistics.median(ratios), "speedup_per_repeat": ratios, "max_weight_diff": res["max_weight_diff"],
               "flops_share": {w: max(flops[w]["flops"]) / sum(flops[w]["flops"]) for w in flops},
               "times": res["times"]}
    return rows, figures
