"""Data sets (no downloads) and the step-indexed sampler that makes data order resumable."""

from __future__ import annotations

from dist_train.config.schema import DataSection
from dist_train.data.base import SPLITS, VAL_SEED, DataInfo, Dataset, Split
from dist_train.data.sampler import StepSampler, derive_seed, rank_slice
from dist_train.data.stdlib_bytes import build_stdlib_bytes, load_stdlib_bytes
from dist_train.data.token_bin import build_token_bin, open_token_bin, write_token_bin
from dist_train.data.tokens import TokenDataset
from dist_train.errors import UserError

__all__ = [
    "DataInfo", "Dataset", "Split", "SPLITS", "VAL_SEED", "StepSampler", "rank_slice", "derive_seed",
    "TokenDataset", "build_dataset", "build_stdlib_bytes", "load_stdlib_bytes", "build_token_bin",
    "open_token_bin", "write_token_bin",
]

# PDE data sets: data.name -> (PDEGrid.equation, default t_end, default nu, rho)
PDE_DEFAULTS = {"reaction_diffusion": ("fisher_kpp", 1.0, 0.005, None), "diffusion_sorption": ("diffusion_sorption", 500.0, 5e-4, 0.0)}


def build_dataset(cfg_data: DataSection, block_size: int) -> Dataset:
    """The data set named in the config. `block_size` (model.block_size) sizes LM windows."""
    test = cfg_data.test_fraction
    if cfg_data.name == "stdlib_bytes":
        return build_stdlib_bytes(cfg_data.max_bytes, cfg_data.val_fraction, block_size, test_fraction=test or 0.0)
    if cfg_data.name == "token_bin":
        if not cfg_data.path:
            raise UserError("data.path: required when data.name is token_bin")
        if test:
            raise UserError("data.test_fraction: token_bin has no test split (hold one out in its own .bin file)")
        return build_token_bin(cfg_data.path, cfg_data.val_path, cfg_data.vocab_size,
                               cfg_data.val_fraction, block_size)
    if cfg_data.name == "digits":
        from dist_train.data.digits import DigitsDataset  # lazy: keeps sklearn out of LM runs

        return DigitsDataset(cfg_data.val_fraction, test or 0.0)
    if cfg_data.name == "shapes32":
        from dist_train.data.shapes32 import Shapes32Dataset

        return Shapes32Dataset(cfg_data.num_examples or 7000, cfg_data.seed, cfg_data.val_fraction,
                               0.1 if test is None else test)
    if cfg_data.name in PDE_DEFAULTS:
        from dist_train.data.pde import PDEDataset, PDEGrid

        equation, t_end, nu, rho = PDE_DEFAULTS[cfg_data.name]
        try:
            grid = PDEGrid(nx=cfg_data.nx, nt=cfg_data.nt, t_end=cfg_data.t_end if cfg_data.t_end is not None else t_end,
                           nu=cfg_data.nu if cfg_data.nu is not None else nu,
                           rho=cfg_data.rho if cfg_data.name == "reaction_diffusion" else rho, equation=equation)
        except ValueError as err:  # a coefficient the scheme cannot take: one line, exit 2
            raise UserError(f"data: {err}") from None
        return PDEDataset(grid, cfg_data.num_examples or 512, cfg_data.seed, cfg_data.val_fraction, test or 0.0)
    raise UserError(f"data.name: unknown data set {cfg_data.name!r}")
