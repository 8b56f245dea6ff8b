"""`dist-train bench diff2`: DIFF2 vs DP-GD at equal (epsilon, delta), on P = 4 data-parallel workers.

Acceptance (as in Murata & Suzuki, ICML 2023): at epsilon in {3, 5} and delta = 1e-5, DIFF2's final train loss and gradient norm
are lower than DP-GD's (targets: ratio DIFF2 / DP-GD <= 1 for each).

Task (the paper's kind: a two-layer MLP on regression data): a synthetic nonlinear regression with
8 standardised features, y = sin(a.x) + 0.5 (b.x)^2 / ||b||^2 + 0.3 c.x + noise, standardised,
generated from a fixed seed (no download). P = 4 gloo workers hold 1000 examples each (4000 in all)
and train an 8-32-1 tanh MLP (321 parameters) with the full local data every round (GD subroutine):
`dist_train.privacy.diff2.Diff2`, whose T = 1 is DP-GD exactly.

Same budget, same effort: both methods get their noise from `calibrated_sigmas` (the authors' closed
form scaled down by the RDP accountant to exactly the same epsilon; DP-GD is the T = 1 case), the same
rounds, seeds and model initialisations, and a grid of 16 settings each — DP-GD over its clipping
norm C and learning rate, DIFF2 over C2, the restart period T and the learning rate (C1 = 2). For each
method and epsilon the setting with the lowest mean final loss over the seeds is reported, with the
per-seed figures; the loss and the gradient norm are of the whole training objective at the last
iterate, computed without noise after training. Diverged runs count as infinitely bad.

Selection and evaluation use different seeds. A setting picked as the best of 16 on seeds 0-2 carries
the winner's curse (its mean is the luckiest of 16 noisy means), and at this size the seed — the
initialisation and the noise draws — moves a run's final loss by more than the methods differ (plain GD
from six initialisations ends between 0.085 and 0.143). So each method's chosen setting is then run
again on `eval_seeds` fresh seeds (100, 101, ...; the same for both methods, so the comparison is paired
on initialisation), and the targets compare those held-out means; the selection means are shown beside.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from dist_train.bench.report import command_line, document, make_target, pick_size, utc_now

WORKERS, DELTA, EPSILONS = 4, 1e-5, (3.0, 5.0)
# The grids were placed after two full runs (BENCHMARKS.md). In the first, DP-GD's best settings sat on
# its grid's edge (C = 2, lr = 1) and 7 of DIFF2's 12 settings diverged (lr x C2 >= 1 lets the difference
# radius C2 ||x_r - x_(r-1)|| compound). In the second, DP-GD's best C at epsilon 3 (1) and DIFF2's best lr
# at both epsilons (0.3) were still their grid's lowest, with C2 = 0.3 worse than 1 and lr >= 0.6 mostly
# diverging. So: 16 settings each, DP-GD's C reaching down to 0.5, DIFF2's lr down to 0.1.
GRID_DPGD = [(c, lr) for c in (0.5, 1.0, 2.0, 4.0) for lr in (0.3, 0.6, 1.0, 1.5)]
GRID_DIFF2 = [(c2, t, lr) for c2 in (0.5, 1.0) for t in (10, 40) for lr in (0.1, 0.2, 0.3, 0.45)]
SIZES = {
    "full": {"rounds": 400, "n_per_worker": 1000, "seeds": 3, "eval_seeds": 10, "dpgd": GRID_DPGD,
             "diff2": GRID_DIFF2},
    "quick": {"rounds": 150, "n_per_worker": 500, "seeds": 3, "eval_seeds": 5, "dpgd": GRID_DPGD,
              "diff2": GRID_DIFF2},
    # Tests only: two settings each, a few rounds; proves it runs, measures nothing.
    "smoke": {"rounds": 6, "n_per_worker": 64, "seeds": 1, "eval_seeds": 2, "dpgd": [(1.0, 0.3), (1.0, 1.0)],
              "diff2": [(0.3, 3, 0.3), (0.3, 3, 1.0)]},
}
# What the fork server the workers are forked from imports once (torch's import is then paid once,
# not by each of the 2 x 4 workers).
PRELOAD = ("torch", "torch.distributed", "dist_train.privacy.diff2", "dist_train.bench.diff2")
C1 = 2.0  # DIFF2's restart clipping norm: the C at which DP-GD did best in the first run
FEATURES, HIDDEN = 8, 32
EVAL_SEED0 = 100  # held-out seeds: 100, 101, ... (selection uses 0, 1, 2)


def regression_data(n: int, seed: int = 1234):
    """(x, y): n examples of the synthetic regression, x and y standardised (float64)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g, dtype=torch.float64)
    a, b, c = (torch.randn(FEATURES, generator=g, dtype=torch.float64) for _ in range(3))
    y = torch.sin(x @ a) + 0.5 * (x @ b) ** 2 / b.dot(b) + 0.3 * (x @ c) + 0.1 * torch.randn(n, generator=g,
                                                                                             dtype=torch.float64)
    y = (y - y.mean()) / y.std()
    return x, y.unsqueeze(1)


