"""Privacy accounting against fixed reference figures of the RDP accountant (Balle et al. 2020
conversion, Opacus's default orders) and the PRV accountant, and against Opacus fed directly."""

import math

import pytest
import torch

from dist_train.errors import UserError
from dist_train.privacy import PrivacyLedger, calibrate_noise, compute_epsilon
from dist_train.privacy.accounting import PRV_EPS_ERROR

DELTA = 1e-5


# ---------------------------------------------------------------- reference figures

def test_rdp_reference_figures():
    assert compute_epsilon(1.5, 0.04, 2250, DELTA) == pytest.approx(7.32911117143, rel=1e-6)
    assert compute_epsilon(1.1, 256 / 60000, 14062, DELTA, "rdp") == pytest.approx(2.5965558690, rel=1e-6)


def test_prv_reference_figure():
    # Opacus returns the upper end of an interval of half-width ~eps_error around its estimate.
    eps = compute_epsilon(1.5, 0.04, 2249, DELTA, accountant="prv")
    assert eps == pytest.approx(6.777395712150674, abs=PRV_EPS_ERROR)
    assert eps < compute_epsilon(1.5, 0.04, 2249, DELTA, "rdp")  # PRV is the tighter bound


def test_calibration_reference_figures_and_safe_side():
    for steps, expected, tol in [(int(90 / 0.04), 1.416, 2e-3), (2000, 1.3562, 1e-3)]:
        sigma = calibrate_noise(8.0, DELTA, 0.04, steps)
        assert sigma == pytest.approx(expected, abs=tol)
        assert compute_epsilon(sigma, 0.04, steps, DELTA) <= 8.0          # safe
        assert compute_epsilon(sigma * 0.99, 0.04, steps, DELTA) > 8.0   # and tight
        assert compute_epsilon(sigma * (1 - 1e-3), 0.04, steps, DELTA) > 8.0  # precision <= 1e-3


def test_prv_calibration_safe_and_below_rdp():
    sigma = calibrate_noise(4.0, DELTA, 0.05, 200, accountant="prv")
    assert compute_epsilon(sigma, 0.05, 200, DELTA, "prv") <= 4.0
    assert compute_epsilon(sigma * 0.99, 0.05, 200, DELTA, "prv") > 4.0
    assert sigma < calibrate_noise(4.0, DELTA, 0.05, 200, accountant="rdp")


def test_edge_values():
    assert compute_epsilon(1.0, 0.01, 0, DELTA) == 0.0
    assert compute_epsilon(0.0, 0.01, 10, DELTA) == math.inf


# ---------------------------------------------------------------- ledger

def _opacus_epsilon(history, accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for sigma, q, n in history:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=DELTA)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_ledger_composition_matches_opacus(accountant):
    history = [(1.2, 0.02, 300), (0.9, 0.01, 150), (1.2, 0.02, 50)]
    ledger = PrivacyLedger(DELTA, accountant)
    assert ledger.epsilon() == 0.0
    for sigma, q, n in history:
        ledger.record(sigma, q, n)
    assert ledger.steps == 500
    assert len(ledger.history) == 3
    ref = _opacus_epsilon(history, accountant)
    assert ledger.epsilon() == pytest.approx(ref, rel=1e-9)
    alone = [compute_epsilon(1.2, 0.02, 350, DELTA, accountant), compute_epsilon(0.9, 0.01, 150, DELTA, accountant)]
    assert ledger.epsilon() > max(alone)


def test_ledger_merges_identical_records_and_caches(monkeypatch):
    import dist_train.privacy.accounting as acc
    calls = []
    real = acc._history_epsilon
    monkeypatch.setattr(acc, "_history_epsilon", lambda *a: calls.append(a) or real(*a))
    ledger = PrivacyLedger(DELTA)
    for _ in range(100):
        ledger.record(1.1, 0.01)
    assert ledger.history == [(1.1, 0.01, 100)] and ledger.steps == 100
    assert ledger.epsilon() == pytest.approx(compute_epsilon(1.1, 0.01, 100, DELTA), rel=1e-12)
    calls.clear()
    for _ in range(10):
        ledger.epsilon()
    assert calls == []  # cached until something new is recorded
    before = ledger.epsilon()
    assert ledger.epsilon_if(1.1, 0.01, 5) == pytest.approx(compute_epsilon(1.1, 0.01, 105, DELTA), rel=1e-12)
    assert ledger.steps == 100 and ledger.epsilon() == before  # epsilon_if records nothing
    calls.clear()
    ledger.record(1.1, 0.01)
    ledger.epsilon()
    assert len(calls) == 1


