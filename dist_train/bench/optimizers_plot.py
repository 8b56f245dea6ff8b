"""The figure of `dist-train bench optimizers`: step speed-up over tuned AdamW against model size (its
non-embedding parameters, log scale), one line per (optimizer, horizon); a lower bound is drawn as
an open marker, a speed-up never reached is left out. matplotlib is optional (`pip install
dist-train[plot]`); without it the bench prints one line and writes no plot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from dist_train.bench.optimizer_space import TARGET_ARMS

_STYLE = {"short": "-", "long": "--"}


def plot_speedups(result: dict[str, Any], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a cluster node
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot written: matplotlib is not installed (pip install 'dist-train[plot]')", file=sys.stderr)
        return None
    setup = result["provenance"]["extra"]  # what the bench recorded of its setup
    models = setup["models"]
    rows = [r for r in result["results"] if r.get("part") == "b: final" and r.get("arm") in TARGET_ARMS]
    fig, ax = plt.subplots(figsize=(6, 4))
    for colour, arm in zip(("tab:blue", "tab:green"), TARGET_ARMS):  # a colour per optimizer, a dash per horizon
        for horizon in setup["horizons"]:
            mine = sorted((models[r["size"]]["non_embedding_params"], r) for r in rows
                          if r["arm"] == arm and r["horizon"] == horizon and r.get("speedup_steps") is not None)
            if not mine:
                continue
            xs, ys = [x for x, _ in mine], [r["speedup_steps"] for _, r in mine]
            ax.plot(xs, ys, _STYLE.get(horizon, ":"), color=colour, marker="o", label=f"{arm}, {horizon} horizon")
            for x, r in mine:
                if r.get("speedup_bound") == "at_least":
                    ax.plot([x], [r["speedup_steps"]], marker="o", mfc="white", color=colour)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("speed-up in steps over tuned AdamW")
    ax.set_title(f"dist-train bench optimizers ({setup['size']})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path
