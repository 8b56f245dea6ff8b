"""Who orthogonalises which matrix, and the collectives that move matrices to their owner and back.

Every matrix gets exactly one owner rank. Same-shape matrices form a *bank* (one batched
Newton–Schulz call per bank on each owner). Owners are balanced by NS cost ∝ max(m,n)·min(m,n)²:
banks are placed largest first, each spreading its matrices evenly and giving the remainder to the
least-loaded ranks.

Two ways parameters can sit on the ranks, two exchanges:
- replicated (DDP, or one process): the gradients are still local. `reduce_scatter_bank` sums them
  straight to the owners (whole matrices; slots padded to the same count per rank with zeros), and
  `all_gather_bank` returns the owners' new weights. Reduce-scatter + all-gather move the same bytes
  as the all-reduce DDP would have run: orthogonalisation adds no communication.
- row-sharded (FSDP2 `Shard(0)`): `to_owners` is one all-to-all that brings every rank's rows of
  matrix i to its owner, `from_owners` the all-to-all that returns the orthogonalised rows. Shards
  may be uneven or empty: the split sizes say so, and every rank enters every collective. Under
  HSDP ((Replicate(), Shard(0))) `group`/`world`/`rank` are those of the shard group: owners are
  assigned within it, the same way in every replica group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor-in/tensor-out collectives; older releases only have the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Bank:
    """Matrices of one param group with the same (m, n) view shape and dtype."""
    group: int
    shape: tuple[int, int]  # the matrix view: conv kernels flattened to out × in·kh·kw
    params: list = field(default_factory=list)  # torch.nn.Parameter, in group order
    owner: list = field(default_factory=list)   # owner rank of params[i]

    @property
    def cost(self) -> int:
        m, n = self.shape
        return max(m, n) * min(m, n) ** 2

    def owned(self, rank: int) -> list[int]:
        return [i for i, r in enumerate(self.owner) if r == rank]

    def slots(self, world: int) -> int:
        """Matrices per rank in a reduce-scatter / all-gather (the most any rank owns)."""
        return max(1, max(self.owner.count(r) for r in range(world)))


def matrix_view_shape(shape) -> tuple[int, int]:
    """(m, n) of the matrix a parameter is orthogonalised as: conv kernels become out × in·kh·kw."""
    return int(shape[0]), int(math.prod(shape[1:]))


def assign_owners(banks: list[Bank], world: int) -> list[int]:
    """Fill every bank's `owner` list; returns each rank's total NS cost."""
    load = [0] * world
    for bank in sorted(banks, key=lambda b: -b.cost * len(b.params)):
        k = len(bank.params)
        counts = [k // world] * world
        # The remainder goes to the least-loaded ranks (ties to the lower rank): balance across banks.
        for r in sorted(range(world), key=lambda r: (load[r], r))[: k % world]:
            counts[r] += 1
        bank.owner = [r for r in range(world) for _ in range(counts[r])]
        for r in range(world):
            load[r] += counts[r] * bank.cost
    return load


def row_counts(m: int, world: int) -> list[int]:
    """Rows of an m-row tensor on each rank under `Shard(0)` (torch.chunk sizes; trailing ranks may get 0)."""
    size = -(-m // world)
    return [max(0, min(size, m - r * size)) for r in range(world)]


# --- replicated parameters ------------------------------------------------------------------------
def reduce_scatter_bank(bank: Bank, grads: list, world: int, group) -> torch.Tensor:
    """Sum `grads` (one per matrix, None = zero) over ranks into their owners: returns this rank's
    [slots, m, n] slab, slot j = the j-th matrix it owns (padding slots are zero)."""
    m, n = bank.shape
    c = bank.slots(world)
    ref = bank.params[0]
    buf = torch.zeros(world, c, m, n, dtype=ref.dtype, device=ref.device)
    for r in range(world):
        for j, i in enumerate(bank.owned(r)):
            if grads[i] is not None:
                buf[r, j].copy_(grads[i].reshape(m, n))
    out = torch.empty(c, m, n, dtype=ref.dtype, device=ref.device)
    _reduce_scatter(out, buf.view(world * c, m, n), group=group)
    return out


def all_gather_bank(bank: Bank, mine: torch.Tensor, world: int, group):
    """Start gathering every owner's [slots, m, n] slab; returns a function that waits for it and
    gives one (m, n) tensor per matrix of the bank. Asynchronous so that the next bank's
    Newton–Schulz runs while this bank's weights travel."""
    c, m, n = mine.shape
    out = torch.empty(world * c, m, n, dtype=mine.dtype, device=mine.device)
    work = _all_gather(out, mine.contiguous(), group=group, async_op=True)

    def wait() -> list:
        work.wait()
        slabs = out.view(world, c, m, n)
        result = [None] * len(bank.params)
        for r in range(world):
            for j, i in enumerate(bank.owned(r)):
                result[i] = slabs[r, j]
        return result

    return wait


