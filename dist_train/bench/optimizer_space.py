"""What `dist-train bench optimizers` tunes: the arms, each one's hyperparameters with their ladders and
starting values, and how a setting becomes config overrides.

Every arm is tuned over the same kinds of hyperparameter, with ladders spaced alike (learning rates a
factor 2 apart, the same warm-up and weight-decay ladders), started from its usual setting:
  adamw          lr, warm-up, weight decay, beta2.
  muon           the matrices' lr (Keller's scale sqrt(max(1, m/n)), Nesterov), warm-up, weight decay,
                 momentum mu, and the lr of its AdamW groups (embeddings, output head, norms, biases).
  normuon        the paper's update rule with Nesterov momentum (`optim.matrix.nesterov=true`, as Muon):
                 Muon's hyperparameters plus NorMuon's beta2 (of the per-neuron second moment).
  normuon_paper  the paper's Algorithm 1 as written (no Nesterov; `optim.name: normuon`'s default):
                 the same hyperparameters as normuon.
The warm-up is a fraction of the run's steps, so a setting carries over between horizons.
"""

from __future__ import annotations

from dist_train.bench.tuning import Axis, Setting, geometric

# arm -> (optim.name, fixed overrides)
ARMS: dict[str, tuple[str, list[str]]] = {
    "adamw": ("adamw", []),
    "muon": ("muon", []),
    "normuon": ("normuon", ["optim.matrix.nesterov=true"]),
    "normuon_paper": ("normuon", ["optim.matrix.nesterov=false"]),
}
MATRIX_ARMS = ("muon", "normuon", "normuon_paper")
TARGET_ARMS = ("muon", "normuon")  # the arms whose speed-ups the plot draws and the targets name

# Starting points: AdamW's and the matrix lrs where the earlier 3-lr sweeps of `bench muon` found
# them on the quickstart GPT (adamw 3e-3, muon 0.025, normuon 1e-2), the AdamW groups of the matrix
# optimizers at AdamW's lr, and the literature's defaults for the rest (warm-up 10%, weight decay
# 0.1, AdamW beta2 0.95, momentum 0.95, NorMuon beta2 0.95).
_LR_CENTER = {"adamw": 3e-3, "muon": 0.025, "normuon": 1e-2, "normuon_paper": 1e-2}
WARMUP = (0.0, 0.025, 0.05, 0.1, 0.2, 0.4)
WEIGHT_DECAY = (0.0, 0.025, 0.05, 0.1, 0.2, 0.4)
ADAM_BETA2 = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
MOMENTUM = (0.8, 0.9, 0.95, 0.98)
NORMUON_BETA2 = (0.9, 0.95, 0.98, 0.99, 0.995)

# setting key -> the config key it sets (warmup is converted from a fraction of the steps)
_KEYS = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "beta2": "optim.beta2",
         "momentum": "optim.matrix.momentum", "normuon_beta2": "optim.matrix.beta2",
         "adamw_lr": "optim.matrix.adamw_lr"}


def axes(arm: str, only: tuple[str, ...] | None = None) -> list[Axis]:
    """`arm`'s hyperparameters in the order a descent pass sweeps them (the lrs first: they matter
    most); `only`: just these (by name), in the same order."""
    lr = Axis("lr", geometric(_LR_CENTER[arm], 2.0, 5, 5))
    out = [lr]
    if arm in MATRIX_ARMS:
        out.append(Axis("adamw_lr", geometric(_LR_CENTER["adamw"], 2.0, 5, 5)))
    out += [Axis("warmup", WARMUP), Axis("weight_decay", WEIGHT_DECAY)]
    if arm == "adamw":
        out.append(Axis("beta2", ADAM_BETA2))
    else:
        out.append(Axis("momentum", MOMENTUM))
    if arm.startswith("normuon"):
        out.append(Axis("normuon_beta2", NORMUON_BETA2))
    return [a for a in out if only is None or a.name in only]


def start(arm: str) -> Setting:
    setting: Setting = {"lr": _LR_CENTER[arm], "warmup": 0.1, "weight_decay": 0.1}
    if arm == "adamw":
        setting["beta2"] = 0.95
    else:
        setting |= {"adamw_lr": _LR_CENTER["adamw"], "momentum": 0.95}
    if arm.startswith("normuon"):
        setting["normuon_beta2"] = 0.95
    return setting


def overrides(arm: str, setting: Setting, steps: int) -> list[str]:
    """The config overrides of `arm` at `setting` for a run of `steps` steps."""
    name, fixed = ARMS[arm]
    out = [f"optim.name={name}", *fixed, f"optim.warmup_steps={round(setting['warmup'] * steps)}"]
    return out + [f"{_KEYS[k]}={v}" for k, v in setting.items() if k in _KEYS]


def describe(setting: Setting) -> str:
    """A setting in one short line, e.g. `lr=0.01 warmup=0.1 weight_decay=0.1 momentum=0.95`."""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())
