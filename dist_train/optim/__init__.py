from dist_train.optim.build import OptimizerSpec, optimizer_spec, param_groups
from dist_train.optim.schedule import lr_at

__all__ = ["OptimizerSpec", "lr_at", "optimizer_spec", "param_groups"]
