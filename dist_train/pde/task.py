"""Solving a PDE family (reaction_diffusion or diffusion_sorption data) with a basis network and hard-constraint experts."""

from __future__ import annotations

from dist_train.errors import UserError
from dist_train.tasks.base import Task


class PDESolving(Task):
    name = "pde"
    exportable = False  # its model also needs the grid and the moe section
    meta_buildable = False  # the experts draw their constraint points when built

    def build_model(self, cfg_model, info, moe=None, group=None, replicas=None):
        """`moe`: the config's moe section (defaults when None); `group`: the process group the experts
        are spread over, this rank's expert group (None: every expert in this process); `replicas`:
        every data-parallel rank, over which the solver figures are maximised (default: `group`)."""
        from dist_train.config.schema import MoESection
        from dist_train.pde.basis import BasisSpec
        from dist_train.pde.constraint import LMOptions
        from dist_train.pde.model import PDEModel
        from dist_train.registry import MODELS

        spec = MODELS.get(cfg_model.name)
        if not issubclass(spec, BasisSpec) or info.grid is None:
            bases = [n for n in MODELS if issubclass(MODELS.get(n), BasisSpec)]
            raise UserError(f"model.name: {cfg_model.name} cannot solve a PDE data set (use {' or '.join(bases)})")
        moe = moe or MoESection()
        options = LMOptions(max_iter=moe.lm_max_iter, tol=moe.lm_tol, ridge=moe.ridge, ftol=moe.lm_ftol,
                            hessian=moe.lm_hessian)
        return PDEModel(info.grid, spec.build_basis(cfg_model.options(), info.grid, moe.basis), moe.basis, moe.constraint,
                        experts=moe.experts, points=moe.points, time_splits=moe.time_splits, loss=moe.loss,
                        options=options, group=group, replicas=replicas, overlap=moe.overlap)

    def build_for_run(self, cfg, info, mesh):
        from dist_train.runtime.mesh import expert_group, replica_group

        return self.build_model(cfg.model, info, cfg.moe, expert_group(mesh, cfg.moe.expert_parallel),
                                replica_group(mesh))

    def check(self, cfg, world_size: int) -> None:
        """The PDE task trains end to end over ddp (or one process); its experts exchange inside forward."""
        ep = cfg.moe.expert_parallel
        if ep is not None and world_size % ep != 0:
            raise UserError(f"moe.expert_parallel: expert groups of {ep} ranks do not divide the {world_size} "
                            "data-parallel ranks")
        if cfg.parallel.stages != 1:
            raise UserError("parallel.stages: the PDE task trains end to end (its experts split the domain, not the model)")
        if cfg.parallel.backend not in ("ddp", "none"):
            raise UserError(f"parallel.backend: the PDE task runs under ddp or none, not {cfg.parallel.backend}")
        if cfg.optim.name in ("dp_sgd", "diff2"):
            raise UserError(f"optim.name: {cfg.optim.name} is not offered for the PDE task")
        if cfg.parallel.mixed_precision != "fp32":
            raise UserError("parallel.mixed_precision: the PDE task's basis values feed a float64 solver; use fp32")

    def num_outputs(self, info) -> int:
        return 0  # no vocabulary or class head (Muon users route basis.head with optim.matrix.adamw_params)

    def example_input(self, cfg, info, batch, device="meta"):
        return None  # the constraint solve cannot run on the meta device: plan gives no activation estimate

    def eval_sums(self, outputs, targets, model):
        from dist_train.pde.physics import grid_residual, relative_l2

        u, ref = outputs.float(), targets.float()
        sums = {"rel_l2": float(relative_l2(u, ref)),
                "residual": float(grid_residual(outputs.double(), model.grid).abs().mean())}
        subs = model.experts.subs if model.constraint == "hard" else []
        if len(subs) > 1:
            # Where the error is: expert k's share, ‖u − u_ref‖ on its own block / ‖u_ref‖ on the whole
            # grid, per sample (the shares' squares add up to rel_l2's square), averaged over the batch.
            # Relative to the whole grid, not the block: a block near u = 0 would divide by ~0.
            whole = ref.flatten(1).norm(dim=1).clamp_min(1e-12)
            for s in subs:
                diff = (u - ref)[:, s.t0:s.t1, s.x0:s.x1].flatten(1).norm(dim=1)
                sums[f"rel_l2_expert{s.index}"] = float((diff / whole).mean())
        return sums

    def plan_rows(self, cfg, model, dp):
        from dist_train.pde.domain import owner_of
        from dist_train.runtime.mesh import expert_degree

        moe, grid = cfg.moe, model.grid
        if moe.constraint == "soft":
            return [("moe", f"soft constraint: u = b.w with w learned, {moe.basis} basis functions, "
                            f"grid {grid.nt} x {grid.nx}; physics only in the loss")]
        subs, ep = model.experts.subs, expert_degree(moe.expert_parallel, dp)
        if moe.experts == 1 or ep == 1:
            where = "every rank solves its own samples" if moe.experts == 1 else "all in each rank's process"
        else:
            groups = f"{dp // ep} expert groups of {ep} ranks, by rank in its group: " if ep < dp else ""
            where = groups + "; ".join(
                f"rank {r}: experts {[k for k in range(len(subs)) if owner_of(k, ep) == r]}"
                for r in range(min(ep, len(subs))))
        blocks = ", ".join(f"{s.t1 - s.t0}x{s.x1 - s.x0}" for s in subs)
        if moe.overlap and len(subs) > 1:
            blocks += (f" (each constrained {moe.overlap} columns wider on either side, within the grid: "
                       + ", ".join(f"{s.t1 - s.t0}x{s.cx1 - s.cx0}" for s in subs) + ")")
        return [("moe", f"hard constraint, {moe.experts} expert(s) ({where}); blocks {blocks} of the "
                        f"{grid.nt} x {grid.nx} grid; m = {moe.points} residual points "
                        f"(~{moe.points // moe.experts} per expert); N = {moe.basis}; LM in float64, IFT backward")]

    def train_metrics(self, model):
        return model.solver_stats()
