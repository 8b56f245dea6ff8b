"""Which parameters a matrix optimizer (Muon, NorMuon) orthogonalises and which go to AdamW.

Routing is by name and role, never by `ndim` alone: the embedding table and the output head are
matrices too, but their rows are per-token / per-class vectors that orthogonalisation would mix, so
they go to AdamW (Muon's authors do the same). The rules, first match wins:

1. `optim.matrix.adamw_params` glob patterns -> AdamW; `optim.matrix.matrix_params` -> the matrix
   optimizer.
2. Fewer than 2 dimensions (biases, norm gains) -> AdamW.
3. A parameter of an `nn.Embedding`, or under a module named `embed` (the input layer of the
   reference models: token embedding, the MLP's input projection, the CNN's stem) -> AdamW.
4. The weight of a Linear/Conv whose output size is the model's output size (logits: vocabulary or
   classes; local-learning heads included) -> AdamW.
5. The weight of any other Linear or Conv layer -> the matrix optimizer (conv kernels flattened to
   out × in·kh·kw by the optimizer).
6. Anything else with 2 or more dimensions is unrouted: an error that names it, not a silent AdamW.

A parameter shared by two modules (tied input and output embeddings) is routed once, where it first
appears in module order (the embedding: AdamW).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Optional, Sequence

from torch import nn

from dist_train.errors import UserError

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Routes:
    """Parameters by destination, each as (name, parameter), in module order."""
    matrix: list = field(default_factory=list)
    adamw_decay: list = field(default_factory=list)
    adamw_no_decay: list = field(default_factory=list)
    reasons: dict = field(default_factory=dict)  # name -> why it went where it went


def _output_size(module: nn.Module) -> Optional[int]:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, _LAYERS):
        return module.out_channels
    return None


def route_parameters(model: nn.Module, num_outputs: Optional[int] = None,
                     matrix_patterns: Sequence[str] = (), adamw_patterns: Sequence[str] = ()) -> Routes:
    """Sort `model`'s trainable parameters (see the module docstring for the rules)."""
    routes = Routes()
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        in_embed = any(part == "embed" for part in module_name.split("."))
        for pname, p in module.named_parameters(recurse=False):
            # A shared parameter (tied embedding and output head) is routed once, by its first
            # module in order: the embedding (an optimizer group may hold a tensor only once).
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{module_name}.{pname}" if module_name else pname
            decay_list = routes.adamw_decay
            if any(fnmatch(name, pat) for pat in adamw_patterns):
                dest, why = "adamw", "optim.matrix.adamw_params"
                decay_list = routes.adamw_decay if p.ndim >= 2 else routes.adamw_no_decay
            elif any(fnmatch(name, pat) for pat in matrix_patterns):
                dest, why = "matrix", "optim.matrix.matrix_params"
                if p.ndim < 2:
                    raise UserError(f"optim.matrix.matrix_params: {name} has shape {tuple(p.shape)}; "
                                    "only parameters with 2 or more dimensions can be orthogonalised")
            elif p.ndim < 2:
                dest, why, decay_list = "adamw", "1-D (bias or norm)", routes.adamw_no_decay
            elif isinstance(module, nn.Embedding):
                dest, why, decay_list = "adamw", "embedding", routes.adamw_no_decay
            elif in_embed:
                dest, why = "adamw", "input layer (under `embed`)"
            elif isinstance(module, _LAYERS) and pname == "weight" and num_outputs is not None \
                    and _output_size(module) == num_outputs:
                dest, why = "adamw", f"output head ({num_outputs} outputs)"
            elif isinstance(module, _LAYERS) and pname == "weight":
                dest, why = "matrix", "hidden layer"
            else:
                raise UserError(
                    f"optimizer routing: parameter {name} (shape {tuple(p.shape)}, in a "
                    f"{type(module).__name__}) is neither a hidden Linear/Conv weight nor an embedding, "
                    "head, bias or norm; name it in optim.matrix.matrix_params or optim.matrix.adamw_params")
            routes.reasons[name] = why
            (routes.matrix if dest == "matrix" else decay_list).append((name, p))
    return routes
