"""DP-SGD end to end: book-keeping against a batch-size-1 autograd loop on a whole model, noise added
once per coordinate across real gloo ranks (also HSDP 2 x 2), 2 ranks (and HSDP 2 x 2) == 1 process at
sigma = 0 through the CLI,
exact resume (noise and accountant), the budget stop, and bad input.

Tolerances: per-example norms and clipped sums are fp32 sums over every layer of a model (~1e-7
relative rounding per term): rtol 1e-4. CLI runs compare the logged gradient norm of the final
(clipped, reduced) gradient, rel 1e-4: only the order of the cross-rank sum differs.
"""

from __future__ import annotations

import json
import math
import subprocess
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cli_helpers import clean_env, forked_cli, forked_ranks, forked_run
from dist_train.config import load_config
from dist_train.errors import UserError
from dist_train.models.gpt import GPT
from dist_train.privacy.bookkeeping import BookKeeper, fix_batchnorm, per_sample_grad_norms, validate
from tiers import fast_first, slow

DP = ["optim.name=dp_sgd", "optim.lr=0.05", "privacy.max_physical_batch=3", "optim.schedule=constant",
      "checkpoint.every=0"]


def _tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=40, n_layer=2, width=24, n_head=2, block_size=8, dropout=0.0)


def _loop_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
    """Reference: each example's gradient alone, by ordinary autograd (batch of one)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [list(torch.autograd.grad(model.loss(model(x[i:i + 1]), y[i:i + 1]), params)) for i in range(x.size(0))]


def test_whole_model_norms_match_batch_of_one_loop():
    model = _tiny_gpt()
    x = torch.randint(0, 40, (5, 8))
    y = torch.randint(0, 40, (5, 8))
    x[1, :3] = x[1, 3]  # repeated ids: the embedding's ghost norm must count them together
    ref = torch.stack([torch.sqrt(sum(g.double().pow(2).sum() for g in gs)) for gs in _loop_grads(model, x, y)])
    got = per_sample_grad_norms(model, lambda out, t: model.loss(out, t) * t.size(0), x, y)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=0)
    assert all(p.requires_grad and p.grad is None for p in model.parameters()), "the model was left changed"


def test_clipped_sum_matches_loop_over_micro_batches():
    """sum_i min(1, C/(||g_i|| + 1e-6)) g_i over two micro-batches == the loop's, with C between
    the smallest and largest norm so both clipped and unclipped examples occur."""
    model = _tiny_gpt()
    x, y = torch.randint(0, 40, (6, 8)), torch.randint(0, 40, (6, 8))
    loop = _loop_grads(model, x, y)
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in loop])
    clip = float(norms.median())
    want = [sum(min(1.0, clip / (float(n) + 1e-6)) * gs[k] for n, gs in zip(norms, loop)) for k in range(len(loop[0]))]
    keeper = BookKeeper(model, clip)
    for part in (slice(0, 4), slice(4, 6)):
        xb, yb = x[part], y[part]
        (model.loss(model(xb), yb) * xb.size(0)).backward()
        keeper.accumulate(xb.size(0))
    got = keeper.take()
    assert keeper.clipped == int((norms > clip).sum()) and 0 < keeper.clipped < 6
    assert all(p.grad is None for p in model.parameters()), "book-keeping must not run autograd's weight GEMMs"
    for g, w, name in zip(got, want, keeper.names.values()):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7, msg=name)
    keeper.detach()


def test_norms_are_taken_during_backward_and_complete_layers_let_go():
    """What the memory saving rests on: once backward has run, every layer's per-example norms are
    there; the norm layers (instantiated, small) already dropped their kept a and g; the linears on
    the ghost path (T = 8: 2T^2 < p d) still hold them for the clipped sum."""
    model = _tiny_gpt()
    keeper = BookKeeper(model, 1.0)
    x, y = torch.randint(0, 40, (4, 8)), torch.randint(0, 40, (4, 8))
    (model.loss(model(x), y) * 4).backward()
    layers = {layer.name: layer for layer in keeper.layers}
    assert all(layer.sq is not None and layer.sq.shape == (4,) for layer in layers.values())
    norm_layers = [layer for layer in layers.values() if isinstance(layer.module, nn.LayerNorm)]
    assert norm_layers and all(layer.a is None and layer.g is None for layer in norm_layers)
    ghost = [layer for layer in layers.values() if isinstance(layer.module, nn.Linear) and layer.module.out_features > 8]
    assert ghost and all(layer.a is not None and layer.g is not None for layer in ghost)
    keeper.accumulate(4)
    assert all(layer.a is None and layer.g is None and layer.sq is None for layer in keeper.layers)
    keeper.detach()


def test_validator_refuses_tied_weights_and_batchnorm():
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(UserError, match="tied weights"):
        validate(tied)
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(UserError, match="BatchNorm.*privacy.fix_model"):
        validate(bn)
    assert fix_batchnorm(bn) == 1 and isinstance(bn[1], nn.GroupNorm)
    validate(bn)


def test_layer_without_batch_dimension_is_refused():
    class Shared(nn.Module):  # a bias broadcast over the batch: no per-example gradient exists
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(4, 3)

        def forward(self, x):
            return x + self.table(torch.arange(3) % 4).sum(0)

    model = Shared()
    with pytest.raises(UserError, match="without the batch dimension"):
        per_sample_grad_norms(model, lambda out, t: (out - t).pow(2).sum(), torch.randn(5, 3), torch.zeros(5, 3))


# --- noise once across the world (real gloo ranks) ---------------------------------------------
SIGMA, CLIP, BATCH, STEPS, LR = 1.3, 0.7, 16, 3, 0.5


SEED = 3


def _noise_worker(rank: int, world: int, out: str, shards: int) -> None:
    """`shards` > 1: the model is HSDP-sharded, world / shards replica groups of `shards` ranks."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from dist_train.privacy.dp_sgd import DPSGD

    dist.init_process_group("gloo")  # env:// variables from run_on_ranks
    cfg = load_config(None, ["optim.name=dp_sgd", f"privacy.noise_multiplier={SIGMA}", f"privacy.max_grad_norm={CLIP}",
                             f"train.batch_size={BATCH}", f"train.seed={SEED}"])
    model = nn.Linear(400, 250)  # d = 100 250 coordinates
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    mesh = init_device_mesh("cpu", (world,))
    if shards > 1:
        fully_shard(model, mesh=init_device_mesh("cpu", (world // shards, shards),
                                                 mesh_dim_names=("dp_replicate", "dp_shard")))
    transform = DPSGD(cfg, SimpleNamespace(num_samples=lambda split: 100_000), None, model)
    transform.attach(SimpleNamespace(module=model, mesh=mesh, dp_size=world))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t
    per_step = []
    for _ in range(STEPS):  # no examples on any rank: the gradient is the noise alone
        transform(None)
        per_step.append(torch.cat([full(model.weight.grad).flatten(), full(model.bias.grad)]).clone())
        opt.step()
        opt.zero_grad(set_to_none=True)
    theta = torch.cat([full(model.weight.detach()).flatten(), full(model.bias.detach())])
    torch.save({"grads": per_step, "theta": theta, "epsilon": transform.epsilon()}, f"{out}/rank{rank}.pt")
    dist.barrier()  # leave together; run_on_ranks tears the group down


def _noise_once(step: int, shards: int) -> torch.Tensor:
    """The reference gradient of a step with no examples: one draw per coordinate, row shard s
    drawn by rank s (the first replica group) from its stream, divided by the expected batch."""
    from dist_train.data.sampler import derive_seed
    from dist_train.privacy.dp_sgd import _NOISE_TAG

    pieces = {"weight": [], "bias": []}
    for s in range(shards):
        gen = torch.Generator().manual_seed(derive_seed(SEED, step, s, _NOISE_TAG))
        for name, rows in (("weight", (250, 400)), ("bias", (250,))):
            shard = torch.empty(rows).chunk(shards)[s].shape
            pieces[name].append(torch.randn(shard, generator=gen))
    noise = torch.cat([torch.cat(pieces["weight"]).flatten(), torch.cat(pieces["bias"])])
    return noise * SIGMA * CLIP / BATCH


@pytest.mark.parametrize("world, shards", [(1, 1), (2, 1), slow(4, 2, id="hsdp-2x2")])
def test_noise_is_added_once_per_coordinate_across_ranks(world, shards, tmp_path):
    """Replicated on 1 and 2 ranks, and HSDP 2 x 2 (each row shard's noise from the first replica
    group's owner, then summed across the replicas): every rank's update equals the reference that
    draws each coordinate once (rtol 1e-6: only the scaling's rounding), and its spread is sigma C / B."""
    forked_ranks(_noise_worker, world, (str(tmp_path), shards))
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r in res[1:]:  # every rank applies the same reduced gradient
        for a, b in zip(r["grads"], res[0]["grads"]):
            assert torch.equal(a, b)
    for step, g in enumerate(res[0]["grads"]):
        torch.testing.assert_close(g, _noise_once(step, shards), rtol=1e-6, atol=0, msg=f"step {step}")
    want_std = SIGMA * CLIP / BATCH  # sigma C / B: one draw per coordinate, divided by the expected batch
    for g in res[0]["grads"]:
        assert abs(float(g.std()) / want_std - 1) < 0.05, f"noise std {float(g.std()):.5f} vs {want_std:.5f}"
        assert abs(float(g.mean())) < 5 * want_std / math.sqrt(g.numel())
    d = res[0]["theta"].numel()
    expected = STEPS * d * SIGMA ** 2 * CLIP ** 2 * LR ** 2 / BATCH ** 2  # ||theta||^2 after k noisy steps
    assert abs(float(res[0]["theta"].pow(2).sum()) / expected - 1) < 0.05
    assert res[0]["epsilon"] > 0


# --- through the CLI ---------------------------------------------------------------------------
def _cli(args: list[str], cwd) -> subprocess.CompletedProcess:
    return forked_cli(args, cwd, env=clean_env(OMP_NUM_THREADS="1"), timeout=300, merge_stderr=True)


# HSDP 2 x 2: 4 ranks, FSDP2 over a replicate x shard mesh.
LAYOUTS = {"ddp": (2, ["parallel.backend=ddp"]), "fsdp": (2, ["parallel.backend=fsdp"]),
           "hsdp": (4, ["parallel.backend=fsdp", "parallel.dp_replicate=2"])}


@pytest.mark.parametrize("base, backend", fast_first(("sgd", "ddp"), ("muon", "ddp"), ("sgd", "fsdp"), ("normuon", "fsdp"),
                                                     ("sgd", "hsdp")))
def test_two_ranks_at_sigma_zero_match_one_process(dt, tmp_path, base, backend):
    """Same Poisson logical batches (the union over ranks does not depend on the world size), same
    clipping, no noise: the gradient, and so every step, matches (physical micro-batches of 3 with
    batches of ~16 examples: ranks run different micro-batch counts, some possibly none). With Muon
    as the base, its matrices reach their owner rank unreduced and are averaged there; under FSDP2
    each row shard's sum is reduce-scattered to its owner, and ranks that drew fewer examples run
    empty micro-batches so every forward's all-gather has all ranks. Under HSDP 2 x 2 the sums are
    reduce-scattered in each shard group and all-reduced across the two replica groups."""
    common = [*dt.TINY_GPT, *DP, "train.batch_size=16", "privacy.noise_multiplier=0", "privacy.max_grad_norm=0.5",
              f"privacy.base_optimizer={base}", *(["optim.lr=0.02", "optim.matrix.adamw_lr=0.003"] if "muon" in base else [])]
    one = dt.run(tmp_path / "one", "one", *common, steps=4)
    nproc, layout = LAYOUTS[backend]
    two = dt.forked(tmp_path / "two", "two", *common, *layout, steps=4, nproc=nproc)
    assert [r["dp_examples"] for r in one] == [r["dp_examples"] for r in two]
    assert len({r["dp_examples"] for r in one}) > 1, "Poisson batches should vary in size"
    for a, b in zip(one, two):
        if base == "sgd" or backend == "ddp":  # (the logged norm leaves out matrices a Muon owner reduces)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["dp_mean_example_norm"] == pytest.approx(a["dp_mean_example_norm"], rel=1e-4)
        assert a["epsilon"] is None  # sigma = 0: no guarantee, and none is claimed
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-4)
    assert one[0]["val_loss" if "val_loss" in one[0] else "loss"] - one[-1]["val_loss"] > 0.02, "did not train"
    assert 0 < one[0]["dp_clip_fraction"] <= 1


