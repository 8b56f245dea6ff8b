"""Per-layer DP rules (dist_train/privacy/layers.py) against a batch-size-1 autograd loop.

For every case a small model is built around the layer: out = layer(x), loss = Σ tanh(out) ∘ c with a
fixed per-example tensor c — a SUM over examples, so g_i depends on example i only. The layer's input a
and output gradient g are captured here with our own forward hook and tensor hook (never through
layers.py); the reference per-example gradients come from `torch.autograd.grad` of each example's loss
alone (a batch of one).

Tolerances: per-example grads and clipped sums atol 1e-5 / rtol 1e-4
in fp32; squared norms (ghost AND instantiated paths) relative error ≤ 1e-5 in fp32; bf16 a/g give fp32
norms within 2e-2 relative of the fp32 reference.

The last part registers a rule for a layer type defined here (`register_rule`) and checks
`per_sample_grad_norms` of a model containing it against single-example backward passes (rtol 1e-5,
atol 1e-6 in fp32).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_train.errors import UserError
from dist_train.privacy import LayerRule, per_sample_grad_norms, register_rule
from dist_train.privacy.layers import (ConvRule, EmbeddingRule, FuncRule, LinearRule, RULES,
                                       per_sample_grads, rule_for, trainable_names)
from dp_reference import single_example_grad_norms

B = 4


class Custom(nn.Module):
    """A layer with direct parameters and no rule: goes through FuncRule."""

    def __init__(self, d: int, p: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, p) / d ** 0.5)
        self.s = nn.Parameter(torch.randn(p))
        self.register_buffer("shift", torch.randn(p))

    def forward(self, x):
        return torch.sin(x @ self.w + self.shift) * self.s


class PlainSubLinear(nn.Linear):
    """A subclass that keeps Linear's forward: the Linear rule applies."""


class OtherSubLinear(nn.Linear):
    """A subclass with its own forward: no rule (FuncRule fallback)."""

    def forward(self, x):
        return super().forward(x).pow(2)


def _ids(shape, high, pad=None):
    x = torch.randint(0, high, shape)
    x.view(-1)[::3] = x.view(-1)[0]  # repeated ids within each example
    if pad is not None:
        x.view(-1)[1::5] = pad
    return x


