"""Per-layer rules for DP-SGD's per-example clipping: per-example squared gradient norms and clipped
sums from one backward pass (ghost clipping and book-keeping).

What a rule receives, for one layer with trainable parameters, after ONE backward pass of a loss that
is a SUM over examples:
- `a`: the layer's INPUT as received in forward (detached), batch as dim 0;
- `g`: the gradient of the loss w.r.t. the layer's OUTPUT, batch as dim 0.
Because the loss is a sum, g_i depends on example i only, and every parameter gradient of the layer
is a per-example function of (a_i, g_i). Hence, without per-example gradients of the model:

- Linear, one example with a (T×d) and g (T×p): ∇W = gᵀa and the *ghost norm*
      ‖gᵀa‖²_F = ⟨a aᵀ, g gᵀ⟩_F      (O(T²) memory instead of O(p·d); for T = 1: ‖g‖²·‖a‖²),
  bias: ‖Σ_t g_t‖².
- Embedding with ids x: ‖∇E‖² = Σ_{t,s} 1[x_t = x_s]·(g_t·g_s), padding ids masked out.
- Hybrid rule, per layer: the ghost path if 2T² < p·d, otherwise instantiate that layer's per-example
  gradient (and reuse it for the clipped sum).
- Book-keeping (Bu et al., arXiv 2210.00038): keep a and g from the one backward pass and build the
  clipped sum directly as Σ_i f_i g_iᵀ a_i — one matmul over the scaled g — so no second backward
  pass is needed (plain ghost clipping, Li et al. 2021, needs one).
- Conv1d/Conv2d are the Linear case on the unfolded input (T = output positions, d = C·k, p = O);
  LayerNorm / RMSNorm / GroupNorm have small parameters and are always instantiated from the
  normalised input x̂, which the rule recomputes from a.
- Any other layer whose parameters are direct (recurse=False) and whose forward treats examples
  independently: `FuncRule`, a per-example vjp of the layer's forward vmapped over the batch
  (torch.func).

Parameters with `requires_grad=False` are not trainable: they contribute nothing to the norms and get
no entry in the clipped sums. Norms and sums are computed in fp32 (a and g are cast up first); sums
are returned in each parameter's dtype.

A layer type of your own: `register_rule(MyLayer, MyRule())`, where `MyRule` subclasses `LayerRule`
and implements at least `instantiate` (see `LayerRule` for the full contract). Without a rule a layer
goes through the torch.func fallback, which is exact for any forward that treats examples
independently and that torch.func can transform; a forward it cannot transform (an old-style
autograd.Function, a data-dependent branch, randomness) is refused with a UserError naming the layer
type, and a registered rule is the way out.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_train.errors import UserError

__all__ = ["LayerRule", "FuncRule", "LinearRule", "ConvRule", "EmbeddingRule", "LayerNormRule",
           "RMSNormRule", "GroupNormRule", "RULES", "register_rule", "rule_for", "per_sample_grads"]


# --- helpers ------------------------------------------------------------------------------------

# Set on a parameter by the book-keeping engine, which freezes it for autograd (so backward skips
# its weight-gradient GEMM) while it stays trainable: its gradient is built here instead.
DP_TRAINABLE = "_dp_trainable"


def _trainable(layer: nn.Module) -> dict[str, nn.Parameter]:
    """The layer's own (recurse=False) trainable parameters, in named_parameters order: those that
    require grad, or that the book-keeping engine froze for autograd (`DP_TRAINABLE`)."""
    return {n: p for n, p in layer.named_parameters(recurse=False) if p.requires_grad or getattr(p, DP_TRAINABLE, False)}


def trainable_names(layer: nn.Module):
    """The names of the parameters the rules treat as trainable on `layer` right now."""
    return _trainable(layer).keys()


def _f32(t: Tensor) -> Tensor:
    """Cast floating tensors up to fp32 (fp64 stays fp64); integer tensors unchanged."""
    if t.is_floating_point() and t.dtype != torch.float64:
        return t.float()
    return t


def _sq_norms(grads: dict[str, Tensor], batch: int, device: torch.device) -> Tensor:
    """Σ over parameters of ‖∇_i p‖², fp32 [B]."""
    out = torch.zeros(batch, dtype=torch.float32, device=device)
    for gr in grads.values():
        out += gr.reshape(batch, -1).pow(2).sum(1).float()
    return out


def _weighted_sum(factors: Tensor, per_example: Tensor) -> Tensor:
    """Σ_i f_i · per_example[i], accumulated in fp32 (or fp64 if the grads are fp64)."""
    f = factors.to(per_example.dtype if per_example.dtype == torch.float64 else torch.float32)
    return torch.tensordot(f, _f32(per_example), dims=([0], [0]))


# --- the interface ------------------------------------------------------------------------------

class LayerRule:
    """One rule per supported layer type. Subclasses implement `instantiate` (per-example grads);
    the default `norms` / `clipped_sum` instantiate and reuse them through the cache. A rule that can
    do better (a ghost norm, a clipped sum without per-example gradients) overrides `norms` and
    `clipped_sum` too; every method works on the layer's own trainable parameters only
    (`named_parameters(recurse=False)`, filtered as `trainable_names` says), keyed by those names.

    The cache returned by `norms` is a dict {param_name: fp32 per-example grad [B, *shape]} for the
    parameters that were instantiated (absent for those on a ghost path); `clipped_sum` accepts
    `cache=None` and then recomputes what it needs."""

    # True: `norms` reads only (a, g) and the layer's configuration, never parameter values, so the
    # book-keeper may call it inside backward, as soon as the layer's output gradient arrives.
    eager = True

    def complete(self, layer: nn.Module, cache: object) -> bool:
        """Whether `cache` holds every trainable parameter's per-example gradient, so that
        `clipped_sum` needs neither a nor g."""
        return isinstance(cache, dict) and all(n in cache for n in _trainable(layer))

    def norms(self, layer: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, object]:
        """Per-example squared norm of this layer's trainable parameters' gradient, fp32, shape [B],
        and a cache object that `clipped_sum` may reuse (e.g. instantiated per-sample grads)."""
        grads = self.instantiate(layer, a, g)
        return _sq_norms(grads, a.size(0), a.device), grads

    def clipped_sum(self, layer: nn.Module, a: Tensor, g: Tensor, factors: Tensor,
                    cache: object) -> dict[str, Tensor]:
        """{param_name: Σ_i factors[i]·∇_i param} for the layer's trainable params (names as in
        layer.named_parameters(recurse=False)), accumulated in fp32, returned in the param's dtype
        and shape."""
        params = _trainable(layer)
        grads = cache if isinstance(cache, dict) and all(n in cache for n in params) else None
        if grads is None:
            grads = self.instantiate(layer, a, g)
        return {n: _weighted_sum(factors, grads[n]).to(p.dtype).reshape(p.shape) for n, p in params.items()}

    def instantiate(self, layer: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
        """Per-example gradients {param_name: fp32 [B, *param.shape]} of the trainable params."""
        raise NotImplementedError

    def select(self, layer: nn.Module) -> Optional["LayerRule"]:
        """The rule to use for this particular instance (a rule may defer some configurations,
        e.g. grouped convolutions, to the generic FuncRule)."""
        return self


class _Bare(nn.Module):
    """Calls `inner.forward` directly, so that re-running a layer functionally does not fire the
    layer's own forward hooks (the DP engine's capture hooks sit there)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner.forward(x)


