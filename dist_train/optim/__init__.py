from dist_train.optim.build import OptimizerSpec, optimizer_spec, param_groups, set_lr
from dist_train.optim.muon import Muon, NorMuon
from dist_train.optim.newton_schulz import newton_schulz
from dist_train.optim.schedule import lr_at

__all__ = ["Muon", "NorMuon", "OptimizerSpec", "lr_at", "newton_schulz", "optimizer_spec", "param_groups", "set_lr"]
