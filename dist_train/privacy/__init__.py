"""Differential privacy: accounting (Opacus RDP / PRV), Poisson sampling across ranks, per-example
clipping by book-keeping (per-layer rules; `register_rule` adds one for a layer type of your own),
DP-SGD as a gradient transform (`dist_train.privacy.dp_sgd`), and DIFF2 over data-parallel workers
(`dist_train.privacy.diff2`)."""

from dist_train.privacy.accounting import PrivacyLedger, calibrate_noise, compute_epsilon
from dist_train.privacy.bookkeeping import BookKeeper, per_sample_grad_norms
from dist_train.privacy.diff2 import Diff2, calibrated_sigmas, closed_form_sigmas, diff2_epsilon
from dist_train.privacy.layers import LayerRule, register_rule
from dist_train.privacy.sampling import PoissonSampler, physical_batches

__all__ = [
    "compute_epsilon",
    "calibrate_noise",
    "PrivacyLedger",
    "PoissonSampler",
    "physical_batches",
    "per_sample_grad_norms",
    "LayerRule",
    "register_rule",
    "BookKeeper",
    "Diff2",
    "closed_form_sigmas",
    "calibrated_sigmas",
    "diff2_epsilon",
]