class FuncRule(LayerRule):
    """Generic fallback via torch.func, for any layer whose parameters are direct (recurse=False) and
    whose forward treats examples independently: the per-example gradient is the vjp of
    functional_call(layer, params, (a_i,)) with cotangent g_i, vmapped over the batch (each example
    runs as a batch of one). Always instantiates per-example gradients (memory B × params), which the
    cache then reuses for the clipped sum. Floating inputs, cotangents and the trainable parameters
    are cast up to fp32 first. The layer's forward hooks are not fired; a forward that uses
    randomness (dropout) is rejected by vmap."""

    eager = False  # it reads the parameter values, which a sharded backend may only hold after backward

    def instantiate(self, layer, a, g):
        params = _trainable(layer)
        if not params:
            return {}
        bare = _Bare(layer)
        p0 = {"inner." + n: _f32(p.detach()) for n, p in params.items()}
        a, g = _f32(a), _f32(g)

        def one(p, a_i, g_i):
            out, vjp_fn = torch.func.vjp(
                lambda q: torch.func.functional_call(bare, q, (a_i.unsqueeze(0),)), p)
            return vjp_fn(g_i.unsqueeze(0).to(out.dtype).reshape(out.shape))[0]

        try:
            grads = torch.func.vmap(one, in_dims=(None, 0, 0))(p0, a, g)
        except RuntimeError as e:  # torch.func cannot transform this forward: say what to do about it
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"privacy: {type(layer).__name__} has no DP layer rule and the torch.func fallback "
                            f"cannot run its forward ({reason}); register one with "
                            "dist_train.privacy.register_rule") from e
        return {n: _f32(grads["inner." + n]) for n in params}


