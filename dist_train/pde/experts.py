"""The mixture of hard-constraint experts across ranks (PI-HC-MoE, arXiv 2402.13412, §3).

Every rank computes the basis b = f_θ(u0) for its own samples on the whole grid. Expert k owns one
sub-domain (`domain.py`) and lives on rank k mod W. One forward is:

1. every rank sends, to each expert's owner, its samples' basis values on that expert's constrained
   region (its block, widened by `moe.overlap` columns) plus halo, and the initial values at the
   expert's initial-condition points (one `all_to_all_single`);
2. the owner solves its experts' constrained problems for the samples of all ranks at once
   (Levenberg–Marquardt, float64, batched; IFT backward: `constraint.py`) and forms
   u_k = b_k ω_k on the expert's own block;
3. the owner sends every rank its samples' pieces of u back (a second `all_to_all_single`); each
   rank assembles its samples' piecewise solution.

Only basis activations (with their halo), initial values and solutions cross ranks; the backward
pass runs the same two exchanges in reverse (torch.distributed.nn's differentiable all-to-all)
and gives each rank the cotangents of its own basis activations. The basis network's parameter
gradients are then averaged by the data-parallel backend like any other gradient.

K = 1 (one global constraint) is solved where its samples are, without any exchange: every rank
solves the global problem for its own samples, the data-parallel placement of a single constraint.
"""

from __future__ import annotations

import time
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from dist_train.pde.constraint import CONSTRAINT_ROWS, LMOptions, solve_hard_constraint
from dist_train.pde.domain import constraint_points, decompose, owner_of, points_per_expert
from dist_train.pde.grid import PDEGrid


def _exchange(pieces: list[torch.Tensor], recv_sizes: list[int], group) -> list[torch.Tensor]:
    """Send pieces[r] (1-D) to rank r of `group`, receive recv_sizes[s] elements from rank s; differentiable."""
    if group is None:
        return pieces
    from torch.distributed.nn.functional import all_to_all_single

    send = torch.cat(pieces)
    with warnings.catch_warnings():
        # torch 2.13 marks the public differentiable collectives deprecated in favour of a private
        # module; this one still works and is the documented autograd-aware all-to-all.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_to_all_single is deprecated")
        out = all_to_all_single(send.new_empty(sum(recv_sizes)), send, recv_sizes, [p.numel() for p in pieces],
                                group=group)
    return list(out.split(recv_sizes))


