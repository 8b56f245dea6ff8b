"""The run's one device mesh: ("stage", "dp"), built once at start-up and sliced by every user.

- "stage": local-learning stages (size 1 for end-to-end backprop). Ranks [k*dp, (k+1)*dp) hold stage k.
- "dp": the data-parallel replicas of a stage. DDP, FSDP2, DeepSpeed and FairScale replicate or shard
  over this dimension; Muon's owner ranks are chosen along it.
- HSDP (`parallel.dp_replicate` = R > 1): the same dp ranks viewed as ("dp_replicate", "dp_shard"),
  R groups of dp / R neighbouring ranks (with ranks numbered node by node, one shard group per node
  when R is the node count). FSDP2 shards inside a group and replicates across groups, so a block's
  all-gather and reduce-scatter stay on a node's links and only the gradient all-reduce between
  replicas crosses nodes. Like "ep", a view of the dp dimension built with `_unflatten`: every
  other user keeps the flat "dp" and its group, so gradient means, votes and energy are unchanged.
- "ep" (the PDE task's hard-constraint experts): the same ranks viewed as ("stage", "edp", "ep"),
  the dp dimension unflattened into `dp / ep` expert groups of `ep` neighbouring ranks
  (`moe.expert_parallel`; default ep = dp). Each expert group holds all K experts and exchanges
  basis values and solutions only inside itself; "edp" counts the groups, which share nothing but
  the basis network's gradients, still averaged over the whole dp dimension. This is how torchtitan
  forms its expert-parallel dimension: a view of the data-parallel ranks, not extra ranks.

Building it in one place replaces the 1-D mesh and the separate stage x dp mesh that the BP loop and
the pipeline each used to build.
"""

from __future__ import annotations

from typing import Optional

MESH_DIMS = ("stage", "dp")
EXPERT_DIMS = ("stage", "edp", "ep")
HSDP_DIMS = ("dp_replicate", "dp_shard")


def build_mesh(device_type: str, world_size: int, stages: int):
    """The (stage x dp) DeviceMesh over all ranks. Collective: every rank calls it."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (stages, world_size // stages), mesh_dim_names=MESH_DIMS)


def dp_mesh(mesh) -> Optional[object]:
    """This rank's row of data-parallel replicas (the whole world when there is one stage)."""
    return mesh["dp"] if mesh is not None else None


def shard_mesh(mesh, dp_replicate: int = 1) -> Optional[object]:
    """The mesh a sharding backend shards over: this rank's dp row, or under HSDP its 2-D
    ("dp_replicate", "dp_shard") view (FSDP2 takes a 2-D mesh as replicate x shard). Collective when
    `dp_replicate` > 1: every rank calls it (it creates the two dimensions' process groups)."""
    if mesh is None or dp_replicate == 1:
        return dp_mesh(mesh)
    dp = mesh["dp"].size()
    # `_unflatten` keeps the root's rank layout: shard groups are runs of neighbouring dp ranks.
    return mesh._unflatten("dp", (dp_replicate, dp // dp_replicate), HSDP_DIMS)[HSDP_DIMS]


def check_replicate(dp_replicate: int, dp: int) -> None:
    """`parallel.dp_replicate` must split the dp ranks of a stage into equal shard groups."""
    from dist_train.errors import UserError

    if dp % dp_replicate:
        raise UserError(f"parallel.dp_replicate: {dp_replicate} does not divide the {dp} data-parallel ranks "
                        f"of a stage; choose a divisor of {dp} (the ranks are dp_replicate x dp_shard)")


def replica_group(mesh) -> Optional[object]:
    """The process group of this rank's dp row, or None when it is the only replica."""
    return mesh["dp"].get_group() if mesh is not None and mesh["dp"].size() > 1 else None


def expert_degree(expert_parallel: Optional[int], dp: int) -> int:
    """Ranks per expert group: `moe.expert_parallel`, or every data-parallel rank when it is unset."""
    return dp if expert_parallel is None else expert_parallel


def expert_mesh(mesh, expert_parallel: Optional[int]):
    """The run's mesh viewed as ("stage", "edp", "ep"). Collective: every rank calls it (it creates
    the process groups of the two new dimensions)."""
    dp = mesh["dp"].size()
    ep = expert_degree(expert_parallel, dp)
    # `_unflatten` is private but is the API torchtitan builds its expert-parallel view with; it keeps
    # the rank layout of the root mesh, so "ep" groups are runs of neighbouring dp ranks.
    return mesh._unflatten("dp", (dp // ep, ep), EXPERT_DIMS[1:])


def expert_group(mesh, expert_parallel: Optional[int] = None) -> Optional[object]:
    """The process group this rank's expert group exchanges over (its "ep" row), or None when the
    experts all live in this process (no mesh, or ep = 1)."""
    if mesh is None:
        return None
    ep = expert_degree(expert_parallel, mesh["dp"].size())
    if ep == 1:
        return None
    if ep == mesh["dp"].size():  # one group of the whole dp row: its group exists, build no other
        return replica_group(mesh)
    return expert_mesh(mesh, expert_parallel)["ep"].get_group()
