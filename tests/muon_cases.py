"""Workers for test_muon_distributed.py: the same optimizer steps on W real gloo ranks (fp64).

Every rank builds the same parameters. Rank r's local gradient at step t is G_t + (r − (W−1)/2)·N_t,
so the mean over ranks is G_t whatever W is; the single-process reference steps on that mean.
Two layouts:
- replicated (DDP's): matrix gradients stay local (the optimizer reduce-scatters them itself); the
  AdamW parameters get the averaged gradient, as DDP's all-reduce would give them.
- sharded (FSDP2's): every parameter is a Shard(0) DTensor and gets the averaged gradient as a
  DTensor, as FSDP2's reduce-scatter would.
- hsdp (FSDP2 on a 2 x W/2 replicate x shard mesh, W >= 4): every parameter is a (Replicate(),
  Shard(0)) DTensor with the averaged gradient, as FSDP2's reduce-scatter + all-reduce would give;
  its checkpoint is also loaded under FSDP (W ranks) and in one process, and training continues.
Shapes are chosen so that shards are uneven and empty at W = 4 (5 and 3 rows), one bank holds 3
matrices (not divisible by 2 or 4), a conv kernel is flattened, one matrix has no gradient on any
rank at step 2 (skipped) and one has none on rank 0 only at step 3 (zero there).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

SHAPES = {  # name -> shape; the first five are hidden matrices, the rest AdamW
    "h0": (6, 4), "h1": (6, 4), "h2": (6, 4), "tall": (5, 3), "wide": (3, 7), "conv": (4, 2, 3, 3),
    "emb": (10, 4), "bias": (5,),
}
MATRICES = ["h0", "h1", "h2", "tall", "wide", "conv"]
STEPS = 4
SAVE_AFTER = 2
MAX_NORM = 2.0  # small enough that clipping acts (the gradient norms are ~5-10)


def initial(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)) + 7)
    return torch.randn(SHAPES[name], generator=g, dtype=torch.float64)


def local_grad(name: str, step: int, rank: int, world: int):
    """Rank `rank`'s gradient of `name` at `step` (None = missing)."""
    if name == "h1" and step == 2:
        return None  # missing on every rank: the parameter is skipped this step
    if name == "wide" and step == 3 and rank == 0:
        return None  # missing on one rank: zero there
    seed = 1000 * step + sum(map(ord, name))
    base = torch.randn(SHAPES[name], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    noise = torch.randn(SHAPES[name], generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return base * 3 + (rank - (world - 1) / 2) * noise


def mean_grad(name: str, step: int, world: int):
    grads = [local_grad(name, step, r, world) for r in range(world)]
    if all(g is None for g in grads):
        return None
    return sum(g if g is not None else torch.zeros(SHAPES[name], dtype=torch.float64) for g in grads) / world


def make_optimizer(kind: str, params: dict, **kw):
    from dist_train.optim import Muon, NorMuon

    groups = [{"params": [params[n] for n in MATRICES]},
              {"params": [params["emb"], params["bias"]], "algorithm": "adamw", "lr": 0.01,
               "weight_decay": 0.0}]
    if kind == "muon":
        opt = Muon(groups, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, **kw)
    elif kind == "muon_adamw_scale":
        opt = Muon(groups, lr=0.01, momentum=0.9, nesterov=False, lr_scale="match_rms_adamw", **kw)
    elif kind == "normuon":
        opt = NorMuon(groups, lr=0.01, weight_decay=0.1, **kw)
    elif kind == "normuon_reference":
        opt = NorMuon(groups, lr=0.01, variant="reference", ns_coefficients="polar_express", **kw)
    else:
        raise ValueError(kind)
    opt.param_names = {p: n for n, p in params.items()}
    return opt


def set_grads(params: dict, step: int, rank: int, world: int, layout: str, mesh) -> None:
    """Without a process group this is the single-process reference: every gradient is the mean over
    `world` simulated ranks."""
    from torch.distributed.tensor import Shard, distribute_tensor

    for name, p in params.items():
        if mesh is None:
            p.grad = mean_grad(name, step, world)
        elif layout in SHARDED:
            g = mean_grad(name, step, world)
            p.grad = None if g is None else distribute_tensor(g, mesh, SHARDED[layout])
        elif name in MATRICES:
            p.grad = local_grad(name, step, rank, world)
        else:
            p.grad = mean_grad(name, step, world)


def snapshot(params: dict, opt) -> dict:
    """The global view after a step: full weights and every state tensor, gathered to every rank."""
    from torch.distributed.tensor import DTensor

    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t
    weights = {n: full(p.detach()).clone() for n, p in params.items()}
    held = {n: {k: full(v).clone() for k, v in st.items()} for n, st in opt.dcp_state_dict().items()}
    if dist.is_initialized():
        pieces = [None] * dist.get_world_size()
        dist.all_gather_object(pieces, held)
    else:
        pieces = [held]
    states = {}
    for piece in pieces:
        for n, st in piece.items():
            # A state held on several ranks (replicated AdamW) must be the same on all of them.
            if n in states:
                for k in st:
                    assert torch.equal(states[n][k], st[k]), f"{n}.{k} differs between ranks"
            states[n] = st
    return {"weights": weights, "states": states, "ns_matrices": opt.ns_matrices}


def run(kind: str, layout: str, rank: int, world: int, ckpt_dir=None, resume_from=None) -> list[dict]:
    """STEPS optimizer steps; with `ckpt_dir`, save after SAVE_AFTER steps and continue on a fresh
    optimizer loaded from that checkpoint. With `resume_from` (a checkpoint path, of any layout):
    load it, then run the steps after SAVE_AFTER. Returns a snapshot per step run (with the NS count
    summed over the ranks). Without a process group: the single-process reference for `world` ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import distribute_tensor

    mesh = make_mesh(layout, world) if dist.is_initialized() else None
    # What the trainer hands the optimizer: the flat dp group (a sharded layout takes its own from the mesh).
    group = (dist.group.WORLD if mesh.ndim > 1 else mesh.get_group()) if mesh is not None else None

    def build():
        params = {}
        for n in SHAPES:
            t = initial(n)
            if layout in SHARDED:
                t = distribute_tensor(t, mesh, SHARDED[layout])
            params[n] = torch.nn.Parameter(t)
        return params, make_optimizer(kind, params, process_group=group)

    params, opt = build()
    first = 1
    if resume_from is not None:
        dcp.load({"params": params, "optim": opt.dcp_state_dict()}, checkpoint_id=str(resume_from))
        first = SAVE_AFTER + 1
    out = []
    for step in range(first, STEPS + 1):
        set_grads(params, step, rank, world, layout, mesh)
        norm = opt.clip_grad_norm(MAX_NORM)
        before = opt.ns_matrices
        opt.step()
        opt.zero_grad(set_to_none=True)
        snap = snapshot(params, opt)
        count = torch.tensor([opt.ns_matrices - before])
        if dist.is_initialized():
            dist.all_reduce(count)
        snap["ns_this_step"] = int(count)
        snap["grad_norm"] = norm
        snap["with_grad"] = sum(mean_grad(n, step, world) is not None for n in MATRICES)
        out.append(snap)
        if ckpt_dir is not None and step == SAVE_AFTER:
            path = str(Path(ckpt_dir) / f"{kind}-{layout}")
            dcp.save({"params": params, "optim": opt.dcp_state_dict()}, checkpoint_id=path)
            params, opt = build()  # forget everything, then load
            state = {"params": params, "optim": opt.dcp_state_dict()}
            dcp.load(state, checkpoint_id=path)
    return out


KINDS = ("muon", "muon_adamw_scale", "normuon", "normuon_reference")
REPLICAS = 2  # the hsdp layout's replica groups


def cases(world: int) -> list[tuple[str, str]]:
    layouts = ("replicated", "sharded", "hsdp") if world >= 2 * REPLICAS else ("replicated", "sharded")
    return [(k, lay) for k in KINDS for lay in layouts]


def make_mesh(layout: str, world: int):
    from torch.distributed.device_mesh import init_device_mesh

    if layout == "hsdp":
        return init_device_mesh("cpu", (REPLICAS, world // REPLICAS), mesh_dim_names=("dp_replicate", "dp_shard"))
    return init_device_mesh("cpu", (world,))


def _placements() -> dict:
    from torch.distributed.tensor import Replicate, Shard

    return {"sharded": [Shard(0)], "hsdp": [Replicate(), Shard(0)]}


SHARDED = _placements()


def worker(rank: int, world: int, out_dir: str) -> None:
    dist.init_process_group("gloo")  # env:// variables and one thread from run_on_ranks
    results = {f"{k}/{lay}": run(k, lay, rank, world, ckpt_dir=out_dir) for k, lay in cases(world)}
    for k in KINDS if world >= 2 * REPLICAS else ():  # the HSDP checkpoint, loaded under FSDP
        results[f"{k}/hsdp->sharded"] = run(k, "sharded", rank, world, resume_from=Path(out_dir) / f"{k}-hsdp")
    if rank == 0:
        torch.save(results, Path(out_dir) / "results.pt")
    dist.barrier()  # leave together; run_on_ranks tears the group down and skips finalization
