from dist_train.runtime.dist import DistContext, init_distributed
from dist_train.runtime.env import WorldInfo, discover, expand_nodelist

__all__ = ["DistContext", "WorldInfo", "discover", "expand_nodelist", "init_distributed"]
