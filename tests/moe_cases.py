"""Shared cases for the expert tests: a small float64 problem run by W gloo ranks or by one process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dist_train.pde.basis import BasisMLP
from dist_train.pde.constraint import LMOptions
from dist_train.pde.grid import PDEGrid
from dist_train.pde.model import PDEModel

GRID = PDEGrid(nx=17, nt=9, t_end=0.5, nu=0.01, rho=1.0)
# diffusion–sorption at PDEBench's D on a short horizon: the front moves a few cells of this grid
SORPTION = PDEGrid(nx=17, nt=9, t_end=50.0, nu=5e-4, rho=0.0, equation="diffusion_sorption")
GRIDS = {"fisher_kpp": GRID, "diffusion_sorption": SORPTION}
SAMPLES = 4
# (experts, time_splits, overlap[, equation]): several experts per rank, a number not divisible by W, a
# time split, K = 1, overlapping constrained regions (3 columns: most of a neighbouring 4-column band),
# and diffusion–sorption's inflow and outflow rows (Fisher–KPP otherwise)
CASES = [(4, 1, 0), (3, 1, 0), (4, 2, 0), (1, 1, 0), (4, 1, 3), (4, 1, 0, "diffusion_sorption")]


def model(experts: int, time_splits: int, overlap: int = 0, equation: str = "fisher_kpp", group=None) -> PDEModel:
    torch.manual_seed(0)
    grid = GRIDS[equation]
    return PDEModel(grid, BasisMLP(grid, 6, width=16, n_layer=2), n_basis=6, constraint="hard", experts=experts,
                    points=48, time_splits=time_splits, options=LMOptions(tol=1e-13), group=group,
                    overlap=overlap).double()


def batch(equation: str = "fisher_kpp") -> tuple[torch.Tensor, torch.Tensor]:
    from dist_train.pde.grid import reference_solution, sample_initial_conditions

    grid = GRIDS[equation]
    u0 = sample_initial_conditions(grid, SAMPLES, torch.Generator().manual_seed(1))
    return u0, reference_solution(u0, grid)


def equation_of(case: tuple) -> str:
    return case[3] if len(case) > 3 else "fisher_kpp"


def loss_and_grads(m: PDEModel, u0: torch.Tensor, ref: torch.Tensor) -> tuple[float, dict, torch.Tensor]:
    m.zero_grad()
    u = m(u0)
    loss = m.loss(u, ref)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in m.named_parameters()}, u.detach()


def worker(rank: int, world: int, out: str, expert_parallel=None) -> None:
    """Each rank takes its slice of the batch; loss and gradients are averaged over ranks like DDP does.
    The experts are spread over this rank's expert group of the run's own mesh (`runtime/mesh.py`):
    all ranks, or groups of `expert_parallel` ranks."""
    from dist_train.runtime.mesh import build_mesh, expert_group

    dist.init_process_group("gloo")  # env:// variables and one thread from run_on_ranks
    group = expert_group(build_mesh("cpu", world, 1), expert_parallel)
    per = SAMPLES // world
    mine = slice(rank * per, (rank + 1) * per)
    results = {}
    for case in CASES:
        u0, ref = batch(equation_of(case))
        m = model(*case, group=group)
        loss, grads, u = loss_and_grads(m, u0[mine], ref[mine])
        t = torch.tensor([loss])
        dist.all_reduce(t)
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
        us = [torch.empty_like(u) for _ in range(world)]
        dist.all_gather(us, u)
        results[case] = {"loss": float(t) / world, "grads": grads, "u": torch.cat(us),
                         "owned": list(m.experts.mine), "group": dist.get_process_group_ranks(group)}
    if rank == 0:
        torch.save(results, os.path.join(out, "results.pt"))
    dist.barrier()  # leave together; run_on_ranks tears the group down and skips finalization


def ift_and_finite_differences(b, u0, pts, pde, opt, h: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit gradient of a fixed random weighting of u = b·ω*(b) with respect to b, and the same
    by central finite differences of step h over every entry of b (the hard-constraint tests' check)."""
    from dist_train.pde.constraint import solve_hard_constraint

    wts = torch.randn(b.shape[:3], generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss(bb: torch.Tensor) -> torch.Tensor:
        return (wts * torch.einsum("btxn,bn->btx", bb, solve_hard_constraint(bb, u0, pts, pde, opt)[0])).sum()

    bg = b.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(bg), bg)
    fd = torch.zeros_like(b)
    for k in range(b.numel()):
        e = torch.zeros(b.numel(), dtype=torch.float64)
        e[k] = h
        fd.view(-1)[k] = (loss(b + e.view_as(b)) - loss(b - e.view_as(b))) / (2 * h)
    return grad, fd
