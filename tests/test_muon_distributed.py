"""Owner-computes Muon / NorMuon on W real gloo ranks == the same optimizer in one process.

fp64 throughout, rtol 1e-10 on every weight and every optimizer state after every one of 4 steps,
W ∈ {1, 2, 4}, replicated (DDP) and row-sharded (FSDP2 DTensor) layouts, and at W = 4 HSDP 2 x 2
((Replicate(), Shard(0)) DTensors), with uneven and empty shards, a bank of 3 matrices (not
divisible by W), missing gradients, clipping before Newton–Schulz, and a DCP save + fresh load
after step 2. The NS count is exactly one per matrix per step, summed over the ranks (the naive
scheme would count W per matrix); under HSDP one per matrix per replica group (owners live inside a
shard group). The HSDP checkpoint of step 2 also resumes under FSDP on 4 ranks and in one process.

Why 1e-10 holds: the only arithmetic that differs from the single process is the order of the sum
over ranks in the gradient mean and in the norms (~1e-16 relative); NS is a smooth polynomial
iteration, so that difference stays ~1e-14 after 4 steps. A wrong owner, a lost shard, a double
average or a skipped clip moves values by far more than 1e-10.
"""

from __future__ import annotations

import pytest
import torch

import muon_cases as mc
from cli_helpers import forked_ranks
from tiers import slow

RTOL = 1e-10


def references(world: int, tmp_path) -> dict:
    """One process, no process group, gradients = the mean over `world` simulated ranks, stepped
    straight through (no checkpoint round trip)."""
    return {f"{k}/{lay}": mc.run(k, "replicated", rank=0, world=world) for k, lay in mc.cases(world)}


def assert_close(got: dict, ref: dict, where: str) -> None:
    for name, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=RTOL, atol=1e-14, msg=f"{where}: weight {name}")
    assert set(got["states"]) == set(ref["states"]), f"{where}: states for {sorted(got['states'])}"
    for name, st in ref["states"].items():
        assert set(got["states"][name]) == set(st), f"{where}: state keys of {name}"
        for k, v in st.items():
            torch.testing.assert_close(got["states"][name][k].to(v.dtype), v, rtol=RTOL, atol=1e-14,
                                       msg=f"{where}: state {name}.{k}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One forked run per world size, shared by the tests that read it."""
    done = {}

    def get(world: int):
        if world not in done:
            out = tmp_path_factory.mktemp(f"muon-w{world}")
            forked_ranks(mc.worker, world, (str(out),))
            done[world] = (out, torch.load(out / "results.pt", weights_only=False))
        return done[world]

    return get


@pytest.mark.parametrize("world", [1, 2, slow(4)])
def test_distributed_step_matches_single_process(world, tmp_path, runs):
    _, results = runs(world)
    refs = references(world, tmp_path)
    resumed = {case: steps for case, steps in results.items() if "->" in case}
    assert len(resumed) == (len(mc.KINDS) if world == 4 else 0)
    for case, steps in results.items():
        ref = refs[case.split("->")[0]]
        if case in resumed:  # from the HSDP checkpoint of step SAVE_AFTER: the steps after it
            ref = ref[mc.SAVE_AFTER:]
        assert len(steps) == len(ref)
        for t, (got, want) in enumerate(zip(steps, ref), start=mc.STEPS - len(ref) + 1):
            where = f"W={world} {case} step {t}"
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=RTOL), where
            assert got["grad_norm"] > mc.MAX_NORM, f"{where}: clipping never acted"
            assert_close(got, want, where)
            # Exactly one Newton–Schulz per matrix that has a gradient, across the whole world
            # (HSDP: across each replica group, which repeats it on its own copy).
            expected = want["with_grad"] * (mc.REPLICAS if case.endswith("/hsdp") else 1)
            assert want["with_grad"] >= len(mc.MATRICES) - 1
            assert got["ns_this_step"] == expected, f"{where}: {got['ns_this_step']} NS calls"


@pytest.mark.slow
def test_hsdp_checkpoint_resumes_in_one_process(runs):
    """Saved by 4 ranks as HSDP 2 x 2 after step 2 (the state as (Replicate(), Shard(0)) DTensors,
    written once by DCP), loaded by one process that holds every matrix whole: steps 3 and 4 equal
    the straight single-process run (rtol 1e-10)."""
    out, _ = runs(4)
    for kind in ("muon", "normuon"):
        got = mc.run(kind, "replicated", rank=0, world=4, resume_from=out / f"{kind}-hsdp")
        want = mc.run(kind, "replicated", rank=0, world=4)[mc.SAVE_AFTER:]
        assert len(got) == len(want) == mc.STEPS - mc.SAVE_AFTER
        for t, (g, w) in enumerate(zip(got, want), start=mc.SAVE_AFTER + 1):
            assert_close(g, w, f"{kind} hsdp -> one process, step {t}")


def test_comparison_fails_on_a_different_run():
    """Negative controls: the assertions above do catch a different update, and the gradients of
    2 ranks differ from those of 4 (so the references are not interchangeable)."""
    muon = mc.run("muon", "replicated", rank=0, world=2)
    with pytest.raises(AssertionError):
        assert_close(mc.run("muon_adamw_scale", "replicated", rank=0, world=2)[2], muon[2], "control")
    with pytest.raises(AssertionError):
        assert_close(mc.run("muon", "replicated", rank=0, world=4)[3], muon[3], "control")