@pytest.mark.slow
def test_resume_continues_noise_and_accountant(dt, tmp_path):
    common = [*dt.TINY_GPT, *DP, "privacy.noise_multiplier=1.0", "checkpoint.at_end=true"]
    straight = dt.forked(tmp_path / "a", "r", *common, "parallel.backend=ddp", steps=6)
    dt.forked(tmp_path / "b", "r", *common, "parallel.backend=ddp", steps=3)
    resumed = dt.forked(tmp_path / "b", "r", *common, "parallel.backend=ddp", steps=6)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(straight[3:], resumed[3:]):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["epsilon"] == pytest.approx(a["epsilon"], rel=1e-9)
    assert straight[-1]["epsilon"] > straight[2]["epsilon"] > 0


def test_budget_stop_and_spent_budget_at_resume(dt, tmp_path):
    """sigma 0.8 and a target that 3 of the 10 steps would exceed: training stops before it, keeps a
    checkpoint of what it did, and a resume with the same target refuses to train (exit 2)."""
    from dist_train.privacy import compute_epsilon

    cfg = load_config("quickstart.yaml", [*dt.TINY_GPT, "parallel.stages=1"])
    from dist_train.data import build_dataset

    n = build_dataset(cfg.data, cfg.model.block_size).num_samples("train")
    q, delta = 8 / n, 0.1 / n
    target = (compute_epsilon(0.8, q, 2, delta) + compute_epsilon(0.8, q, 3, delta)) / 2
    args = ["run", "quickstart.yaml", f"run.dir={tmp_path}", "run.name=b", "parallel.backend=none", "parallel.stages=1",
            "train.steps=10", *dt.TINY_GPT, *DP, "privacy.noise_multiplier=0.8", f"privacy.target_epsilon={target}",
            "checkpoint.at_end=true", "telemetry.progress=on"]
    proc = _cli(args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "privacy budget" in proc.stdout
    recs = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 2 and recs[-1]["epsilon"] <= target
    assert (tmp_path / "b" / "checkpoints" / "step-2" / "COMMITTED").exists()
    again = _cli(args, tmp_path)
    assert again.returncode == 2 and "budget is spent" in again.stdout and "Traceback" not in again.stdout


@pytest.mark.parametrize("overrides, message", [
    (["privacy.noise_multiplier=0", "privacy.target_epsilon=3"], "privacy.noise_multiplier"),
    (["privacy.noise_multiplier=1", "privacy.delta=0.5"], "privacy.delta"),
    (["optim.name=dp_sgd"], "privacy.noise_multiplier or privacy.target_epsilon"),
    (["privacy.noise_multiplier=0.05", "privacy.target_epsilon=0.5"], "spent by a single step"),
    (["privacy.noise_multiplier=1", "parallel.backend=deepspeed"], "dp_sgd"),
])
def test_bad_privacy_input_exits_2(tmp_path, overrides, message):
    proc = _cli(["run", "quickstart.yaml", f"run.dir={tmp_path}", "parallel.stages=1", "parallel.backend=none",
                 "optim.name=dp_sgd", "data.max_bytes=200000", *overrides], tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert message in proc.stdout and "Traceback" not in proc.stdout
    assert not (tmp_path / "quickstart" / "metrics.jsonl").exists()


def test_plan_shows_the_privacy_settings(tmp_path):
    proc = _cli(["plan", "quickstart.yaml", "--nproc", "2", "parallel.stages=1",
                 "parallel.backend=ddp", "optim.name=dp_sgd", "privacy.target_epsilon=4", "train.steps=100",
                 "data.max_bytes=200000"], tmp_path)
    assert proc.returncode == 0, proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("privacy"))
    assert "calibrated: epsilon <= 4 in 100 steps" in line and "Poisson q" in line


@pytest.mark.parametrize("secure", [False, True])
def test_noise_seeding_reproducible_or_secure(secure):
    """Default: the noise of step s is a function of (train.seed, s), so a resumed run redraws it
    exactly; privacy.secure_rng: reseeded from the OS CSPRNG, never the same twice."""
    from dist_train.privacy.dp_sgd import DPSGD

    cfg = load_config(None, ["optim.name=dp_sgd", "privacy.noise_multiplier=1", f"privacy.secure_rng={str(secure).lower()}"])
    draws = []
    for _ in range(2):
        model = nn.Linear(30, 20)
        t = DPSGD(cfg, SimpleNamespace(num_samples=lambda split: 10_000), None, model)
        t.attach(SimpleNamespace(module=model, mesh=None, dp_size=1))
        t(None)
        draws.append(model.weight.grad.clone())
    assert torch.equal(draws[0], draws[1]) != secure


# --- inside local-learning stages --------------------------------------------------------------
STAGED = ["parallel.stages=2", "local.method=dgl", "parallel.backend=ddp", "local.send_targets=true",
          "model.n_layer=2", "model.width=32", "model.n_head=2", "model.block_size=16", "data.max_bytes=200000",
          "train.batch_size=16", "train.log_every=1", "train.eval_batches=1", "telemetry.tensorboard=false",
          *DP, "privacy.max_grad_norm=0.5", "runtime.threads=1"]


def _staged(tmp_path, nproc: int, *extra: str) -> list[list[dict]]:
    forked_run(["quickstart.yaml", f"run.dir={tmp_path}", "run.name=s", "train.steps=4", *STAGED, *extra], tmp_path,
               nproc=nproc)
    return [[json.loads(x) for x in (tmp_path / "s" / "stages" / f"stage{k}" / "metrics.jsonl").read_text().splitlines()]
            for k in range(2)]


@pytest.mark.slow
def test_stages_with_replicas_match_one_replica_per_stage(tmp_path):
    """2 DGL stages x 2 replicas == 2 stages x 1 replica at sigma = 0: each stage clips its own
    examples' local gradients; Poisson batches of varying size cross the link padded to the physical
    micro-batch and are sliced back by the receiving stage."""
    one = _staged(tmp_path / "a", 2, "privacy.noise_multiplier=0")
    two = _staged(tmp_path / "b", 4, "privacy.noise_multiplier=0")
    for k in range(2):
        assert [r["dp_examples"] for r in one[k]] == [r["dp_examples"] for r in two[k]]
        for a, b in zip(one[k], two[k]):
            assert b["dp_mean_example_norm"] == pytest.approx(a["dp_mean_example_norm"], rel=1e-4), f"stage {k}"
    assert two[1][-1]["val_loss"] == pytest.approx(one[1][-1]["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_stages_are_accounted_as_one_mechanism(tmp_path):
    """K stages noise their own updates on one Poisson sample: accounted as sigma / sqrt(K) per step."""
    from dist_train.data import build_dataset
    from dist_train.privacy import compute_epsilon

    cfg = load_config("quickstart.yaml", [*STAGED, "privacy.noise_multiplier=2.0"])
    n = build_dataset(cfg.data, cfg.model.block_size).num_samples("train")
    runs = _staged(tmp_path, 2, "privacy.noise_multiplier=2.0")
    want = compute_epsilon(2.0 / math.sqrt(2), 16 / n, 4, 0.1 / n)
    for k in range(2):
        assert runs[k][-1]["epsilon"] == pytest.approx(want, rel=1e-9)
        assert runs[k][-1]["noise_multiplier"] == 2.0


def test_stages_refuse_methods_without_per_example_losses(tmp_path):
    proc = _cli(["plan", "quickstart.yaml", "--nproc", "2", *STAGED, "local.method=man", "privacy.noise_multiplier=1"],
                tmp_path)
    assert proc.returncode == 2 and "dgl" in proc.stdout
