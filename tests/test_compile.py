"""`parallel.compile`: each block compiled in place (names unchanged), refused by the backends that
cannot take it, a missing C++ compiler one line before anything starts, and a compiled run equal to
an eager one on DDP and FSDP2 (2 ranks) and in a 2-stage local pipeline.

Tolerance of the comparisons: inductor fuses the block's elementwise ops into its own C++ loops,
which round differently from the eager kernels (float32, a few ulps per op); over 3 AdamW steps of
a tiny model the losses agree to rtol 1e-4, while a real difference (a block skipped, a gradient
lost, a hook that did not fire) moves them by 1e-2 or more.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from cli_helpers import forked_run

RTOL = 1e-4


def test_blocks_compile_in_place_with_their_names() -> None:
    """Compiled after activation checkpointing, each block keeps its state-dict names (no
    `_orig_mod.`, no wrapper prefix), so checkpoints and exports load either way."""
    from dist_train.config import load_config
    from dist_train.models.gpt import GPT
    from dist_train.parallel.compile import is_compiled
    from dist_train.parallel.parallelize import apply_model_transforms

    torch.manual_seed(0)
    plain = GPT(vocab_size=64, n_layer=2, width=32, n_head=2, block_size=16)
    for ac in ("none", "full"):
        cfg = load_config(None, ["parallel.stages=1", "parallel.compile=true", f"parallel.activation_checkpointing={ac}"])
        model = apply_model_transforms(copy.deepcopy(plain), cfg)
        assert all(is_compiled(b) for b in model.blocks)
        assert list(model.state_dict()) == list(plain.state_dict()), ac


@pytest.mark.parametrize("backend", ["deepspeed", "fairscale"])
def test_backends_without_compiled_blocks_refuse_it(backend: str) -> None:
    from dist_train.config import load_config
    from dist_train.config.layout import check_layout
    from dist_train.errors import UserError

    cfg = load_config(None, ["parallel.stages=1", f"parallel.backend={backend}", "parallel.compile=true"])
    with pytest.raises(UserError, match=f"parallel.compile: not offered with parallel.backend={backend}"):
        check_layout(cfg, 2)


def test_diff2_refuses_it() -> None:
    from dist_train.config import load_config
    from dist_train.errors import UserError

    with pytest.raises(UserError, match="parallel.compile: diff2"):
        load_config(None, ["parallel.stages=1", "optim.name=diff2", "privacy.diff2.sigma1=1.0",
                           "privacy.diff2.sigma2=1.0", "parallel.compile=true"])


def test_a_missing_cxx_compiler_is_one_line(monkeypatch) -> None:
    """The compiler inductor would use ($CXX, else g++, as its cpp.cxx setting holds) is looked up
    before the run starts; a CPU run without one stops with a UserError (one line, exit 2)."""
    import torch._inductor.config as inductor

    from dist_train.config import load_config
    from dist_train.errors import UserError
    from dist_train.parallel.compile import check_compiler

    cfg = load_config(None, ["parallel.stages=1", "runtime.device=cpu", "parallel.compile=true"])
    check_compiler(cfg)  # this machine has one
    monkeypatch.setattr(inductor.cpp, "cxx", (None, "/nonexistent/bin/g++"))
    with pytest.raises(UserError, match=r"parallel.compile: .*none was found \(tried: /nonexistent/bin/g\+\+\)") as err:
        check_compiler(cfg)
    assert "\n" not in str(err.value)
    check_compiler(load_config(None, ["parallel.stages=1", "runtime.device=cpu"]))  # not compiling: no check


# --- compiled against eager, on real ranks ------------------------------------------------------
TINY = ["model.name=llama", "model.n_layer=2", "model.width=32", "model.n_head=2", "model.n_kv_heads=1",
        "model.block_size=16", "data.max_bytes=200000", "train.batch_size=8", "train.steps=3", "train.log_every=1",
        "train.eval_batches=1", "train.sample_tokens=0", "optim.warmup_steps=1", "runtime.device=cpu",
        "telemetry.energy=none", "telemetry.tensorboard=false", 'telemetry.progress="off"',
        "checkpoint.at_end=false", "checkpoint.resume=never"]
# Batch 8 over 2 data-parallel ranks, and 4 through each stage of the pipeline: every rank's blocks
# see [4, 16, 32], so every compiled process compiles the same block graphs (the inductor cache
# key holds the shapes) and can load them from the shared cache rather than build them again.
LAYOUTS = {"ddp": ["parallel.backend=ddp", "parallel.stages=1"],
           "fsdp": ["parallel.backend=fsdp", "parallel.stages=1"],
           "local": ["parallel.backend=ddp", "parallel.stages=2", "local.method=dgl", "train.batch_size=4"]}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Each layout eager and compiled on 2 forked ranks; every process shares one inductor cache and
    compiles on one thread. One process first compiles the block graphs every rank will (one rank,
    no backend, its blocks fed [4, 16, 32]): the 6 compiled ranks then load them (about 5 s each)
    rather than two ranks building them cold at once (about 30 s of CPU each on 2 cores).

    Each process would check the C++ compiler's vector ISAs again (a dry build per ISA in a fresh
    cache, then a child process that loads each: about 2 s per process); TORCHINDUCTOR_VEC_ISA_OK
    takes the CPU's own list instead, which picks the same ISA here: the generated C++ kernels and
    their compiler flags are the same (the same kernel files in the cache either way).

    The llama's blocks hold a custom autograd function (its SwiGLU), for which torch leaves the
    AOTAutograd cache off by default (the function's code is not in the cache key); in this fresh,
    test-only cache the function cannot change between runs, so it is turned on, and a rank skips
    the joint graph's tracing and partitioning too."""
    root = tmp_path_factory.mktemp("compile")
    env = {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "TORCHINDUCTOR_COMPILE_THREADS": "1",
           "TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD": "1", "TORCHINDUCTOR_VEC_ISA_OK": "1"}
    forked_run(["quickstart.yaml", f"run.dir={root}", "run.name=warm", *TINY, "train.batch_size=4",
                "parallel.backend=none", "parallel.stages=1", "parallel.compile=true"], root, nproc=1, env=env,
               timeout=900)
    out = {}
    for layout, overrides in LAYOUTS.items():
        for compiled in (False, True):
            name = f"{layout}-{'compiled' if compiled else 'eager'}"
            forked_run(["quickstart.yaml", f"run.dir={root}", f"run.name={name}", *TINY, *overrides,
                        f"parallel.compile={str(compiled).lower()}"], root, nproc=2, env=env, timeout=900)
            out[layout, compiled] = _records(root / name)
            if layout == "local":
                out[layout, compiled, "stage0"] = _records(root / name / "stages" / "stage0")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compiled_run_equals_eager(runs, layout: str) -> None:
    eager, compiled = runs[layout, False], runs[layout, True]
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [1, 2, 3]
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=RTOL)
    assert eager[0]["loss"] != pytest.approx(eager[-1]["loss"], rel=1e-3)  # it trains
    # compile time in the log: the first window's holds the compile, later ones add little
    if layout == "local":  # each stage's own records hold its compile time
        eager, compiled = runs[layout, False, "stage0"], runs[layout, True, "stage0"]
    assert "compile_s" not in eager[0]
    assert compiled[0]["compile_s"] > 0
    assert compiled[-1]["compile_s"] >= compiled[0]["compile_s"]