# name -> (layer factory, input factory, expected rule class, expected path for "weight")
# path: "ghost" (no instantiated weight in the cache), "inst" (instantiated), None (not a hybrid rule)
CASES = {
    "linear_2d": (lambda: nn.Linear(6, 5), lambda: torch.randn(B, 6), LinearRule, "ghost"),
    "linear_seq_ghost": (lambda: nn.Linear(8, 7), lambda: torch.randn(B, 4, 8), LinearRule, "ghost"),
    "linear_seq_inst": (lambda: nn.Linear(3, 2), lambda: torch.randn(B, 5, 3), LinearRule, "inst"),
    "linear_4d_input": (lambda: nn.Linear(5, 3), lambda: torch.randn(B, 2, 3, 5), LinearRule, "inst"),
    "linear_nobias": (lambda: nn.Linear(6, 5, bias=False), lambda: torch.randn(B, 3, 6), LinearRule, "ghost"),
    "linear_subclass": (lambda: PlainSubLinear(6, 5), lambda: torch.randn(B, 2, 6), LinearRule, "ghost"),
    "linear_subclass_forward": (lambda: OtherSubLinear(6, 5), lambda: torch.randn(B, 2, 6), FuncRule, None),
    "embedding_pairwise": (lambda: nn.Embedding(10, 8), lambda: _ids((B, 6), 5), EmbeddingRule, None),
    "embedding_unique": (lambda: nn.Embedding(10, 3), lambda: _ids((B, 7), 5), EmbeddingRule, None),
    "embedding_padding": (lambda: nn.Embedding(10, 8, padding_idx=2), lambda: _ids((B, 6), 5, pad=2),
                          EmbeddingRule, None),
    "embedding_padding_unique": (lambda: nn.Embedding(10, 2, padding_idx=0), lambda: _ids((B, 6), 4, pad=0),
                                 EmbeddingRule, None),
    "embedding_1d_ids": (lambda: nn.Embedding(10, 4), lambda: _ids((B,), 10), EmbeddingRule, None),
    "layernorm": (lambda: nn.LayerNorm(6), lambda: torch.randn(B, 3, 6) * 2 + 1, None, None),
    "layernorm_nobias_2dshape": (lambda: nn.LayerNorm((3, 6), bias=False), lambda: torch.randn(B, 2, 3, 6),
                                 None, None),
    "layernorm_flat": (lambda: nn.LayerNorm(6), lambda: torch.randn(B, 6), None, None),
    "rmsnorm": (lambda: nn.RMSNorm(6, eps=1e-5), lambda: torch.randn(B, 3, 6), None, None),
    "groupnorm_2d": (lambda: nn.GroupNorm(2, 4), lambda: torch.randn(B, 4, 3, 3), None, None),
    "groupnorm_1d": (lambda: nn.GroupNorm(3, 6), lambda: torch.randn(B, 6, 5), None, None),
    "conv1d_ghost": (lambda: nn.Conv1d(4, 8, 3, stride=2, padding=1, dilation=2), lambda: torch.randn(B, 4, 9),
                     ConvRule, "ghost"),
    "conv1d_same_inst": (lambda: nn.Conv1d(2, 3, 4, padding="same"), lambda: torch.randn(B, 2, 7), ConvRule, "inst"),
    "conv2d_inst": (lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
                    lambda: torch.randn(B, 3, 6, 5), ConvRule, "inst"),
    "conv2d_ghost": (lambda: nn.Conv2d(3, 8, 3, stride=2), lambda: torch.randn(B, 3, 7, 7), ConvRule, "ghost"),
    "conv2d_same_even_kernel": (lambda: nn.Conv2d(2, 3, (4, 2), padding="same", dilation=(1, 2), bias=False),
                                lambda: torch.randn(B, 2, 5, 4), ConvRule, "inst"),
    "conv2d_valid": (lambda: nn.Conv2d(2, 3, 2, padding="valid"), lambda: torch.randn(B, 2, 4, 4), ConvRule, "inst"),
    "conv2d_groups_fallback": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), lambda: torch.randn(B, 4, 5, 5),
                               FuncRule, None),
    "conv2d_reflect_fallback": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
                                lambda: torch.randn(B, 2, 5, 5), FuncRule, None),
    "custom_funcrule": (lambda: Custom(5, 3), lambda: torch.randn(B, 2, 5), FuncRule, None),
}


