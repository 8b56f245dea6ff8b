"""`optim.name: diff2` in the trainer: 2 real gloo ranks (the DIFF2 workers) against the paper's rounds
written out here independently (torch.func per-example gradients on each worker's shard, clipping,
the mean over workers, one Gaussian per round from (seed, round), the v recursion, x - lr v);
a resume that continues the same rounds; and the bad inputs.

Tolerance: fp32, the two sides sum per-example terms in different orders: rtol 1e-4 on the loss at
every round.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cli_helpers import CLI, clean_env, forked_cli, forked_run
from dist_train.config import load_config
from dist_train.data import build_dataset
from dist_train.data.sampler import derive_seed
from dist_train.models import build_model
from dist_train.privacy.diff2 import calibrated_sigmas, diff2_epsilon

ROOT = Path(__file__).resolve().parents[1]
STEPS, PERIOD, LR, C1, C2 = 6, 3, 0.5, 1.0, 0.3
SMALL = [f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
         "model.width=16", f"optim.lr={LR}", f"privacy.max_grad_norm={C1}", f"privacy.diff2.c2={C2}",
         f"privacy.diff2.period={PERIOD}", "runtime.threads=1", 'telemetry.progress="off"',
         "telemetry.tensorboard=false", "telemetry.energy=none"]


def _launch(tmp_path: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "launch", str(ROOT / "configs" / "diff2.yaml"), "--nproc", str(nproc),
                           f"run.dir={tmp_path}", "run.name=d2", *SMALL, *overrides],
                          capture_output=True, text=True, timeout=300, env=clean_env())


def _forked(tmp_path: Path, *overrides: str, nproc: int = 2) -> None:
    """The ranks `_launch` starts (gloo, one thread each), forked from the fork server without the
    agent: for the runs judged by what the ranks log (`forked_run` fails the test on a non-zero exit)."""
    forked_run([str(ROOT / "configs" / "diff2.yaml"), f"run.dir={tmp_path}", "run.name=d2", *SMALL, *overrides],
               tmp_path, nproc=nproc)


def _rows(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "d2" / "metrics.jsonl").read_text().splitlines()]


def _reference_losses(sigma1: float, sigma2: float, workers: int = 2) -> list[float]:
    """Loss at x_r (the mean of the workers' shard means) for r = 0 .. STEPS-1, by the paper's rounds."""
    cfg = load_config(str(ROOT / "configs" / "diff2.yaml"), SMALL)
    torch.manual_seed(cfg.train.seed)  # the trainer's order: seed, data, model
    data = build_dataset(cfg.data, cfg.model.block_size)
    model = build_model(cfg.model, data.info)
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    shards = [data.get_batch("train", idx) for idx in torch.tensor_split(torch.arange(data.num_samples("train")), workers)]

    def per_example(p, x, y):
        def loss(q, xi, yi):
            return model.loss(torch.func.functional_call(model, q, (xi.unsqueeze(0),)), yi.unsqueeze(0))
        g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(p, x, y)
        return torch.cat([g[n].reshape(x.size(0), -1) for n in names], 1)

    def clipped_mean(u, c):
        return (u * (c / (u.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)).mean(0)

    def flat(p):
        return torch.cat([p[n].reshape(-1) for n in names])

    def unflat(v):
        out, o = {}, 0
        for n in names:
            out[n] = v[o:o + params[n].numel()].view_as(params[n])
            o += params[n].numel()
        return out

    losses, prev, v = [], None, None
    for r in range(STEPS):
        with torch.no_grad():
            losses.append(sum(float(model.loss(torch.func.functional_call(model, params, (x,)), y))
                              for x, y in shards) / workers)
        noise = torch.randn(flat(params).shape, generator=torch.Generator().manual_seed(
            derive_seed(cfg.train.seed, r, 0x44494632)))
        if r % PERIOD == 0:
            v = sum(clipped_mean(per_example(params, x, y), C1) for x, y in shards) / workers + C1 * sigma1 * noise
        else:
            radius = C2 * float((flat(params) - flat(prev)).norm())
            d = sum(clipped_mean(per_example(params, x, y) - per_example(prev, x, y), radius) for x, y in shards)
            v = v + d / workers + radius * sigma2 * noise
        prev = {n: t.clone() for n, t in params.items()}
        params = {n: params[n] - LR * vn for n, vn in unflat(v).items()}
    return losses


@pytest.mark.slow
def test_two_ranks_follow_the_papers_rounds_and_resume_continues_them(tmp_path: Path) -> None:
    _forked(tmp_path, "checkpoint.every=3")  # exit 0, or forked_run fails the test
    rows = _rows(tmp_path)
    n, workers, delta = 1617 // 2, 2, 0.1 / 1617
    s1, s2 = calibrated_sigmas(5.0, delta, n, workers, STEPS, PERIOD)
    assert rows[0]["diff2_sigma1"] == pytest.approx(s1, rel=1e-12) and rows[0]["diff2_sigma2"] == pytest.approx(s2, rel=1e-12)
    assert [r["diff2_restart"] for r in rows] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    expected = _reference_losses(s1, s2)
    assert [r["loss"] for r in rows] == pytest.approx(expected, rel=1e-4)
    # epsilon spent after each round, and exactly the target after the last
    for k, r in enumerate(rows, start=1):
        assert r["epsilon"] == pytest.approx(diff2_epsilon(s1, s2, n, workers, k, PERIOD, delta), rel=1e-9)
    assert 5.0 - 1e-3 < rows[-1]["epsilon"] <= 5.0

    # Resume from step 3 (the last checkpoint dropped): rounds 4..6 are the same rounds.
    shutil.rmtree(tmp_path / "d2" / "checkpoints" / f"step-{STEPS}")
    _forked(tmp_path, "checkpoint.every=3")
    resumed = _rows(tmp_path)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in rows], rel=1e-5)

    # A resume that would change R (and so the noise) is refused: through `launch`, whose exit status
    # and stderr carry the workers' one line.
    shutil.rmtree(tmp_path / "d2" / "checkpoints" / f"step-{STEPS}")
    proc = _launch(tmp_path, "checkpoint.every=3", f"train.steps={STEPS + 4}")
    assert proc.returncode == 2 and "would change the privacy guarantee" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=64"], "train.batch_size: diff2 trains on the whole training set every round; set it to 1617"),
    (["parallel.stages=2", "local.method=dgl"], "parallel.stages: diff2 trains end to end"),
    (["privacy.diff2.sigma1=0.1"], "privacy.diff2: give both sigma1 and sigma2"),
    (["parallel.backend=fsdp"], "parallel.backend fsdp is not supported"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, overrides, message) -> None:
    config = str(ROOT / "configs" / "diff2.yaml")
    if "fsdp" in message:  # a layout error needs the launcher's world; plan checks it without training
        args = ["plan", config, "--nproc", "2", *SMALL, *overrides]
    else:
        args = ["run", config, f"run.dir={tmp_path}", *SMALL, "parallel.backend=none", *overrides]
    # forked from the fork server: the same `main(argv)`, its exit status and stderr, without an
    # interpreter start (the whole process's stderr is test_cli_errors.py's, in real processes)
    proc = forked_cli(args, tmp_path, env=clean_env())
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_hsdp_is_refused_by_name() -> None:
    """DIFF2's workers keep whole models (ddp or none): HSDP is refused by its own option's name (the
    CLI's one line and exit 2 for such a check are the fsdp case's above)."""
    from dist_train.config import load_config
    from dist_train.errors import UserError
    from dist_train.privacy.diff2_transform import Diff2Transform

    cfg = load_config(str(ROOT / "configs" / "diff2.yaml"), [*SMALL, "parallel.backend=fsdp", "parallel.dp_replicate=2"])
    with pytest.raises(UserError, match="parallel.dp_replicate: diff2 .* HSDP"):
        Diff2Transform.check(cfg, 4)


def test_the_loops_forward_records_no_graph_for_diff2(tmp_path: Path, monkeypatch) -> None:
    """DIFF2 differentiates through torch.func on its own: the loss the loop hands it is only logged,
    so the forward runs without autograd (no graph kept for nothing), while DP-SGD's still has one."""
    from dist_train.optim.transform import GradientTransform
    from dist_train.privacy.diff2_transform import Diff2Transform
    from dist_train.runtime import discover, init_distributed
    from dist_train.train.loop import train

    seen: list[bool] = []
    original = Diff2Transform.backward

    def spy(self, backend, loss, examples, is_last, batch=None):
        seen.append(loss.requires_grad)
        return original(self, backend, loss, examples, is_last, batch)

    monkeypatch.setattr(Diff2Transform, "backward", spy)
    cfg = load_config(ROOT / "configs" / "diff2.yaml",
                      [*SMALL, "train.steps=2", "parallel.backend=none", "checkpoint.every=0",
                       "checkpoint.at_end=false", f"run.dir={tmp_path}", "run.name=nograd"])
    ctx = init_distributed(cfg, discover({}))
    try:
        last = train(cfg, ctx, ["pytest"])
    finally:
        ctx.destroy()
    assert seen == [False, False] and torch.isfinite(torch.tensor(last["loss"]))
    assert Diff2Transform.builds_graph is False and GradientTransform.builds_graph is True
