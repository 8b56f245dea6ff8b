"""The trainer's own state beyond model and optimizer: step, RNG streams and data position."""

from __future__ import annotations

import random

import torch


def capture(step: int, sampler_state: dict) -> dict:
    state = {"step": step, "sampler": sampler_state, "torch_rng": torch.get_rng_state(),
             "python_rng": random.getstate()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    random.setstate(_as_tuple(state["python_rng"]))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])


def _as_tuple(x):
    # random.setstate wants tuples all the way down; a round trip may hand back lists.
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