def _setup(name, seed=0):
    torch.manual_seed(seed)
    make_layer, make_x, _, _ = CASES[name]
    layer, x = make_layer(), make_x()
    with torch.no_grad():  # non-trivial affine parameters for the norm layers
        for pname, p in layer.named_parameters():
            if isinstance(layer, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
                p.add_(torch.randn_like(p) * 0.5)
    c = torch.randn(B, *layer(x[:1]).shape[1:])
    return layer, x, c


def _loss(out, c):
    return (torch.tanh(out) * c).sum()


def _capture(layer, x, c):
    """(a, g) from one forward/backward of the summed loss, with our own hooks."""
    store = {}

    def hook(module, inputs, output):
        store["a"] = inputs[0].detach()
        output.register_hook(lambda gr: store.__setitem__("g", gr.detach()))

    handle = layer.register_forward_hook(hook)
    try:
        out = layer(x)
        out = out if out.requires_grad else out.requires_grad_(True)
        torch.autograd.grad(_loss(out, c), [out])
    finally:
        handle.remove()
    return store["a"], store["g"]


def _loop(layer, x, c):
    """Reference per-example grads {name: [B, *shape]} of the trainable params, a batch of one at a time."""
    params = {n: p for n, p in layer.named_parameters(recurse=False) if p.requires_grad}
    per = [torch.autograd.grad(_loss(layer(x[i:i + 1]), c[i:i + 1]), list(params.values())) for i in range(x.size(0))]
    return {n: torch.stack([gs[k] for gs in per]) for k, n in enumerate(params)}


def _ref_sq_norms(ref):
    return sum(g.double().reshape(g.size(0), -1).pow(2).sum(1) for g in ref.values())


def _rel(got, ref):
    return float(((got.double() - ref).abs() / ref.abs()).max())


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_against_batch_of_one_loop(name):
    layer, x, c = _setup(name)
    expected_cls, path = CASES[name][2], CASES[name][3]
    rule = rule_for(layer)
    if expected_cls is FuncRule and not isinstance(layer, nn.Conv2d):
        assert rule is None  # no rule: callers use FuncRule
        rule = FuncRule()
    elif expected_cls is FuncRule:
        assert isinstance(rule, FuncRule)  # conv configurations the conv rule defers
    else:
        assert rule is not None and not isinstance(rule, FuncRule)
        if type(layer) in RULES:
            assert rule is RULES[type(layer)]
    if expected_cls is not None:
        assert isinstance(rule, expected_cls), type(rule)

    a, g = _capture(layer, x, c)
    ref = _loop(layer, x, c)

    # per-example gradients
    psg = per_sample_grads(layer, a, g)
    assert set(psg) == set(ref)
    for n in ref:
        assert psg[n].shape == ref[n].shape and psg[n].dtype == ref[n].dtype
        torch.testing.assert_close(psg[n], ref[n], atol=1e-5, rtol=1e-4, msg=f"{name}.{n}")

    # norms (and the hybrid path that was taken)
    norms, cache = rule.norms(layer, a, g)
    assert norms.dtype == torch.float32 and norms.shape == (B,)
    assert _rel(norms, _ref_sq_norms(ref)) <= 1e-5, (name, norms, _ref_sq_norms(ref))
    if path == "ghost":
        assert "weight" not in cache
    elif path == "inst":
        assert "weight" in cache

    # clipped sums, with the cache and without it
    factors = torch.rand(B)
    want = {n: torch.einsum("b,b...->...", factors, r) for n, r in ref.items()}
    for cch in (cache, None):
        got = rule.clipped_sum(layer, a, g, factors, cch)
        assert set(got) == set(want)
        for n, p in layer.named_parameters(recurse=False):
            assert got[n].shape == p.shape and got[n].dtype == p.dtype
            torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=f"{name}.{n}")


def test_hybrid_rule_threshold():
    assert LinearRule.ghost(1, 1, 3)  # 2 < 3
    assert not LinearRule.ghost(2, 2, 4)  # 8 == 8: instantiate
    assert LinearRule.ghost(2, 3, 3)  # 8 < 9


@pytest.mark.parametrize("name", ["linear_2d", "linear_seq_ghost", "linear_seq_inst", "embedding_pairwise",
                                  "embedding_unique", "layernorm", "rmsnorm", "groupnorm_2d", "conv1d_ghost",
                                  "conv2d_inst", "custom_funcrule"])
def test_bf16_inputs_give_fp32_norms(name):
    layer, x, c = _setup(name)
    a, g = _capture(layer, x, c)
    rule = rule_for(layer) or FuncRule()
    ref, _ = rule.norms(layer, a, g)
    a16 = a if not a.is_floating_point() else a.bfloat16()
    got, cache = rule.norms(layer, a16, g.bfloat16())
    assert got.dtype == torch.float32
    assert _rel(got, ref.double()) <= 2e-2
    sums = rule.clipped_sum(layer, a16, g.bfloat16(), torch.rand(B), cache)
    assert all(s.dtype == torch.float32 for s in sums.values())