# --- Linear and convolutions (ghost / instantiate, by the hybrid rule) --------------------------

class LinearRule(LayerRule):
    """nn.Linear. a [B, d] or [B, *, d] (all dims between batch and the last flattened into T),
    g [B, *, p]. Per example ∇W_i = g_iᵀ a_i (p×d), ∇b_i = Σ_t g_{i,t}.

    Hybrid rule (per layer): if 2T² < p·d, the ghost norm ‖g_iᵀa_i‖²_F = ⟨a_i a_iᵀ, g_i g_iᵀ⟩_F
    (for T = 1: ‖g_i‖²‖a_i‖²) and the book-keeping clipped sum Σ_i f_i g_iᵀa_i as ONE matmul
    (g·f).reshape(-1, p)ᵀ @ a.reshape(-1, d) (arXiv 2210.00038); otherwise ∇W_i is instantiated by
    einsum and reused from the cache. The bias gradient [B, p] is always instantiated."""

    @staticmethod
    def ghost(t: int, d: int, p: int) -> bool:
        """The hybrid rule: ghost path iff 2T² < p·d."""
        return 2 * t * t < p * d

    def operands(self, layer: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """(A [B, T, d], G [B, T, p]) in fp32, possibly non-contiguous views."""
        b = a.size(0)
        return _f32(a).reshape(b, -1, a.size(-1)), _f32(g).reshape(b, -1, g.size(-1))

    def _weight(self, layer: nn.Module) -> nn.Parameter:
        return layer.weight

    def norms(self, layer, a, g):
        params = _trainable(layer)
        b = a.size(0)
        out = torch.zeros(b, dtype=torch.float32, device=a.device)
        cache: dict[str, Tensor] = {}
        if not params:
            return out, cache
        A, G = self.operands(layer, a, g)
        t, d, p = A.size(1), A.size(2), G.size(2)
        if "weight" in params:
            if not self.ghost(t, d, p):
                cache["weight"] = torch.einsum("btp,btd->bpd", G, A)
                out += cache["weight"].reshape(b, -1).pow(2).sum(1).float()
            elif t == 1:
                out += (G.reshape(b, p).pow(2).sum(1) * A.reshape(b, d).pow(2).sum(1)).float()
            else:
                aa = torch.bmm(A, A.transpose(1, 2))  # [B, T, T]
                gg = torch.bmm(G, G.transpose(1, 2))
                out += torch.linalg.vecdot(aa.reshape(b, -1), gg.reshape(b, -1)).float()
        if "bias" in params:
            cache["bias"] = G.sum(1)
            out += cache["bias"].pow(2).sum(1).float()
        return out, cache

    def clipped_sum(self, layer, a, g, factors, cache):
        params = _trainable(layer)
        if not params:
            return {}
        cache = cache if isinstance(cache, dict) else {}
        # a and g are gone when the cache is complete (the book-keeper freed them in backward)
        A, G = (None, None) if self.complete(layer, cache) else self.operands(layer, a, g)
        res: dict[str, Tensor] = {}
        if "weight" in params:
            w = params["weight"]
            if "weight" in cache:
                s = _weighted_sum(factors, cache["weight"])
            else:  # book-keeping: one matmul, with the factors on the narrower of the two operands
                f = factors.to(G.dtype).reshape(-1, 1, 1)
                Gf, Af = (G * f, A) if G.size(2) <= A.size(2) else (G, A * f)
                s = Gf.reshape(-1, G.size(2)).t() @ Af.reshape(-1, A.size(2))
            res["weight"] = s.reshape(w.shape).to(w.dtype)
        if "bias" in params:
            bias = params["bias"]
            gb = cache["bias"] if "bias" in cache else G.sum(1)
            res["bias"] = _weighted_sum(factors, gb).reshape(bias.shape).to(bias.dtype)
        return res

    def instantiate(self, layer, a, g):
        params = _trainable(layer)
        if not params:
            return {}
        A, G = self.operands(layer, a, g)
        res = {}
        if "weight" in params:
            res["weight"] = torch.einsum("btp,btd->bpd", G, A).reshape(a.size(0), *params["weight"].shape)
        if "bias" in params:
            res["bias"] = G.sum(1)
        return res


class ConvRule(LinearRule):
    """nn.Conv1d / nn.Conv2d with groups=1 and padding_mode='zeros' (any stride, dilation, padding,
    including 'same' / 'valid'): the input is unfolded (F.unfold; 1-D through a [B, C, 1, L] view) to
    [B, C·k, L] and g reshaped to [B, O, L]; then it is the Linear case with T = L, d = C·k, p = O —
    the same ghost norm, hybrid rule and one-matmul book-keeping sum — with the weight reshaped to the
    conv weight shape and the bias gradient Σ over L. groups > 1 and other padding modes are deferred
    to FuncRule (see `select`)."""

    def select(self, layer):
        if layer.groups != 1 or layer.padding_mode != "zeros":
            return _FUNC
        return self

    @staticmethod
    def _pads(layer: nn.Module) -> list[tuple[int, int]]:
        nd = len(layer.kernel_size)
        if isinstance(layer.padding, str):
            if layer.padding == "valid":
                return [(0, 0)] * nd
            # 'same' (stride 1): total dilation·(k−1), the odd extra element on the right, as torch pads
            pads = []
            for k, dil in zip(layer.kernel_size, layer.dilation):
                total = dil * (k - 1)
                pads.append((total // 2, total - total // 2))
            return pads
        return [(p, p) for p in layer.padding]

    def operands(self, layer, a, g):
        b = a.size(0)
        nd = len(layer.kernel_size)
        if a.dim() != nd + 2:
            raise ValueError(f"{type(layer).__name__}: per-example clipping needs a batched input "
                             f"[B, C, {'L' if nd == 1 else 'H, W'}], got shape {tuple(a.shape)}")
        x = _f32(a)
        pads = self._pads(layer)
        if any(lo or hi for lo, hi in pads):
            x = F.pad(x, [v for lo_hi in reversed(pads) for v in lo_hi])
        k, s, dil = tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.dilation)
        if nd == 1:
            x, k, s, dil = x.unsqueeze(2), (1, *k), (1, *s), (1, *dil)
        cols = F.unfold(x, kernel_size=k, dilation=dil, padding=0, stride=s)  # [B, C·k, L]
        G = _f32(g).reshape(b, g.size(1), -1)  # [B, O, L]
        if G.size(2) != cols.size(2):
            raise ValueError(f"{type(layer).__name__}: output gradient has {G.size(2)} positions, the "
                             f"unfolded input {cols.size(2)}")
        return cols.transpose(1, 2), G.transpose(1, 2)


# --- Embedding ----------------------------------------------------------------------------------

class EmbeddingRule(LayerRule):
    """nn.Embedding, a = integer ids [B, T] (or [B], or more dims, flattened into T), g [B, T, dim].
    Ghost norm ‖∇E_i‖² = Σ_{t,s} 1[x_t = x_s]·(g_t·g_s), positions whose id is `padding_idx` excluded
    (torch gives that row no gradient). Computed pairwise ([B, T, T]) when T ≤ dim, otherwise by the
    equal identity Σ_u ‖Σ_{t: x_t = u} g_t‖² (rows summed per distinct id, memory O(B·T·dim)).
    Clipped sum: index_add_ of f_i·g_{i,t} into rows x_{i,t} (book-keeping, arXiv 2210.00038).
    max_norm (in-place renormalisation), scale_grad_by_freq (depends on the whole batch) and sparse
    gradients are rejected with a ValueError."""

    @staticmethod
    def _check(layer: nn.Module) -> None:
        if layer.max_norm is not None:
            raise ValueError("nn.Embedding with max_norm: max_norm renormalisation is not supported with DP "
                             "(it rewrites the table in forward); use max_norm=None")
        if layer.scale_grad_by_freq:
            raise ValueError("nn.Embedding with scale_grad_by_freq=True is not supported with DP: the scaling "
                             "depends on the whole batch, so per-example gradients are not separable")
        if layer.sparse:
            raise ValueError("nn.Embedding with sparse=True is not supported with DP; use sparse=False")

    @staticmethod
    def _operands(layer: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """(ids [B, T] int64, G [B, T, dim] fp32 with padding positions zeroed)."""
        b = a.size(0)
        ids = a.reshape(b, -1).long()
        G = _f32(g).reshape(b, ids.size(1), -1)
        if layer.padding_idx is not None:
            G = G * (ids != layer.padding_idx).unsqueeze(-1).to(G.dtype)
        return ids, G

    def norms(self, layer, a, g):
        self._check(layer)
        b = a.size(0)
        if "weight" not in _trainable(layer):
            return torch.zeros(b, dtype=torch.float32, device=a.device), {}
        ids, G = self._operands(layer, a, g)
        t, dim = G.size(1), G.size(2)
        if t <= dim:
            same = ids.unsqueeze(2) == ids.unsqueeze(1)  # [B, T, T]
            gg = torch.bmm(G, G.transpose(1, 2))
            out = (gg * same.to(gg.dtype)).sum((1, 2))
        else:
            v = layer.num_embeddings
            key = (torch.arange(b, device=ids.device).unsqueeze(1) * v + ids).reshape(-1)
            uniq, inv = torch.unique(key, return_inverse=True)
            rows = torch.zeros(uniq.numel(), dim, dtype=G.dtype, device=G.device)
            rows.index_add_(0, inv, G.reshape(-1, dim))
            out = torch.zeros(b, dtype=G.dtype, device=G.device).index_add_(0, uniq // v, rows.pow(2).sum(1))
        return out.float(), {}

    def clipped_sum(self, layer, a, g, factors, cache):
        self._check(layer)
        params = _trainable(layer)
        if "weight" not in params:
            return {}
        w = params["weight"]
        ids, G = self._operands(layer, a, g)
        scaled = G * factors.to(G.dtype).reshape(-1, 1, 1)
        out = torch.zeros(w.shape, dtype=G.dtype, device=G.device)
        out.index_add_(0, ids.reshape(-1), scaled.reshape(-1, G.size(2)))
        return {"weight": out.to(w.dtype)}

    def instantiate(self, layer, a, g):
        self._check(layer)
        if "weight" not in _trainable(layer):
            return {}
        ids, G = self._operands(layer, a, g)
        b, v, dim = ids.size(0), layer.num_embeddings, G.size(2)
        key = (torch.arange(b, device=ids.device).unsqueeze(1) * v + ids).reshape(-1)
        out = torch.zeros(b * v, dim, dtype=G.dtype, device=G.device)
        out.index_add_(0, key, G.reshape(-1, dim))
        return {"weight": out.view(b, v, dim)}


# --- normalisation layers (always instantiated: their parameters are small) ---------------------

class LayerNormRule(LayerRule):
    """nn.LayerNorm (elementwise_affine, with or without bias). a is the raw input; the rule
    recomputes x̂ = (a − mean)/sqrt(var + eps) over normalized_shape (biased variance, as torch), then
    ∇γ_i = Σ_t g_{i,t} ∘ x̂_{i,t}, ∇β_i = Σ_t g_{i,t} (t over the dims between batch and
    normalized_shape). Always instantiated."""

    def _xhat(self, layer: nn.Module, a: Tensor) -> Tensor:
        # the affine-free layer_norm is this formula; on CPU it is ~9x faster than var_mean + arithmetic
        return F.layer_norm(_f32(a), tuple(layer.normalized_shape), eps=layer.eps)

    def instantiate(self, layer, a, g):
        params = _trainable(layer)
        if not params:
            return {}
        b, shape = a.size(0), tuple(layer.normalized_shape)
        G = _f32(g)
        res = {}
        if "weight" in params:
            res["weight"] = (G * self._xhat(layer, a)).reshape(b, -1, *shape).sum(1)
        if "bias" in params:
            res["bias"] = G.reshape(b, -1, *shape).sum(1)
        return res


class RMSNormRule(LayerNormRule):
    """nn.RMSNorm (elementwise_affine): x̂ = a / sqrt(mean(a²) + eps) over normalized_shape (eps=None
    means torch.finfo(input dtype).eps, as torch), ∇γ_i = Σ_t g_{i,t} ∘ x̂_{i,t}. Always instantiated."""

    def _xhat(self, layer, a):
        eps = layer.eps if layer.eps is not None else torch.finfo(a.dtype).eps
        return F.rms_norm(_f32(a), tuple(layer.normalized_shape), eps=eps)  # affine-free: the formula above


class GroupNormRule(LayerRule):
    """nn.GroupNorm (affine). a [B, C, *spatial]; x̂ from the group statistics over (C/G, spatial)
    (biased variance, as torch); per channel c: ∇γ_{i,c} = Σ_spatial g_{i,c} ∘ x̂_{i,c},
    ∇β_{i,c} = Σ_spatial g_{i,c}. Always instantiated."""

    def instantiate(self, layer, a, g):
        params = _trainable(layer)
        if not params:
            return {}
        b, c = a.size(0), a.size(1)
        G = _f32(g).reshape(b, c, -1)
        res = {}
        if "weight" in params:
            x = _f32(a).reshape(b, layer.num_groups, -1)
            var, mean = torch.var_mean(x, dim=-1, correction=0, keepdim=True)
            xhat = ((x - mean) * torch.rsqrt(var + layer.eps)).reshape(b, c, -1)
            res["weight"] = (G * xhat).sum(-1)
        if "bias" in params:
            res["bias"] = G.sum(-1)
        return res


# --- registry -----------------------------------------------------------------------------------

_FUNC = FuncRule()
_LINEAR = LinearRule()
_CONV = ConvRule()
_LAYERNORM = LayerNormRule()

RULES: dict[type, LayerRule] = {
    nn.Linear: _LINEAR,
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: _LAYERNORM,
    nn.RMSNorm: RMSNormRule(),
    nn.GroupNorm: GroupNormRule(),
}


def register_rule(layer_type: type[nn.Module], rule: LayerRule, *, replace: bool = False) -> LayerRule:
    """Use `rule` for every layer of type `layer_type` (and its subclasses that keep its `forward`);
    returns `rule`.

    `rule` is a `LayerRule` instance; it must implement `instantiate(layer, a, g)`, the per-example
    gradients {param_name: [B, *param.shape]} of the layer's trainable parameters from its input `a`
    and output gradient `g` (batch first; the loss is a sum over examples), and may override `norms`
    and `clipped_sum` (cheaper paths), `select` (defer some configurations of the layer to another
    rule) and `eager` (False when `norms` reads parameter values). Registering a type that already
    has a rule raises ValueError unless `replace=True`: replacing a built-in rule silently would
    change every model's clipping, so it is asked for by name."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"register_rule: layer_type must be an nn.Module subclass, got {layer_type!r}")
    if not isinstance(rule, LayerRule):
        raise TypeError(f"register_rule: rule must be a LayerRule instance, got {type(rule).__name__}")
    current = RULES.get(layer_type)
    if current is not None and current is not rule and not replace:
        raise ValueError(f"register_rule: {layer_type.__name__} already has a rule ({type(current).__name__}); "
                         "pass replace=True to replace it")
    RULES[layer_type] = rule
    return rule


def rule_for(layer: nn.Module) -> Optional[LayerRule]:
    """The rule for this layer type, or None if unsupported (callers then use FuncRule).

    Exact type match first, then the nearest registered base class — but a subclass that overrides
    `forward` gets None, since its rule's formulas may no longer describe what it computes. Conv
    layers with groups > 1 or padding_mode != 'zeros' get the FuncRule fallback."""
    cls = type(layer)
    for base in cls.__mro__:
        rule = RULES.get(base)
        if rule is None:
            continue
        if base is not cls and cls.forward is not base.forward:
            return None
        return rule.select(layer)
    return None


def per_sample_grads(layer: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Instantiated per-example gradients {param_name: [B, *param.shape]} of the layer's trainable
    parameters, in each parameter's dtype (computed in fp32): the layer's rule where there is one,
    FuncRule otherwise. Used by tests and by the hybrid rule's instantiated path."""
    rule = rule_for(layer) or _FUNC
    params = _trainable(layer)
    grads = rule.instantiate(layer, a, g)
    return {n: grads[n].reshape(a.size(0), *p.shape).to(p.dtype) for n, p in params.items()}
