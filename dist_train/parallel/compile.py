"""`parallel.compile`: `torch.compile` on each model block by itself (torchtitan's choice).

Every block has the same graph, so compiling blocks rather than the whole model keeps compile time
flat in depth (the first block's code is reused by the others), and the FSDP2/DDP hooks around the
blocks stay outside the compiled code. `block.compile()` compiles in place: unlike
`torch.compile(block)`, which wraps the block and adds `_orig_mod.` to every name, parameter and
state-dict names stay as they are, so checkpoints and exports move between compiled and eager runs.

On CPU inductor generates C++ and builds it with the system compiler: `check_compiler` looks for it
before anything starts.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

from dist_train.errors import UserError


def compile_blocks(blocks) -> int:
    """Compile each of `blocks` in place; returns how many."""
    for block in blocks:
        block.compile()
    return len(blocks)


def compiler_candidates() -> list[str]:
    """The C++ compilers inductor would try, in its order (its `cpp.cxx` setting: $CXX, else g++)."""
    import torch._inductor.config as inductor

    search = inductor.cpp.cxx if isinstance(inductor.cpp.cxx, (list, tuple)) else (inductor.cpp.cxx,)
    return [c for c in search if c]  # None: a conda install that only a torch environment variable turns on


def runs_on_cpu(cfg) -> bool:
    """Will this run compute on the CPU (runtime.device cpu, or auto without CUDA)?"""
    return cfg.runtime.device == "cpu" or (cfg.runtime.device == "auto" and not torch.cuda.is_available())


def check_compiler(cfg) -> None:
    """UserError when `parallel.compile` is on for a CPU run and no C++ compiler is found."""
    if not (cfg.parallel.compile and runs_on_cpu(cfg)):
        return
    tried = compiler_candidates()
    if not any(shutil.which(c) for c in tried):
        raise UserError(f"parallel.compile: on CPU torch.compile (inductor) builds C++ with the system compiler, "
                        f"and none was found (tried: {', '.join(tried) or 'none'}); install g++ or set CXX, "
                        f"or set parallel.compile=false")


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far, by dynamo's own counters: tracing and the
    forward's inductor compile of every frame, plus the backward graphs (compiled lazily, at the
    first backward through each)."""
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))


def is_compiled(module: nn.Module) -> bool:
    """Has `module.compile()` been called on it?"""
    return getattr(module, "_compiled_call_impl", None) is not None