def test_bf16_params_get_bf16_sums():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).bfloat16()
    a, g = torch.randn(B, 3, 6, dtype=torch.bfloat16), torch.randn(B, 3, 5, dtype=torch.bfloat16)
    rule = rule_for(layer)
    norms, cache = rule.norms(layer, a, g)
    assert norms.dtype == torch.float32
    f = torch.rand(B)
    sums = rule.clipped_sum(layer, a, g, f, cache)
    assert sums["weight"].dtype == torch.bfloat16 and sums["weight"].shape == (5, 6)
    want = torch.einsum("b,btp,btd->pd", f, g.float(), a.float())
    torch.testing.assert_close(sums["weight"].float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name,frozen", [("linear_seq_ghost", "weight"), ("linear_seq_inst", "weight"),
                                         ("linear_2d", "bias"), ("layernorm", "bias"), ("groupnorm_2d", "weight"),
                                         ("conv2d_inst", "bias"), ("custom_funcrule", "w"),
                                         ("embedding_pairwise", "weight")])
def test_frozen_parameters_are_skipped(name, frozen):
    layer, x, c = _setup(name)
    getattr(layer, frozen).requires_grad_(False)
    a, g = _capture(layer, x, c) if any(p.requires_grad for p in layer.parameters()) else \
        (x, torch.randn(B, *layer(x).shape[1:]))
    rule = rule_for(layer) or FuncRule()
    ref = _loop(layer, x, c) if any(p.requires_grad for p in layer.parameters()) else {}
    assert frozen not in ref
    norms, cache = rule.norms(layer, a, g)
    want = _ref_sq_norms(ref) if ref else torch.zeros(B, dtype=torch.float64)
    if ref:
        assert _rel(norms, want) <= 1e-5
    else:
        assert torch.equal(norms, torch.zeros(B))
    assert set(per_sample_grads(layer, a, g)) == set(ref)
    assert set(rule.clipped_sum(layer, a, g, torch.rand(B), cache)) == set(ref)


def test_embedding_padding_row_gets_nothing():
    layer, x, c = _setup("embedding_padding")
    a, g = _capture(layer, x, c)
    assert (x == 2).any()
    s = rule_for(layer).clipped_sum(layer, a, g, torch.ones(B), None)
    assert torch.equal(s["weight"][2], torch.zeros(8))