def _model(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1)).double()


def _loss(out, y):
    return ((out - y) ** 2).mean() / 2


def _objective(model, x, y) -> tuple[float, float]:
    """Loss and gradient norm of the whole objective f = (1/P) sum_p f_p at the current iterate."""
    import torch
    import torch.distributed as dist

    model.zero_grad()
    loss = _loss(model(x), y)
    loss.backward()
    flat = torch.cat([loss.detach().reshape(1), *(p.grad.reshape(-1) for p in model.parameters())])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return float(flat[0]), float(flat[1:].norm())


def _grid(size: dict) -> list[tuple[float, str, dict, list[int]]]:
    """(epsilon, method, setting, seeds) of the selection phase: every grid setting on seeds 0, 1, ..."""
    seeds = list(range(size["seeds"]))
    settings = [("dp-gd", {"c1": c, "c2": 0.0, "period": 1, "lr": lr}) for c, lr in size["dpgd"]]
    settings += [("diff2", {"c1": C1, "c2": c2, "period": t, "lr": lr}) for c2, t, lr in size["diff2"]]
    return [(eps, method, s, seeds) for eps in EPSILONS for method, s in settings]


def _sigmas(size: dict, jobs: list[tuple[float, str, dict, list[int]]]) -> dict:
    """(sigma1, sigma2) per (epsilon, period) of `jobs`, calibrated once here for every worker (the
    accountant's bisection takes seconds per pair, the same on every rank)."""
    from dist_train.privacy.diff2 import calibrated_sigmas

    return {(eps, s["period"]): calibrated_sigmas(eps, DELTA, size["n_per_worker"], WORKERS, size["rounds"], s["period"])
            for eps, _, s, _ in jobs}


def _worker(rank: int, world: int, size: dict, jobs: list[tuple[float, str, dict, list[int]]], sigmas: dict) -> dict:
    """Train every (epsilon, method, setting) of `jobs` on each of its seeds, with the (sigma1, sigma2)
    `sigmas` holds for its (epsilon, period); one row per run."""
    import torch.distributed as dist

    from dist_train.privacy.diff2 import Diff2

    dist.init_process_group("gloo")  # the env:// variables come from the spawn helper
    n, rounds = size["n_per_worker"], size["rounds"]
    x_all, y_all = regression_data(n * world)
    x, y = x_all[rank * n:(rank + 1) * n], y_all[rank * n:(rank + 1) * n]
    runs = []
    for eps, method, s, seeds in jobs:
        s1, s2 = sigmas[(eps, s["period"])]
        for seed in seeds:
            model = _model(seed)
            opt = Diff2(model, _loss, s["lr"], s["period"], s["c1"], s["c2"], s1, s2, seed=1000 + seed,
                        process_group=dist.group.WORLD)
            for r in range(rounds):
                opt.step(x, y, r)
            loss, gnorm = _objective(model, x, y)
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                loss, gnorm = math.inf, math.inf
            runs.append({"epsilon": eps, "method": method, **s, "sigma1": s1, "sigma2": s2, "seed": seed,
                         "loss": loss, "grad_norm": gnorm})
    dist.destroy_process_group()
    return {"runs": runs}


