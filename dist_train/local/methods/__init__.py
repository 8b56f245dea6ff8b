"""The local-learning methods, by config name (`local.method`).

Each is a `LocalMethod` (see `dist_train.local.method`) that builds the StageModule of each stage
(`dist_train.local.stage`): most as blocks + auxiliary head + local loss; Forward-Forward, MAN and
NoProp with stage modules of their own. A method owns its options (`local.<name>.*`), its rules and
its plan words. A new method is one file plus one line in `dist_train.registry.LOCAL_METHODS` (or,
outside the package, `LOCAL_METHODS.register(name, cls)` in a module the config lists as a plugin).
"""

from __future__ import annotations

from typing import Optional

from dist_train.local.method import LocalMethod
from dist_train.registry import LOCAL_METHODS

# The registry under the name this package has always exported it by.
METHODS = LOCAL_METHODS


def get_method(name: str, options: Optional[dict] = None) -> LocalMethod:
    """A fresh instance of the method called `name`, with its `local.<name>.*` options (else defaults)."""
    return LOCAL_METHODS.get(name)(**(options or {}))


__all__ = ["LOCAL_METHODS", "METHODS", "get_method"]