@pytest.mark.parametrize("kwargs", [{"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"sparse": True}])
def test_embedding_unsupported_options_raise(kwargs):
    layer = nn.Embedding(10, 4, **kwargs)
    rule = rule_for(layer)
    assert isinstance(rule, EmbeddingRule)
    ids, g = torch.randint(0, 10, (B, 3)), torch.randn(B, 3, 4)
    with pytest.raises(ValueError, match="not supported with DP"):
        rule.norms(layer, ids, g)
    with pytest.raises(ValueError, match="not supported with DP"):
        rule.clipped_sum(layer, ids, g, torch.ones(B), None)


def test_funcrule_does_not_fire_forward_hooks():
    """The DP engine's capture hook sits on the layer; re-running it functionally must not fire it."""
    layer, x, c = _setup("custom_funcrule")
    a, g = _capture(layer, x, c)

    def boom(*_):
        raise AssertionError("forward hook fired")

    layer.register_forward_hook(boom)
    norms, _ = FuncRule().norms(layer, a, g)
    assert norms.shape == (B,)


def test_unknown_layer_has_no_rule():
    assert rule_for(Custom(3, 2)) is None
    assert rule_for(nn.ReLU()) is None
    assert isinstance(rule_for(nn.Conv2d(2, 4, 3, groups=2)), FuncRule)


# --- a rule for a layer type of one's own (dist_train.privacy.register_rule) -------------------

class _ScaleShiftFn(torch.autograd.Function):
    """y = x ∘ w + b over the last dim, written the old way (no setup_context), as a fused kernel
    often is: torch.func cannot transform it, so the generic fallback cannot serve this layer."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return x * w + b

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        return gy * w, (gy * x).reshape(-1, w.numel()).sum(0), gy.reshape(-1, w.numel()).sum(0)


class FusedScaleShift(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.bias = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return _ScaleShiftFn.apply(x, self.weight, self.bias)


class ScaleShiftRule(LayerRule):
    """Per example: ∇w_i = Σ_t g_{i,t} ∘ a_{i,t}, ∇b_i = Σ_t g_{i,t} (t: every dim between batch and features)."""

    def instantiate(self, layer, a, g):
        names = trainable_names(layer)
        b, d = a.size(0), layer.weight.numel()
        A, G = a.float().reshape(b, -1, d), g.float().reshape(b, -1, d)
        grads = {}
        if "weight" in names:
            grads["weight"] = (G * A).sum(1)
        if "bias" in names:
            grads["bias"] = G.sum(1)
        return grads


@pytest.fixture
def rules():
    """The registry, restored after the test (registrations are process-wide)."""
    saved = dict(RULES)
    yield RULES
    RULES.clear()
    RULES.update(saved)


def _scale_shift_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), FusedScaleShift(4), nn.Tanh(), nn.Linear(4, 3))


def _sum_loss(out, t):
    return (out - t).pow(2).sum()  # a sum over examples, as per_sample_grad_norms requires


def test_registered_rule_gives_per_example_norms(rules):
    """Norms over the whole model (registered rule + built-in rules) against single-example backward
    passes: relative error ≤ 1e-5 in fp32."""
    rule = register_rule(FusedScaleShift, ScaleShiftRule())
    model = _scale_shift_model()
    assert rule_for(model[1]) is rule
    x, t = torch.randn(B, 3, 5), torch.randn(B, 3, 3)  # 3 positions per example: the rule sums over them

    got = per_sample_grad_norms(model, _sum_loss, x, t)

    torch.testing.assert_close(got, single_example_grad_norms(model, _sum_loss, x, t), rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was


def test_registered_rule_covers_subclasses_that_keep_forward(rules):
    class Sub(FusedScaleShift):
        pass

    rule = register_rule(FusedScaleShift, ScaleShiftRule())
    assert rule_for(Sub(3)) is rule


def test_unregistered_layer_torch_func_cannot_transform_is_refused():
    # Without a rule the layer would go through the torch.func fallback, which cannot run an old-style
    # autograd.Function: one UserError naming the layer type and the way out, not a torch.func traceback.
    model = _scale_shift_model()
    assert rule_for(model[1]) is None
    with pytest.raises(UserError, match=r"FusedScaleShift has no DP layer rule .*register_rule"):
        per_sample_grad_norms(model, _sum_loss, torch.randn(B, 5), torch.randn(B, 3))
    assert all(p.requires_grad for p in model.parameters())


def test_register_rule_replaces_only_when_asked(rules):
    first, second = ScaleShiftRule(), ScaleShiftRule()
    register_rule(FusedScaleShift, first)
    register_rule(FusedScaleShift, first)  # the same rule again: nothing to replace
    with pytest.raises(ValueError, match="FusedScaleShift already has a rule .*replace=True"):
        register_rule(FusedScaleShift, second)
    assert RULES[FusedScaleShift] is first
    assert register_rule(FusedScaleShift, second, replace=True) is second
    assert rule_for(FusedScaleShift(2)) is second
    # a built-in rule is protected the same way
    with pytest.raises(ValueError, match="Linear already has a rule"):
        register_rule(nn.Linear, ScaleShiftRule())
    assert isinstance(rule_for(nn.Linear(2, 2)), LinearRule)


def test_register_rule_checks_its_arguments(rules):
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_rule(FusedScaleShift(2), ScaleShiftRule())
    with pytest.raises(TypeError, match="LayerRule instance"):
        register_rule(FusedScaleShift, ScaleShiftRule)
    assert FusedScaleShift not in RULES
