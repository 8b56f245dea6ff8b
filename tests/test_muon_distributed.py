"""Owner-computes Muon / NorMuon on W real gloo ranks == the same optimizer in one process.

fp64 throughout, rtol 1e-10 on every weight and every optimizer state after every one of 4 steps,
W ∈ {1, 2, 4}, replicated (DDP) and row-sharded (FSDP2 DTensor) layouts, with uneven and empty
shards, a bank of 3 matrices (not divisible by W), missing gradients, clipping before Newton–Schulz,
and a DCP save + fresh load after step 2. The NS count is exactly one per matrix per step, summed
over the ranks (the naive scheme would count W per matrix).

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
    return {f"{k}/{lay}": mc.run(k, "replicated", rank=0, world=world) for k, lay in mc.CASES}


def assert_close(got: dict, ref: dict, where: str) -> None:
    for name, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=RTOL, atol=1e-14, msg=f"{where}: weight {name}")
    assert set(got["states"]) == set(ref["states"]), f"{where}: states for {sorted(got['states'])}"
    for name, st in ref["states"].items():
        assert set(got["states"][name]) == set(st), f"{where}: state keys of {name}"
        for k, v in st.items():
            torch.testing.assert_close(got["states"][name][k].to(v.dtype), v, rtol=RTOL, atol=1e-14,
                                       msg=f"{where}: state {name}.{k}")


@pytest.mark.parametrize("world", [1, 2, slow(4)])
def test_distributed_step_matches_single_process(world, tmp_path):
    forked_ranks(mc.worker, world, (str(tmp_path),))
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    refs = references(world, tmp_path)
    for case, steps in results.items():
        ref = refs[case]
        assert len(steps) == mc.STEPS
        for t, (got, want) in enumerate(zip(steps, ref), start=1):
            where = f"W={world} {case} step {t}"
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=RTOL), where
            assert got["grad_norm"] > mc.MAX_NORM, f"{where}: clipping never acted"
            assert_close(got, want, where)
            # Exactly one Newton–Schulz per matrix that has a gradient, across the whole world.
            expected = want["with_grad"]
            assert expected >= len(mc.MATRICES) - 1
            assert got["ns_this_step"] == expected, f"{where}: {got['ns_this_step']} NS calls"


def test_comparison_fails_on_a_different_run():
    """Negative controls: the assertions above do catch a different update, and the gradients of
    2 ranks differ from those of 4 (so the references are not interchangeable)."""
    muon = mc.run("muon", "replicated", rank=0, world=2)
    with pytest.raises(AssertionError):
        assert_close(mc.run("muon_adamw_scale", "replicated", rank=0, world=2)[2], muon[2], "control")
    with pytest.raises(AssertionError):
        assert_close(mc.run("muon", "replicated", rank=0, world=4)[3], muon[3], "control")
