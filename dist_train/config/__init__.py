from dist_train.config.load import load_config, parse_overrides
from dist_train.config.schema import Config

__all__ = ["Config", "load_config", "parse_overrides"]
