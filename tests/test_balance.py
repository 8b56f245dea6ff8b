"""Measured stage balancing: block costs come from timing, not parameter counts, and a pipeline run
with `parallel.balance: measured` records the cuts it measured and resumes with them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from dist_train.local.balance import measure_block_costs
from dist_train.local.split import balanced_cuts, stage_block_ranges

from cli_helpers import forked_run  # tests/ is on sys.path


class Repeat(nn.Module):
    """A Linear applied `times` times: the same parameters, `times` x the compute."""

    def __init__(self, width: int, times: int):
        super().__init__()
        self.fc, self.times = nn.Linear(width, width), times

    def forward(self, x):
        for _ in range(self.times):
            x = torch.tanh(self.fc(x))
        return x


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(64, 64)
        self.blocks = nn.ModuleList([Repeat(64, 60), Repeat(64, 1), Repeat(64, 1), Repeat(64, 1)])
        self.head = nn.Linear(64, 10)


def test_measured_costs_see_compute_that_parameters_do_not():
    torch.manual_seed(0)
    model = Toy()
    costs = measure_block_costs(model, torch.randn(256, 64), torch.device("cpu"), repeats=3)
    assert len(costs) == 4 and all(c > 0 for c in costs)
    assert costs[0] > 10 * max(costs[1:])  # 60 applications vs 1 (equal parameter counts)
    assert all(p.grad is None for p in model.parameters())  # measuring leaves nothing behind
    # Parameter counts are equal, so they cut in the middle; the measured costs isolate block 0.
    assert [r.start for r in stage_block_ranges(model, 2)[1:]] == [2]
    assert balanced_cuts(costs, 2) == [1]


@pytest.mark.slow
def test_pipeline_run_records_and_keeps_its_measured_cuts(tmp_path):
    overrides = [f"run.dir={tmp_path}", "run.name=m", "parallel.balance=measured", "model.n_layer=4", "model.width=32",
                 "model.n_head=2", "model.block_size=16", "data.max_bytes=200000", "train.batch_size=8",
                 "train.sample_tokens=0", "train.eval_every=0", "train.log_every=1"]
    common = [sys.executable, "-m", "dist_train", "launch", "quickstart.yaml", "--nproc", "2", "--threads", "1",
              *overrides]
    # The first two runs' ranks are forked from the fork server (what `launch --nproc 2 --threads 1`
    # starts, without the agent; a non-zero exit fails the test): measuring, saving and reading the
    # cuts is the ranks' work. The failing third run goes through `launch`, whose exit status is read.
    forked_run(["quickstart.yaml", *overrides, "train.steps=3"], tmp_path, nproc=2, timeout=240)
    saved = json.loads((tmp_path / "m" / "stages" / "balance.json").read_text())
    assert len(saved["block_costs_s"]) == 4 and len(saved["cut_points"]) == 1
    assert saved["cut_points"] == balanced_cuts(saved["block_costs_s"], 2)
    # Resuming must split the model as the checkpoint was split: the saved cuts, not new timings.
    forked_run(["quickstart.yaml", *overrides, "train.steps=5"], tmp_path, nproc=2, timeout=240)
    assert json.loads((tmp_path / "m" / "stages" / "balance.json").read_text()) == saved
    saved["cut_points"] = [3] if saved["cut_points"] != [3] else [1]
    (tmp_path / "m" / "stages" / "balance.json").write_text(json.dumps(saved))
    resumed = subprocess.run([*common, "train.steps=7"], capture_output=True, text=True, timeout=240)
    # Different cuts than the shards were saved with: the load fails cleanly, which shows the run
    # used the saved file (a fresh measurement would have reproduced the checkpoint's cuts or not,
    # by chance).
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert "checkpoint" in resumed.stderr