def test_would_exceed():
    eps_100 = compute_epsilon(1.0, 0.01, 100, DELTA)
    ledger = PrivacyLedger(DELTA, target_epsilon=compute_epsilon(1.0, 0.01, 150, DELTA) * 1.000001)
    ledger.record(1.0, 0.01, 100)
    assert ledger.epsilon() == pytest.approx(eps_100)
    assert not ledger.would_exceed(1.0, 0.01, 50)
    assert ledger.would_exceed(1.0, 0.01, 51)
    assert not PrivacyLedger(DELTA).would_exceed(0.5, 0.5, 10_000)  # no target: never


def test_state_dict_round_trip(tmp_path):
    ledger = PrivacyLedger(DELTA, "rdp", target_epsilon=8.0)
    ledger.record(1.2, 0.02, 300)
    ledger.record(0.9, 0.01, 150)
    path = tmp_path / "ledger.pt"
    torch.save(ledger.state_dict(), path)
    state = torch.load(path, weights_only=True)
    other = PrivacyLedger(DELTA, "rdp", target_epsilon=8.0)
    other.load_state_dict(state)
    assert other.epsilon() == ledger.epsilon()
    assert other.steps == 450 and other.history == ledger.history
    other.record(0.9, 0.01)  # continues merging after a resume
    assert other.history[-1] == (0.9, 0.01, 151)


def test_load_mismatch_raises():
    state = PrivacyLedger(DELTA, "rdp").state_dict()
    with pytest.raises(UserError, match="privacy.delta"):
        PrivacyLedger(1e-6, "rdp").load_state_dict(state)
    with pytest.raises(UserError, match="privacy.accountant"):
        PrivacyLedger(DELTA, "prv").load_state_dict(state)
    with pytest.raises(UserError, match="checkpoint"):
        PrivacyLedger(DELTA).load_state_dict({"delta": DELTA, "accountant": "rdp", "history": [[1.0, 2.0, 3]]})


# ---------------------------------------------------------------- input validation

@pytest.mark.parametrize("call, key", [
    (lambda: compute_epsilon(1.0, 0.01, 10, 0.0), "privacy.delta"),
    (lambda: compute_epsilon(1.0, 0.01, 10, 1.0), "privacy.delta"),
    (lambda: compute_epsilon(1.0, 0.01, 10, DELTA, "gdp"), "privacy.accountant"),
    (lambda: compute_epsilon(1.0, 0.0, 10, DELTA), "train.batch_size"),
    (lambda: compute_epsilon(1.0, 1.5, 10, DELTA), "train.batch_size"),
    (lambda: compute_epsilon(-1.0, 0.01, 10, DELTA), "privacy.noise_multiplier"),
    (lambda: compute_epsilon(1.0, 0.01, -1, DELTA), "train.steps"),
    (lambda: calibrate_noise(0.0, DELTA, 0.01, 10), "privacy.target_epsilon"),
    (lambda: calibrate_noise(-2.0, DELTA, 0.01, 10), "privacy.target_epsilon"),
    (lambda: calibrate_noise(1.0, 2.0, 0.01, 10), "privacy.delta"),
    (lambda: calibrate_noise(1.0, DELTA, 0.01, 10, "moments"), "privacy.accountant"),
    (lambda: calibrate_noise(0.05, DELTA, 0.04, 2000), "privacy.target_epsilon"),  # below RDP's floor
    (lambda: PrivacyLedger(0.0), "privacy.delta"),
    (lambda: PrivacyLedger(DELTA, "xyz"), "privacy.accountant"),
    (lambda: PrivacyLedger(DELTA, target_epsilon=0.0), "privacy.target_epsilon"),
    (lambda: PrivacyLedger(DELTA, target_epsilon=3.0).record(0.0, 0.01), "privacy.noise_multiplier"),
    (lambda: PrivacyLedger(DELTA).record(1.0, 2.0), "train.batch_size"),
])
def test_bad_inputs_raise_user_error(call, key):
    with pytest.raises(UserError) as info:
        call()
    msg = str(info.value)
    assert key in msg and "\n" not in msg


def test_zero_noise_without_target_is_infinite():
    ledger = PrivacyLedger(DELTA)
    ledger.record(0.0, 0.01)
    assert ledger.epsilon() == math.inf