class ExpertLayer(nn.Module):
    """u [B_local, nt, nx] from basis values b [B_local, nt, nx, N] and initial values u0 [B_local, nx]."""

    def __init__(self, grid: PDEGrid, experts: int, points: int, time_splits: int = 1,
                 options: Optional[LMOptions] = None, group=None, seed: int = 0, replicas=None, overlap: int = 0):
        """`group`: the expert group the experts are spread over (None: all in this process);
        `replicas`: every data-parallel rank, over which `stats` takes its maxima (default: `group`);
        `overlap`: columns each expert constrains beyond its own block on either side (`domain.py`)."""
        super().__init__()
        self.grid, self.group, self.options = grid, group, options or LMOptions()
        self.replicas = replicas if replicas is not None else group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.subs = decompose(grid, experts, time_splits, overlap)
        self.points = [constraint_points(s, grid, m_k, seed)
                       for s, m_k in zip(self.subs, points_per_expert(points, experts))]
        self.pde = CONSTRAINT_ROWS[grid.equation](grid)
        self.local = experts == 1 or group is None  # nothing to send: every rank solves what it has
        self.mine = [k for k in range(experts) if self.local or owner_of(k, self.world) == self.rank]
        self.last: dict[int, dict] = {}  # expert -> figures of its latest solve on this rank

    def _owned_by(self, rank: int) -> list[int]:
        return [k for k in range(len(self.subs)) if owner_of(k, self.world) == rank]

    def _piece(self, b: torch.Tensor, u0: torch.Tensor, k: int) -> torch.Tensor:
        """[B, S_k]: expert k's halo block of b, flattened, then its initial values."""
        s = self.subs[k]
        block = b[:, s.ht0:s.t1, s.hx0:s.hx1].flatten(1)
        return torch.cat([block, u0[:, s.ic_columns()].to(block.dtype)], 1)

    def _piece_size(self, k: int, n_basis: int) -> int:
        tb, xb = self.subs[k].halo_shape
        return tb * xb * n_basis + self.subs[k].ic_columns().numel()

    def _solve(self, k: int, piece: torch.Tensor, n_basis: int) -> torch.Tensor:
        """Expert k for every sample of `piece` [B, S_k]: u_k [B, T_k, X_k] on its own block."""
        s, pts = self.subs[k], self.points[k]
        tb, xb = s.halo_shape
        block = piece[:, :tb * xb * n_basis].reshape(-1, tb, xb, n_basis)
        u0 = piece[:, tb * xb * n_basis:].detach().double()
        rows, cols = s.own_in_halo()
        if not bool(torch.isfinite(block).all()):
            # Diverged basis values: no solve (it would raise in the middle of a collective). A NaN
            # solution, still on the graph, makes the loss and gradients non-finite, which the run's
            # guard (train.on_nonfinite) agrees on over the ranks and never applies.
            self.last[k] = {"solve_s": 0.0, "iterations": 0, "grad_norm": float("nan"), "unconverged": 0, "stalled": 0,
                            "fallbacks": 0, "nonfinite": 1}
            return block[:, rows, cols, 0] * float("nan")
        start = time.perf_counter()
        omega, info = solve_hard_constraint(block, u0, pts, self.pde, self.options)
        u = torch.einsum("btxn,bn->btx", block[:, rows, cols].double(), omega).to(piece.dtype)
        self.last[k] = {"solve_s": time.perf_counter() - start, "iterations": info.iterations,
                        "grad_norm": info.grad_norm, "unconverged": info.unconverged, "stalled": info.stalled, "fallbacks": info.fallbacks, "nonfinite": 0}
        return u

    def forward(self, b: torch.Tensor, u0: torch.Tensor) -> torch.Tensor:
        n_local, n_basis = b.shape[0], b.shape[-1]
        if self.local:
            return self._assemble({k: self._solve(k, self._piece(b, u0, k), n_basis) for k in self.mine}, n_local)
        # 1. basis blocks (+ halo) and initial values to the experts' owners
        pieces = [torch.cat([self._piece(b, u0, k) for k in self._owned_by(r)], 1).flatten()
                  if self._owned_by(r) else b.new_zeros(0) for r in range(self.world)]
        mine_size = sum(self._piece_size(k, n_basis) for k in self.mine)
        received = [p.view(n_local, mine_size) for p in _exchange(pieces, [n_local * mine_size] * self.world,
                                                                 self.group)]
        # 2. solve each owned expert for the samples of every rank (rank order)
        offsets, at = {}, 0
        for k in self.mine:
            offsets[k] = (at, at + self._piece_size(k, n_basis))
            at = offsets[k][1]
        solved = {k: self._solve(k, torch.cat([p[:, a:z] for p in received]), n_basis)
                  for k, (a, z) in offsets.items()}
        # 3. solutions back to the ranks whose samples they are
        # A rank that owns no expert still sends (nothing) through the graph, so that its backward
        # joins both reverse exchanges as every other rank's does.
        nothing = torch.cat(received)[:0].flatten()
        back = [torch.cat([solved[k][r * n_local:(r + 1) * n_local].flatten(1) for k in self.mine], 1).flatten()
                if self.mine else nothing for r in range(self.world)]
        sizes = [n_local * sum(self.subs[k].own_shape[0] * self.subs[k].own_shape[1] for k in self._owned_by(r))
                 for r in range(self.world)]
        pieces_u: dict[int, torch.Tensor] = {}
        for r, flat in enumerate(_exchange(back, sizes, self.group)):
            cols = flat.view(n_local, -1)
            at = 0
            for k in self._owned_by(r):
                t, x = self.subs[k].own_shape
                pieces_u[k] = cols[:, at:at + t * x].view(n_local, t, x)
                at += t * x
        return self._assemble(pieces_u, n_local)

    def _assemble(self, pieces: dict[int, torch.Tensor], n_local: int) -> torch.Tensor:
        """The piecewise solution [B, nt, nx]: blocks side by side in x within each time band, bands in t."""
        bands: dict[int, list] = {}
        for k in sorted(pieces):
            bands.setdefault(self.subs[k].t0, []).append(pieces[k])
        return torch.cat([torch.cat(row, 2) for _, row in sorted(bands.items())], 1)

    def stats(self) -> dict[str, float]:
        """Figures of the latest forward, the largest over the ranks (collective over `replicas`):
        each expert's solve time (with K = 1, the slowest rank's), LM iterations, the stationarity
        residual ‖∇L‖∞ at the solution, and the most unconverged / stalled samples, fallbacks, experts skipped
        for non-finite basis values on one rank."""
        keys = ("iterations", "grad_norm", "unconverged", "stalled", "fallbacks", "nonfinite")
        figures = [max((f[key] for f in self.last.values()), default=0.0) for key in keys]
        times = [self.last[k]["solve_s"] if k in self.last else 0.0 for k in range(len(self.subs))]
        vector = torch.tensor(times + figures, dtype=torch.float64)
        if self.replicas is not None:
            dist.all_reduce(vector, op=dist.ReduceOp.MAX, group=self.replicas)
        values = vector.tolist()
        out = {f"expert{k}_solve_s": values[k] for k in range(len(self.subs))}
        out.update(zip(("lm_iterations", "constraint_grad_norm", "lm_unconverged", "lm_stalled", "lm_fallbacks",
                        "lm_nonfinite_inputs"),
                       values[len(self.subs):]))
        return out
