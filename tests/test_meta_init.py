"""Build on meta, shard, then initialise (parallel/meta_init.py): the same seed gives the same full
weights at 1, 2 and 4 ranks (FSDP2 shards, gloo, forked ranks), the model's own init keeps its
distribution, set-up memory per rank falls with the data-parallel size, and a run of a model with
`init_weights` starts from the same weights whatever its backend and world size."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cli_helpers import forked_ranks
from dist_train.models.llama import Llama
from dist_train.parallel.meta_init import ROWS, materialize

SEED = 3


def tiny_llama(vocab_size: int = 131, width: int = 64, n_layer: int = 2, hidden: int = 160) -> Llama:
    # 131 rows: not a multiple of ROWS nor of 2 or 4 ranks, so blocks straddle shard edges
    return Llama(vocab_size=vocab_size, n_layer=n_layer, width=width, n_head=4, n_kv_heads=2, hidden=hidden,
                 block_size=16)


def _sharded(world: int, build) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = build()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    materialize(model, torch.device("cpu"), SEED)
    return model


def _full_weights(rank: int, world: int) -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        model = _sharded(world, tiny_llama)
        return {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()


def _reference() -> dict:
    """One process, no sharding (what DDP and backend none materialise)."""
    with torch.device("meta"):
        model = tiny_llama()
    materialize(model, torch.device("cpu"), SEED)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_full_weights_do_not_depend_on_world_size(world):
    ref = _reference()
    got = forked_ranks(_full_weights, nprocs=world)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_init_keeps_the_models_distribution():
    """The model's own init_weights chooses each std (Llama: 0.02, depth-scaled output projections,
    norms 1); only where the values come from changes."""
    w = _reference()
    assert abs(float(w["embed.tok.weight"].std()) - 0.02) < 0.002
    for layer in range(2):
        assert abs(float(w[f"blocks.{layer}.attention.wo.weight"].std()) - 0.02 / math.sqrt(2 * (layer + 1))) < 0.0015
        assert torch.equal(w[f"blocks.{layer}.attention_norm.weight"], torch.ones(64))
    # a different seed, different weights; rows of one parameter are not copies of each other
    with torch.device("meta"):
        other = tiny_llama()
    materialize(other, torch.device("cpu"), SEED + 1)
    assert not torch.equal(other.embed.tok.weight, w["embed.tok.weight"])
    tok = w["embed.tok.weight"]
    assert not torch.equal(tok[:ROWS], tok[ROWS:2 * ROWS])


def test_default_init_without_init_weights():
    """A model without init_weights gets the rule by module type: Linear/Embedding N(0, 0.02), biases 0."""
    build = lambda: nn.Sequential(nn.Embedding(300, 32), nn.Linear(32, 32), nn.LayerNorm(32))  # noqa: E731
    with torch.device("meta"):
        a = build()
    materialize(a, torch.device("cpu"), SEED)
    assert abs(float(a[0].weight.std()) - 0.02) < 0.002 and torch.equal(a[1].bias, torch.zeros(32))
    assert torch.equal(a[2].weight, torch.ones(32))


def _setup_peak(rank: int, world: int) -> int:
    import torch.distributed as dist

    from dist_train.bench.memory import AllocatedPeak

    dist.init_process_group("gloo")
    try:
        with AllocatedPeak() as mem:
            model = _sharded(world, lambda: tiny_llama(vocab_size=2048, width=256, n_layer=4, hidden=512))
        assert 3e6 < sum(p.numel() for p in model.parameters()) < 6e6  # a few million parameters
        return mem.peak
    finally:
        dist.destroy_process_group()


def test_setup_peak_memory_scales_with_dp():
    one, two = forked_ranks(_setup_peak, nprocs=1), forked_ranks(_setup_peak, nprocs=2)
    assert two <= 0.6 * one, (one, two)


def test_runs_start_from_the_same_weights(dt, tmp_path):
    """A Llama run's first loss (before any update, on the same global batch) is the same in one process
    and on 2 FSDP ranks: both built on meta and initialised from the same (seed, name, rows)."""
    args = ["model.name=llama", "model.n_layer=1", "model.width=32", "model.n_head=4", "model.n_kv_heads=2",
            "model.multiple_of=16", "model.block_size=16", "data.max_bytes=50000", "train.batch_size=4",
            "train.log_every=1", "train.eval_batches=1", "telemetry.progress=off", "telemetry.tensorboard=false",
            "train.sample_tokens=0"]
    one = dt.run(tmp_path, "one", *args, steps=1)
    two = dt.forked(tmp_path, "two", *args, "parallel.backend=fsdp", steps=1)
    assert one[0]["loss"] == pytest.approx(two[0]["loss"], rel=1e-5)
