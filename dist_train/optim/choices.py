"""The plain optimizers as `optim.name` choices: AdamW, SGD, and Muon / NorMuon for the hidden
matrices (with AdamW for the rest). Each takes the default gradient transform (global-norm clip)
and owns what differs: its rules and its state in `dist-train plan`. The private optimizers
(dp_sgd, diff2) are transforms of their own in `dist_train.privacy`."""

from __future__ import annotations

import torch

from dist_train.errors import UserError
from dist_train.optim.build import OptimizerSpec, matrix_optimizer_spec, param_groups
from dist_train.optim.transform import GradientTransform
from dist_train.registry import BACKENDS


class AdamW(GradientTransform):
    name = "adamw"

    @classmethod
    def torch_optimizer(cls, cfg, model, mesh, num_outputs) -> OptimizerSpec:
        # foreach: one fused kernel per group on GPU, fewer Python loops on CPU.
        return OptimizerSpec(torch.optim.AdamW, param_groups(model, cfg.weight_decay),
                             {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "foreach": True})


class SGD(GradientTransform):
    name = "sgd"

    @classmethod
    def torch_optimizer(cls, cfg, model, mesh, num_outputs) -> OptimizerSpec:
        return OptimizerSpec(torch.optim.SGD, param_groups(model, cfg.weight_decay),
                             {"lr": cfg.lr, "momentum": cfg.beta1})

    @classmethod
    def state_bytes(cls, cfg, model, num_outputs, backend, dp, adamw_bytes):
        # One momentum buffer (sharded as AdamW's moments are), none without momentum.
        from dist_train.models import count_parameters

        per = adamw_bytes / 2 if cfg.optim.beta1 > 0 else 0.0
        return count_parameters(model) * per, cfg.optim.name + (" (SGD momentum)" if per else " (SGD, no state)")


class Muon(GradientTransform):
    """Muon: momentum orthogonalised by Newton-Schulz on each hidden matrix (owner-computes across ranks)."""

    name = "muon"

    @classmethod
    def check(cls, cfg, world_size: int) -> None:
        super().check(cfg, world_size)
        stages = cfg.parallel.stages
        dp = world_size // stages if world_size % stages == 0 else world_size
        wrapped = dp > 1 or stages == 1  # a pipeline stage with one replica runs unwrapped
        if wrapped and BACKENDS.get(cfg.parallel.backend).flattens_parameters:
            raise UserError(f"optim.name: {cfg.optim.name} orthogonalises whole matrices, but "
                            f"{cfg.parallel.backend} flattens parameters into partitions it steps itself; "
                            "use parallel.backend ddp or fsdp")

    @classmethod
    def torch_optimizer(cls, cfg, model, mesh, num_outputs) -> OptimizerSpec:
        from dist_train.optim.muon import Muon as MuonOptimizer

        m = cfg.matrix
        return matrix_optimizer_spec(cfg, model, mesh, num_outputs, MuonOptimizer, {
            "momentum": m.momentum, "nesterov": True if m.nesterov is None else m.nesterov,
            "lr_scale": m.lr_scale, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps})

    @classmethod
    def state_bytes(cls, cfg, model, num_outputs, backend, dp, adamw_bytes):
        """One fp32 momentum per matrix element (NorMuon: plus one value per row); owner-computes
        keeps a matrix's state on its owner only, so under DDP as well as FSDP2 it is divided over
        the dp ranks (under HSDP over a shard group's). AdamW's moments for the rest."""
        return matrix_state_bytes(cfg, cfg.optim.name, model, num_outputs, backend, dp, adamw_bytes)


class NorMuon(Muon):
    """NorMuon: Muon's orthogonalised update normalised per row by a second-moment estimate."""

    name = "normuon"

    @classmethod
    def torch_optimizer(cls, cfg, model, mesh, num_outputs) -> OptimizerSpec:
        from dist_train.optim.muon import NorMuon as NorMuonOptimizer

        m = cfg.matrix
        return matrix_optimizer_spec(cfg, model, mesh, num_outputs, NorMuonOptimizer, {
            "betas": (m.momentum, m.beta2), "eps": cfg.eps, "variant": m.variant, "nesterov": m.nesterov,
            "adamw_betas": (cfg.beta1, cfg.beta2), "adamw_eps": cfg.eps})


def matrix_state_bytes(cfg, name: str, model, num_outputs: int, backend, dp: int,
                       adamw_bytes: float) -> tuple[float, str]:
    """Muon's or NorMuon's (`name`) state bytes per rank and words (DP-SGD over them reuses it)."""
    from dist_train.optim.routing import route_parameters

    routes = route_parameters(model, num_outputs, cfg.optim.matrix.matrix_params, cfg.optim.matrix.adamw_params)
    n_matrix = sum(p.numel() for _, p in routes.matrix)
    rows = sum(p.shape[0] for _, p in routes.matrix) if name == "normuon" else 0
    n_other = sum(p.numel() for _, p in routes.adamw_decay + routes.adamw_no_decay)
    # Under HSDP the owners are the ranks of one shard group (each replica group holds a copy).
    replicas = cfg.parallel.dp_replicate if dp % cfg.parallel.dp_replicate == 0 else 1
    owners = dp // replicas if (backend.owner_computes and cfg.optim.matrix.owner_compute) else 1
    total = (n_matrix + rows) * 4.0 / owners + n_other * adamw_bytes
    where = "on this rank" if owners == 1 else "by one owner rank each" + (
        f" of a shard group ({replicas} replica groups)" if replicas > 1 else "")
    text = (f"{name} ({len(routes.matrix)} hidden matrices, {n_matrix / 1e6:.2f} M parameters, "
            f"orthogonalised {where}; AdamW for {n_other / 1e6:.2f} M)")
    return total, text
