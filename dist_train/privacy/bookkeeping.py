"""Per-example clipping in one backward pass: book-keeping (Bu et al., arXiv 2210.00038).

`BookKeeper` attaches to a model from outside (forward hooks; the model file knows nothing of it):
- every layer that owns trainable parameters keeps its input `a` from forward, and a tensor hook on
  its output keeps the output gradient `g` from the ONE backward pass of a loss that is a sum over
  examples;
- the layer's parameters are frozen for autograd (`requires_grad=False`), so backward computes only
  the activation gradients: the weight-gradient GEMMs of ordinary backprop are not run at all;
- each layer's rule (`dist_train.privacy.layers`) gives the per-example squared norms (ghost norms
  or instantiated, by the hybrid rule) as soon as its output gradient arrives, while backward goes
  on: the rule's temporaries are freed at once, and a layer whose per-example gradients are then
  all instantiated (norm layers, small linears) drops its kept a and g right away instead of
  holding them to the end of backward (a rule that reads parameter values, the torch.func
  fallback, waits until after backward). Summed over layers they give ||g_i||; the
  factors f_i = min(1, C / (||g_i|| + 1e-6)) (flat clipping over all parameters) then weight the
  clipped sum sum_i f_i grad_i that each rule builds directly from (a, g) — no per-example gradient
  of a whole model is ever stored, and there is no second backward pass (plain ghost clipping,
  Li et al. 2021, needs one).

The validator refuses what per-example clipping cannot handle — tied weights (one parameter, two
owners), BatchNorm (mixes examples; replaced by GroupNorm when asked), layers called more than once
per forward, layers whose output has no per-example dimension — each with a one-line message.
Layers without a rule get the generic `torch.func` fallback.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from dist_train.errors import UserError
from dist_train.privacy.layers import DP_TRAINABLE, FuncRule, LayerRule, rule_for, trainable_names

CLIP_EPS = 1e-6  # f_i = min(1, C / (||g_i|| + 1e-6)), as Opacus defines it


@dataclass
class _Layer:
    name: str
    module: nn.Module
    rule: LayerRule
    params: dict[str, nn.Parameter]
    a: Optional[torch.Tensor] = None
    g: Optional[torch.Tensor] = None
    cache: Any = None
    sq: Optional[torch.Tensor] = None  # per-example squared norms [B], once computed
    rows: int = 0  # the batch dimension of the captured output gradient
    hooks: list = field(default_factory=list)


def fix_batchnorm(model: nn.Module) -> int:
    """Replace every BatchNorm by a GroupNorm over the same channels (as Opacus's ModuleValidator
    fix does); returns how many were replaced."""
    replaced = 0
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                c = child.num_features
                groups = next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)
                setattr(parent, child_name, nn.GroupNorm(groups, c, affine=child.affine).to(
                    next(child.parameters(), torch.empty(0)).device))
                replaced += 1
    return replaced


def validate(model: nn.Module) -> None:
    """Raise UserError for what per-example clipping cannot handle (see the module docstring)."""
    owners: dict[int, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise UserError(f"privacy: {module_name or 'model'} is a BatchNorm, which mixes examples, so per-example "
                            "gradients are undefined; set privacy.fix_model=true to replace it by GroupNorm")
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{module_name}.{pname}" if module_name else pname
            if id(p) in owners and owners[id(p)] != full:
                raise UserError(f"privacy: parameter {full} is the same tensor as {owners[id(p)]} (tied weights); "
                                "per-example clipping needs one owner per parameter: untie them")
            owners[id(p)] = full


class BookKeeper:
    """Attach to `model`; after each micro-batch's backward call `accumulate(batch)`; after the
    last, `take()` gives the per-parameter clipped sums. `detach()` undoes everything."""

    def __init__(self, model: nn.Module, max_grad_norm: float):
        validate(model)
        self.max_grad_norm = float(max_grad_norm)
        self.layers: list[_Layer] = []
        for name, module in model.named_modules():
            params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if params:
                self.layers.append(_Layer(name or "model", module, rule_for(module) or FuncRule(), params))
        self.params: list[nn.Parameter] = [p for layer in self.layers for p in layer.params.values()]
        self.names: dict[nn.Parameter, str] = {
            p: (f"{layer.name}.{n}" if layer.name != "model" else n)
            for layer in self.layers for n, p in layer.params.items()}
        self._sums: dict[nn.Parameter, torch.Tensor] = {}
        self.reset_stats()
        for layer in self.layers:
            for p in layer.params.values():
                p.requires_grad_(False)  # backward computes activation gradients only
                setattr(p, DP_TRAINABLE, True)  # ... while the rules still treat it as trainable
            layer.hooks.append(layer.module.register_forward_hook(self._make_hook(layer)))

    def reset_stats(self) -> None:
        self.examples, self.clipped, self.norm_sum = 0, 0, 0.0

    def detach(self) -> None:
        for layer in self.layers:
            for h in layer.hooks:
                h.remove()
            layer.hooks.clear()
            for p in layer.params.values():
                p.requires_grad_(True)
                delattr(p, DP_TRAINABLE)
            layer.a = layer.g = layer.cache = layer.sq = None

    @contextlib.contextmanager
    def trainable(self) -> Iterator[None]:
        """Parameters marked trainable again for the duration (checkpointing: torch's optimizer
        state-dict helpers skip the state of parameters that do not require grad)."""
        for p in self.params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in self.params:
                p.requires_grad_(False)

    # --- capture ----------------------------------------------------------------------------
    def _make_hook(self, layer: _Layer):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled():
                return None  # evaluation / generation: nothing to clip
            if layer.a is not None:
                raise UserError(f"privacy: layer {layer.name} ran twice in one forward (reused weights); "
                                "per-example clipping needs each parameterised layer applied once")
            if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                raise UserError(f"privacy: layer {layer.name} ({type(module).__name__}) takes or returns more than "
                                "one tensor; per-example clipping supports single-input, single-output layers")
            layer.a = inputs[0].detach()
            replaced = None
            if not output.requires_grad:  # its input carries no gradient (token ids, the first layer)
                output = replaced = output.detach().requires_grad_(True)

            def keep(g: torch.Tensor) -> None:
                layer.g, layer.rows = g.detach(), g.size(0)
                # Not when a backend has swapped the layer's parameters for others (FSDP2 holds unsharded
                # copies during backward, which the rules may not see as trainable), nor for an empty
                # micro-batch (`accumulate(0)` drops it), nor when the shapes are wrong (`_captured` then
                # names the problem): those wait until after backward.
                if (layer.rule.eager and 0 < layer.rows == layer.a.size(0)
                        and trainable_names(layer.module) == layer.params.keys()):
                    layer.sq, layer.cache = layer.rule.norms(layer.module, layer.a, layer.g)
                    if layer.rule.complete(layer.module, layer.cache):
                        layer.a = layer.g = None  # the cache holds all the clipped sum needs

            output.register_hook(keep)
            return replaced

        return hook

    # --- after backward ---------------------------------------------------------------------
    def _captured(self, batch: int) -> list[_Layer]:
        used = []
        for layer in self.layers:
            if layer.sq is not None:  # its norms were taken during backward
                if layer.rows != batch:
                    raise UserError(f"privacy: layer {layer.name} sees a tensor without the batch dimension "
                                    f"(output gradient with {layer.rows} rows, batch {batch}); "
                                    "per-example clipping needs per-example activations")
                used.append(layer)
                continue
            if layer.a is None:
                continue
            if layer.g is None:  # ran, but its output did not reach the loss
                layer.a = None
                continue
            if layer.a.size(0) != batch or layer.g.size(0) != batch:
                raise UserError(f"privacy: layer {layer.name} sees a tensor without the batch dimension "
                                f"(input {tuple(layer.a.shape)}, output gradient {tuple(layer.g.shape)}, batch {batch}); "
                                "per-example clipping needs per-example activations")
            used.append(layer)
        return used

    def norms(self, batch: int) -> torch.Tensor:
        """Per-example gradient norms ||g_i|| over all trainable parameters, fp32 [batch]."""
        layers = self._captured(batch)
        for layer in layers:  # those not taken during backward
            if layer.sq is None:
                layer.sq, layer.cache = layer.rule.norms(layer.module, layer.a, layer.g)
        sq = torch.zeros(batch, dtype=torch.float32, device=layers[0].sq.device if layers else torch.device("cpu"))
        for layer in layers:
            sq += layer.sq
        return sq.sqrt()

    def accumulate(self, batch: int) -> torch.Tensor:
        """Clip this micro-batch's examples and add sum_i f_i grad_i to the running sums; returns
        the per-example norms before clipping."""
        if batch == 0:  # an empty micro-batch (FSDP2 keeps ranks in step): nothing to clip
            self.clear()
            return torch.zeros(0)
        norms = self.norms(batch)
        factors = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        for layer in self.layers:
            if layer.sq is None:  # did not take part in this micro-batch
                continue
            for pname, s in layer.rule.clipped_sum(layer.module, layer.a, layer.g, factors, layer.cache).items():
                p = layer.params[pname]
                if p in self._sums:
                    self._sums[p] += s
                else:
                    self._sums[p] = s.detach().clone()
            layer.a = layer.g = layer.cache = layer.sq = None
        self.examples += batch
        self.clipped += int((norms > self.max_grad_norm).sum())
        self.norm_sum += float(norms.sum())
        return norms

    def clear(self) -> None:
        """Drop captures of a forward that will not be backpropagated (e.g. an aborted step)."""
        for layer in self.layers:
            layer.a = layer.g = layer.cache = layer.sq = None

    def take(self) -> list[torch.Tensor]:
        """The clipped sums in `self.params` order (zeros for parameters no example touched this
        step, or when this rank drew no examples); the running sums restart."""
        out = [self._sums.pop(p) if p in self._sums else torch.zeros_like(p) for p in self.params]
        self._sums.clear()
        return out


def per_sample_grad_norms(model: nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example gradient norms over all trainable parameters of `model`, shape [batch], by the
    ghost / book-keeping path (one forward, one backward of activation gradients only).
    `loss_fn(outputs, targets)` must return the batch loss as a SUM over examples. The model is
    left as it was (hooks removed, parameters trainable again, no .grad written)."""
    keeper = BookKeeper(model, max_grad_norm=1.0)
    try:
        with torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
            if loss.requires_grad:
                loss.backward()
        return keeper.norms(inputs.size(0)).detach()
    finally:
        keeper.detach()
