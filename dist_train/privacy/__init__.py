"""Differential privacy: accounting (Opacus RDP / PRV), Poisson sampling across ranks."""

from dist_train.privacy.accounting import PrivacyLedger, calibrate_noise, compute_epsilon
from dist_train.privacy.sampling import PoissonSampler, physical_batches

__all__ = [
    "compute_epsilon",
    "calibrate_noise",
    "PrivacyLedger",
    "PoissonSampler",
    "physical_batches",
]