def _pick(runs: list[dict], eps: float, method: str) -> tuple[dict, list[dict]]:
    """The setting with the lowest mean final loss over the seeds, and its runs."""
    by_setting: dict = {}
    for r in runs:
        if r["epsilon"] == eps and r["method"] == method:
            by_setting.setdefault((r["c1"], r["c2"], r["period"], r["lr"]), []).append(r)
    best = min(by_setting.values(), key=lambda rs: statistics.mean(r["loss"] for r in rs))
    return best[0], best


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(quick: bool) -> dict[str, Any]:
    from dist_train.bench._spawn import run_on_ranks

    size_name, size = pick_size(SIZES, quick)
    command, started = command_line(), utc_now()
    grid = _grid(size)
    sigmas = _sigmas(size, grid)  # the held-out runs' settings are among the grid's
    runs = run_on_ranks(_worker, nprocs=WORKERS, args=(size, grid, sigmas), threads=1, preload=PRELOAD)["runs"]
    chosen = {(eps, method): _pick(runs, eps, method) for eps in EPSILONS for method in ("dp-gd", "diff2")}
    held_out = list(range(EVAL_SEED0, EVAL_SEED0 + size["eval_seeds"]))
    keys = ("c1", "c2", "period", "lr")
    jobs = [(eps, method, {k: head[k] for k in keys}, held_out) for (eps, method), (head, _) in chosen.items()]
    evals = run_on_ranks(_worker, nprocs=WORKERS, args=(size, jobs, sigmas), threads=1, preload=PRELOAD)["runs"]
    rows, targets, reported = [], [], []
    for eps in EPSILONS:
        best = {}
        for method in ("dp-gd", "diff2"):
            head, picked = chosen[(eps, method)]
            rs = [r for r in evals if r["epsilon"] == eps and r["method"] == method]
            loss, loss_sd = _mean_sd([r["loss"] for r in rs])
            gn, gn_sd = _mean_sd([r["grad_norm"] for r in rs])
            best[method] = (loss, gn)
            rows.append({"epsilon": eps, "method": method, "C1": head["c1"], "C2": head["c2"] or None,
                         "T": head["period"], "lr": head["lr"], "sigma1": head["sigma1"],
                         "sigma2": head["sigma2"] if method == "diff2" else None,
                         "selection_loss_mean": statistics.mean(r["loss"] for r in picked),
                         "loss_mean": loss, "loss_sd": loss_sd, "grad_norm_mean": gn, "grad_norm_sd": gn_sd,
                         "losses": [r["loss"] for r in rs], "grad_norms": [r["grad_norm"] for r in rs]})
        ratio = [best["diff2"][i] / best["dp-gd"][i] if best["dp-gd"][i] > 0 else None for i in (0, 1)]
        wins = sum(a["loss"] < b["loss"] for a, b in zip(
            sorted((r for r in evals if r["epsilon"] == eps and r["method"] == "diff2"), key=lambda r: r["seed"]),
            sorted((r for r in evals if r["epsilon"] == eps and r["method"] == "dp-gd"), key=lambda r: r["seed"])))
        reported.append({"metric": f"diff2_seed_wins_eps{eps:g}", "value": wins,
                         "description": f"held-out seeds (of {len(held_out)}) on which DIFF2 ends below DP-GD, "
                                        f"epsilon {eps:g} (paired on initialisation)"})
        targets.append(make_target(f"diff2_vs_dpgd_loss_eps{eps:g}", ratio[0], "<=", 1.0,
                                   description=f"DIFF2 / DP-GD final train loss (best setting each on seeds "
                                               f"0-{size['seeds'] - 1}, mean over {len(held_out)} held-out seeds), "
                                               f"epsilon {eps:g}, delta {DELTA:g}"))
        targets.append(make_target(f"diff2_vs_dpgd_grad_norm_eps{eps:g}", ratio[1], "<=", 1.0,
                                   description=f"DIFF2 / DP-GD final gradient norm of the train objective, "
                                               f"epsilon {eps:g}"))
    non_private = _non_private_floor(size)
    reported.append({"metric": "non_private_gd_loss", "value": non_private,
                     "description": "plain GD, best lr of the DP-GD grid, same rounds, seed 0 (one process): "
                                    "the floor the private runs approach"})
    setup = {"size": size_name, "workers": WORKERS, "delta": DELTA, "epsilons": list(EPSILONS),
             "rounds": size["rounds"], "examples_per_worker": size["n_per_worker"], "seeds": size["seeds"],
             "held_out_seeds": held_out, "held_out_runs": evals,
             "model": f"MLP {FEATURES}-{HIDDEN}-1 tanh, float64", "loss": "mean squared error / 2",
             "noise": "calibrated_sigmas (closed form scaled to the same epsilon by Opacus RDP)", "C1": C1,
             "grid_dpgd (C, lr)": size["dpgd"], "grid_diff2 (C2, T, lr)": size["diff2"],
             "all_runs": runs}
    return document("diff2", command, started, setup, rows, targets, reported)


def _non_private_floor(size: dict) -> float:
    """Non-private full-batch GD on all P x n examples (one process): where the private runs head."""
    import torch

    x, y = regression_data(size["n_per_worker"] * WORKERS)
    best = math.inf
    for lr in sorted({lr for _, lr in size["dpgd"]}):
        model = _model(0)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(size["rounds"]):
            opt.zero_grad()
            _loss(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            loss = float(_loss(model(x), y))
        best = min(best, loss) if math.isfinite(loss) else best
    return best
