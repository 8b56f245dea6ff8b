"""The local-learning methods, by config name (`local.method`).

Each is a `LocalMethod` (see `dist_train.local.method`) that builds the StageModule of each stage
(`dist_train.local.stage`): most as blocks + auxiliary head + local loss; Forward-Forward, MAN and
NoProp with stage modules of their own. A new method is one file plus one line here.
"""

from __future__ import annotations

from typing import Optional

from dist_train.errors import UserError
from dist_train.local.method import LocalMethod
from dist_train.local.methods.auglocal import AugLocal
from dist_train.local.methods.dgl import DGL
from dist_train.local.methods.forward_forward import ForwardForward
from dist_train.local.methods.infopro import InfoPro
from dist_train.local.methods.man import MAN
from dist_train.local.methods.mono_forward import MonoForward
from dist_train.local.methods.noprop import NoProp
from dist_train.local.methods.tpsgd import TpSGD

METHODS: dict[str, type[LocalMethod]] = {
    "dgl": DGL,
    "mono_forward": MonoForward,
    "infopro": InfoPro,
    "auglocal": AugLocal,
    "forward_forward": ForwardForward,
    "tpsgd": TpSGD,
    "man": MAN,
    "noprop": NoProp,
}


def get_method(name: str, options: Optional[dict] = None) -> LocalMethod:
    """A fresh instance of the method called `name`, with its `local.<name>.*` options (else defaults)."""
    cls = METHODS.get(name)
    if cls is None:
        raise UserError(f"local.method: {name} is not a known method (choose one of: {', '.join(METHODS)})")
    return cls(**(options or {}))


__all__ = ["METHODS", "get_method", "AugLocal", "DGL", "ForwardForward", "InfoPro", "MAN", "MonoForward",
           "NoProp", "TpSGD"]
