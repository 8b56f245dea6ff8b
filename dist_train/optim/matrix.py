"""The distributed owner-computes step shared by Muon and NorMuon (the update rules live in muon.py).

One `torch.optim.Optimizer` holds two kinds of param groups: `algorithm` = the matrix rule
("muon"/"normuon") for hidden matrices, "adamw" for everything else (torch's functional AdamW), so
one schedule, one clip and one checkpoint cover the whole model.

A step, per bank of same-shape matrices (see owners.py):
1. gradients reach the owner: replicated parameters reduce-scatter their local gradients (the data-
   parallel wrapper was told to leave them alone); row-sharded ones are already reduced by FSDP2;
2. the momentum update runs where the gradient lives (owner, or each rank on its own rows);
3. the owner runs one batched Newton–Schulz over its matrices (row shards travel by all-to-all);
4. the rule's finishing step (NorMuon's row normalisation) runs on the rows each rank holds, with
   one all-reduce of per-matrix Frobenius norms when rows are sharded;
5. replicated weights are all-gathered from their owners.

A parameter whose gradient is missing on every rank is skipped (as a single-process torch optimizer
would); missing on some ranks only, it counts as zero there. Every rank enters every collective.

HSDP (FSDP2 on a 2-D (replicate, shard) mesh, placements (Replicate(), Shard(0))): owners are chosen
inside each shard group, and every replica group repeats the same orthogonalisations on the same
rows. FSDP2 has already all-reduced the gradient across the replicas, so each shard group holds a
whole, identical copy of every matrix's gradient and momentum: the all-to-alls, the norm all-reduce
and the clipping norm stay inside the group (inside a node when the groups are nodes) and the
optimizer adds no traffic between groups. Owners across the whole dp would cut each rank's
Newton–Schulz work by the replica count, but every update would then have to travel from its owner
to the other replica groups each step, on the slow links HSDP exists to spare (the choice other
distributed Muon implementations make too: they take the shard sub-mesh under HSDP). The state is
replicated like the weights, so a DCP checkpoint saves it once and reloads onto any layout.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.optim.adamw import adamw as adamw_fn

from dist_train.optim import owners as ow
from dist_train.optim.newton_schulz import coefficient_schedule, newton_schulz, ns_flops

_LOCAL = "local"  # a plain tensor's "placement": whole on every rank that holds it


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _resolve_group(process_group):
    """"auto": the world group when torch.distributed is initialised, else none (one process)."""
    if process_group == "auto":
        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    if hasattr(process_group, "get_group"):  # a 1-D DeviceMesh
        return process_group.get_group()
    return process_group


class MatrixOptimizer(torch.optim.Optimizer):
    """Base class: subclasses define `algorithm`, `_momentum` (gradient -> NS input) and `_finish`."""

    algorithm = "matrix"

    def __init__(self, params, defaults: dict, *, ns_steps: int = 5, ns_coefficients: str = "quintic",
                 ns_dtype: Optional[torch.dtype] = None, process_group="auto", owner_compute: bool = True):
        defaults = {"algorithm": self.algorithm, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0,
                    **defaults}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["algorithm"] not in (self.algorithm, "adamw"):
                raise ValueError(f"{type(self).__name__}: param group algorithm must be "
                                 f"{self.algorithm!r} or 'adamw', got {group['algorithm']!r}")
            if group["algorithm"] == self.algorithm:
                for p in group["params"]:
                    if p.ndim < 2:
                        raise ValueError(f"{type(self).__name__}: a {p.ndim}-D parameter of shape "
                                         f"{tuple(p.shape)} cannot be orthogonalised; put it in a param "
                                         "group with algorithm='adamw'")
        coefficient_schedule(ns_coefficients, 1)  # an unknown name fails here, not at the first step
        self.ns_steps, self.ns_coefficients, self.ns_dtype = ns_steps, ns_coefficients, ns_dtype
        self.owner_compute = owner_compute
        self._requested_group = process_group
        self._banks: Optional[list[ow.Bank]] = None
        self._reduced = False
        self._present: dict = {}  # param -> has a gradient somewhere this step
        self.ns_matrices = 0  # matrices this rank has orthogonalised (all steps)
        self.ns_flops = 0     # their Newton–Schulz FLOPs
        self.param_names: dict = {}  # param -> name, for checkpoints (set by the factory)

    # --- layout ---------------------------------------------------------------------------------
    def _layout(self) -> list[ow.Bank]:
        if self._banks is not None:
            return self._banks
        matrices = [(gi, p) for gi, g in enumerate(self.param_groups) if g["algorithm"] == self.algorithm
                    for p in g["params"]]
        sharded = {isinstance(p, DTensor) for _, p in matrices}
        if len(sharded) > 1:
            raise ValueError(f"{type(self).__name__}: some matrices are DTensors and some are not; "
                             "shard all of them (FSDP2) or none")
        self.sharded = sharded == {True}
        # Any DTensor (a matrix, or an AdamW parameter when no matrix is routed) fixes the group: its
        # shard dimension, over which the row pieces (and the clipping norm's parts) are spread.
        dtensors = [p for g in self.param_groups for p in g["params"] if isinstance(p, DTensor)]
        if dtensors:
            mesh = (matrices[0][1] if self.sharded else dtensors[0]).device_mesh
            if any(p.device_mesh != mesh or not row_sharded(p.placements) for _, p in matrices if self.sharded):
                raise ValueError(f"{type(self).__name__}: sharded matrices must be Shard(0) on a 1-D mesh, or "
                                 "(Replicate(), Shard(0)) on a 2-D replicate x shard (HSDP) mesh, all on one mesh")
            self.group = mesh.get_group(mesh.ndim - 1)
        else:
            self.group = _resolve_group(self._requested_group)
        self.world = dist.get_world_size(self.group) if self.group is not None else 1
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        if self.sharded and not self.owner_compute:
            raise ValueError("owner_compute=False (every rank orthogonalises everything) is offered for "
                             "replicated parameters only, as a baseline")
        banks: dict = {}
        for gi, p in matrices:
            key = (gi, ow.matrix_view_shape(p.shape), p.dtype)
            banks.setdefault(key, ow.Bank(group=gi, shape=key[1])).params.append(p)
        self._banks = list(banks.values())
        world = self.world if self.owner_compute else 1
        ow.assign_owners(self._banks, world)
        if not self.owner_compute:  # every rank computes every matrix
            for bank in self._banks:
                bank.owner = [self.rank] * len(bank.params)
        self._owner = {p: r for bank in self._banks for p, r in zip(bank.params, bank.owner)}
        return self._banks

    def owns(self, p) -> bool:
        """Whether this rank orthogonalises `p` (replicated layout; row-sharded: every rank holds rows)."""
        self._layout()
        return self._owner.get(p, self.rank) == self.rank

    @property
    def _distributed(self) -> bool:
        return self.group is not None and self.world > 1

    # --- phase 1: gradients to their owners -----------------------------------------------------
    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Bring every matrix gradient to where it is used (idempotent until the next step)."""
        banks = self._layout()
        if self._reduced:
            return
        self._reduced = True
        matrices = [p for b in banks for p in b.params]
        flags = torch.tensor([p.grad is not None for p in matrices], dtype=torch.float32,
                             device=matrices[0].device if matrices else "cpu")
        if self._distributed and matrices:
            dist.all_reduce(flags, group=self.group)
        self._present = {p: bool(f > 0) for p, f in zip(matrices, flags.tolist())}
        if self.sharded or not self._distributed:
            return
        for bank in banks:
            grads = [p.grad for p in bank.params]
            if self.owner_compute:
                mine = ow.reduce_scatter_bank(bank, grads, self.world, self.group) / self.world
                owned = set(bank.owned(self.rank))
                for j, i in enumerate(bank.owned(self.rank)):
                    p = bank.params[i]
                    p.grad = mine[j].view_as(p) if self._present[p] else None
                for i, p in enumerate(bank.params):
                    if i not in owned:
                        p.grad = None  # this rank neither holds nor needs it
            else:  # the naive baseline: all-reduce, everyone keeps everything
                for p in bank.params:
                    if self._present[p]:
                        g = p.grad if p.grad is not None else torch.zeros_like(p)
                        dist.all_reduce(g, group=self.group)
                        p.grad = g / self.world

    # --- phase 2: clip (before Newton–Schulz) ---------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient norm over all parameters (each gradient element counted once across the
        ranks), and scale every gradient by min(1, max_norm / (norm + 1e-6)), as torch's clip does."""
        self.reduce_gradients()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return 0.0
        acc = torch.promote_types(grads[0].dtype, torch.float32)
        whole = torch.zeros((), dtype=acc, device=_local(grads[0]).device)  # identical on every rank
        split = torch.zeros((), dtype=acc, device=whole.device)  # each rank holds a different part
        for group in self.param_groups:
            is_matrix = group["algorithm"] == self.algorithm
            for p in group["params"]:
                if p.grad is None:
                    continue
                sq = _local(p.grad).to(acc).square().sum()
                if isinstance(p.grad, DTensor) or (is_matrix and self._distributed and self.owner_compute):
                    split += sq
                else:
                    whole += sq
        if self._distributed:
            dist.all_reduce(split, group=self.group)
        norm = float((whole + split).sqrt())
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return norm

    # --- phases 3-5: the step -------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.reduce_gradients()
        pending = [self._step_bank(bank) for bank in self._layout()]
        for finish in pending:  # the all-gathers of replicated banks, overlapped with later banks' NS
            if finish is not None:
                finish()
        for group in self.param_groups:
            if group["algorithm"] == "adamw":
                self._adamw(group)
        self._reduced = False
        return loss

    def _step_bank(self, bank: ow.Bank):
        """Step one bank; returns a function that completes it (waits for its all-gather), or None."""
        group = self.param_groups[bank.group]
        m, n = bank.shape
        # Which matrices this rank computes the update of, and the rows it holds of each.
        if self.sharded:
            mine = list(range(len(bank.params)))
        else:
            mine = bank.owned(self.rank)
        present = [self._present[p] for p in bank.params]
        ns_in = [None] * len(bank.params)
        for i in mine:
            p = bank.params[i]
            if present[i]:
                grad = _local(p.grad) if p.grad is not None else torch.zeros_like(_local(p))
                ns_in[i] = self._momentum(self._state(p), grad.reshape(-1, n), group)
            else:
                ns_in[i] = torch.zeros(_local(p).shape[0], n, dtype=p.dtype, device=_local(p).device)
        # Newton–Schulz on the owners, batched over the bank.
        if self.sharded and self._distributed:
            full = ow.to_owners(bank, ns_in, self.rank, self.world, self.group)
            owned = bank.owned(self.rank)
            ortho = self._orthogonalise(full, [present[i] for i in owned])
            rows = ow.from_owners(bank, ortho, self.rank, self.world, self.group)
        else:
            ortho = self._orthogonalise([ns_in[i] for i in mine], [present[i] for i in mine])
            rows = [None] * len(bank.params)
            for i, o in zip(mine, ortho):
                rows[i] = o
        # The rule's finish on the rows held here; Frobenius norms summed over row shards.
        updates = {i: self._direction(self._state(bank.params[i]), rows[i], group) for i in mine if present[i]}
        sq = torch.stack([torch.stack(updates[i][1]) for i in sorted(updates)]) if updates else None
        if self.sharded and self._distributed and updates:
            dist.all_reduce(sq, group=self.group)
        for k, i in enumerate(sorted(updates)):
            p = bank.params[i]
            self._apply(_local(p).view(-1, n), updates[i][0], sq[k], group, (m, n))
        if not self.sharded and self._distributed and self.owner_compute:
            slab_rows = [bank.params[i].detach().reshape(m, n) for i in bank.owned(self.rank)]
            c = bank.slots(self.world)
            slab = torch.zeros(c, m, n, dtype=bank.params[0].dtype, device=bank.params[0].device)
            for j, w in enumerate(slab_rows):
                slab[j].copy_(w)
            gathered = ow.all_gather_bank(bank, slab, self.world, self.group)

            def finish() -> None:
                for i, w in enumerate(gathered()):
                    if present[i] and bank.owner[i] != self.rank:
                        bank.params[i].copy_(w.view_as(bank.params[i]))

            return finish
        return None

    def _orthogonalise(self, mats: list, present: list) -> list:
        """One batched NS over the matrices that have a gradient; the others stay zero."""
        idx = [k for k, ok in enumerate(present) if ok]
        out = [torch.zeros_like(x) for x in mats]
        if idx:
            X = torch.stack([mats[k] for k in idx])
            O = newton_schulz(X, self.ns_steps, self.ns_coefficients, self.ns_dtype)
            for j, k in enumerate(idx):
                out[k] = O[j]
            m, n = X.shape[-2:]
            self.ns_matrices += len(idx)
            self.ns_flops += len(idx) * ns_flops(m, n, self.ns_steps)
        return out

    # --- AdamW for everything that is not a hidden matrix ---------------------------------------
    def _adamw(self, group: dict) -> None:
        params, grads, avgs, sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._state(p)
            params.append(p)
            grads.append(p.grad)
            avgs.append(state["exp_avg"])
            sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            beta1, beta2 = group["betas"]
            adamw_fn(params, grads, avgs, sqs, [], steps, foreach=False, amsgrad=False,
                                    beta1=beta1, beta2=beta2, lr=group["lr"],
                                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    # --- state ----------------------------------------------------------------------------------
    def _state(self, p) -> dict:
        """This parameter's optimizer state, created on first use (only where it is held)."""
        state = self.state[p]
        if not state:
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            if group["algorithm"] == "adamw":
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            else:
                state.update(self._init_state(p))
        return state

    def _init_state(self, p) -> dict:
        return {"momentum_buffer": torch.zeros_like(p)}

    def held_params(self) -> list:
        """Parameters whose state lives on this rank: AdamW ones and owned (or row-sharded) matrices."""
        self._layout()
        return [p for g in self.param_groups for p in g["params"]
                if g["algorithm"] == "adamw" or self.sharded or not self._distributed or self.owns(p)]

    def dcp_state_dict(self) -> dict:
        """State by parameter name for torch.distributed.checkpoint: each rank lists what it holds
        (an owner's matrices; DTensor shards; replicated AdamW state, de-duplicated by DCP), so the
        checkpoint is sharded and loads onto any number of ranks (the new owners read their keys)."""
        if not self.param_names:
            raise ValueError(f"{type(self).__name__}: set param_names to checkpoint through DCP")
        return {self.param_names[p]: self._state(p) for p in self.held_params()}

    # --- what subclasses define -----------------------------------------------------------------
    def _momentum(self, state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        """Update the momentum from `grad` (rows × n, local) and return the Newton–Schulz input."""
        raise NotImplementedError

    def _direction(self, state: dict, ortho: torch.Tensor, group: dict):
        """From the orthogonalised rows, return (direction, [squared norms the rule needs])."""
        raise NotImplementedError

    def _apply(self, weight: torch.Tensor, direction: torch.Tensor, sq: torch.Tensor, group: dict,
               shape: tuple[int, int]) -> None:
        raise NotImplementedError


def momentum_view(state: dict, key: str, n: int) -> torch.Tensor:
    """A (rows, n) view of a state tensor (DTensor shards included)."""
    return _local(state[key]).view(-1, n)


def sqrt_max_ratio(m: int, n: int) -> float:
    return math.sqrt(max(1.0, m / n))


def row_sharded(placements) -> bool:
    """Rows split over the last mesh dimension, whole on any before it: FSDP2's Shard(0), or HSDP's
    (Replicate(), Shard(0))."""
    *outer, last = placements
    return isinstance(last, Shard) and last.dim == 0 and all(isinstance(pl, Replicate) for pl in outer)


def row_state(p) -> torch.Tensor:
    """A per-row (length m) zero state laid out like `p`'s rows: a DTensor with p's placements
    (Shard(0), or (Replicate(), Shard(0)) under HSDP) for a sharded p."""
    if isinstance(p, DTensor):
        local = torch.zeros(_local(p).shape[0], dtype=p.dtype, device=_local(p).device)
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                  shape=(p.shape[0],), stride=(1,))
    return torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