# --- row-sharded parameters -----------------------------------------------------------------------
def to_owners(bank: Bank, local_rows: list, rank: int, world: int, group) -> list:
    """All-to-all: each rank sends its rows of every matrix to that matrix's owner. `local_rows[i]`
    is this rank's (rows_i, n) piece of matrix i. Returns the full (m, n) matrices this rank owns."""
    m, n = bank.shape
    rows = row_counts(m, world)
    owned_by = [bank.owned(r) for r in range(world)]
    ref = bank.params[0]
    send = [local_rows[i].reshape(-1) for d in range(world) for i in owned_by[d]]
    send_sizes = [sum(rows[rank] * n for _ in owned_by[d]) for d in range(world)]
    recv_sizes = [rows[s] * n * len(owned_by[rank]) for s in range(world)]
    send_buf = torch.cat(send) if send else torch.empty(0, dtype=ref.dtype, device=ref.device)
    recv = torch.empty(sum(recv_sizes), dtype=ref.dtype, device=ref.device)
    dist.all_to_all_single(recv, send_buf.contiguous(), recv_sizes, send_sizes, group=group)
    # recv is ordered by source rank, then by owned matrix: regroup into whole matrices.
    pieces = recv.split(recv_sizes)
    full = []
    for j in range(len(owned_by[rank])):
        parts = [pieces[s].view(-1, rows[s], n)[j] if rows[s] else pieces[s].new_empty(0, n)
                 for s in range(world)]
        full.append(torch.cat(parts))
    return full


def from_owners(bank: Bank, full: list, rank: int, world: int, group) -> list:
    """The reverse all-to-all: owners return rows of their (m, n) results; returns this rank's
    (rows, n) piece of every matrix of the bank."""
    m, n = bank.shape
    rows = row_counts(m, world)
    starts = [sum(rows[:r]) for r in range(world)]
    owned_by = [bank.owned(r) for r in range(world)]
    ref = bank.params[0]
    send = [full[j][starts[d]: starts[d] + rows[d]].reshape(-1) for d in range(world)
            for j in range(len(owned_by[rank]))]
    send_sizes = [rows[d] * n * len(owned_by[rank]) for d in range(world)]
    recv_sizes = [rows[rank] * n * len(owned_by[s]) for s in range(world)]
    send_buf = torch.cat(send) if send else torch.empty(0, dtype=ref.dtype, device=ref.device)
    recv = torch.empty(sum(recv_sizes), dtype=ref.dtype, device=ref.device)
    dist.all_to_all_single(recv, send_buf.contiguous(), recv_sizes, send_sizes, group=group)
    pieces = recv.split(recv_sizes)
    result = [None] * len(bank.params)
    for s in range(world):
        block = pieces[s].view(len(owned_by[s]), rows[rank], n)
        for j, i in enumerate(owned_by[s]):
            result[i] = block[j]
    return result
