"""The run's one device mesh: ("stage", "dp"), built once at start-up and sliced by every user.

- "stage": local-learning stages (size 1 for end-to-end backprop). Ranks [k*dp, (k+1)*dp) hold stage k.
- "dp": the data-parallel replicas of a stage. DDP, FSDP2, DeepSpeed and FairScale replicate or shard
  over this dimension; Muon's owner ranks are chosen along it.
- experts: the hard-constraint experts of the PDE task are placed over the "dp" ranks (expert
  parallelism borrowing the data-parallel dimension, as torchtitan forms its EP group from dp):
  every rank feeds its samples' basis values to the experts' owners and gets their solutions back.

Building it in one place replaces the 1-D mesh and the separate stage x dp mesh that the BP loop and
the pipeline each used to build.
"""

from __future__ import annotations

from typing import Optional

MESH_DIMS = ("stage", "dp")


def build_mesh(device_type: str, world_size: int, stages: int):
    """The (stage x dp) DeviceMesh over all ranks. Collective: every rank calls it."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (stages, world_size // stages), mesh_dim_names=MESH_DIMS)


def dp_mesh(mesh) -> Optional[object]:
    """This rank's row of data-parallel replicas (the whole world when there is one stage)."""
    return mesh["dp"] if mesh is not None else None


def expert_group(mesh) -> Optional[object]:
    """The process group the experts are spread over (the dp row), or None in a single process."""
    return mesh["dp"].get_group() if mesh is not None and mesh["dp"].size() > 1 else None
