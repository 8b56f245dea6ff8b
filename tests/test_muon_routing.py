"""Parameter routing: hidden Linear/Conv weights to the matrix optimizer; embeddings, input layer,
output heads, biases and norms to AdamW; patterns override; an unrouted matrix is an error naming it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_train.config.schema import Config
from dist_train.data import build_dataset
from dist_train.errors import UserError
from dist_train.models import build_model
from dist_train.optim import optimizer_spec
from dist_train.optim.routing import route_parameters


def _names(pairs):
    return {n for n, _ in pairs}


def test_gpt_routing_by_role():
    cfg = Config.model_validate({"model": {"name": "gpt", "n_layer": 2, "width": 32, "n_head": 2, "block_size": 16}})
    model = build_model(cfg.model, build_dataset(cfg.data, 16).info)
    r = route_parameters(model, num_outputs=256)
    # Every hidden matrix of every block, nothing else.
    assert _names(r.matrix) == {f"blocks.{i}.{m}.weight" for i in range(2)
                                for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert {"embed.tok.weight", "embed.pos.weight"} <= _names(r.adamw_no_decay)  # embeddings
    assert "head.out.weight" in _names(r.adamw_decay)  # the output head is a matrix, but AdamW's
    assert all(p.ndim == 1 for n, p in r.adamw_no_decay if not n.startswith("embed."))
    assert r.reasons["head.out.weight"].startswith("output head")


def test_cnn_routes_conv_kernels_and_keeps_stem_and_head_on_adamw():
    cfg = Config.model_validate({"model": {"name": "cnn", "n_layer": 2, "width": 8}, "data": {"name": "digits"}})
    model = build_model(cfg.model, build_dataset(cfg.data, 16).info)
    r = route_parameters(model, num_outputs=10)
    assert _names(r.matrix) == {"blocks.0.conv.weight", "blocks.1.conv.weight"}
    assert all(p.ndim == 4 for _, p in r.matrix)
    assert "embed.0.weight" in _names(r.adamw_decay) and "head.2.weight" in _names(r.adamw_decay)


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.table = nn.Parameter(torch.zeros(3, 4))  # a raw 2-D parameter: no role to infer


def test_unrouted_matrix_is_an_error_naming_it():
    with pytest.raises(UserError, match=r"table .*optim.matrix.matrix_params"):
        route_parameters(Odd())
    r = route_parameters(Odd(), adamw_patterns=["table"])
    assert "table" in _names(r.adamw_decay) and _names(r.matrix) == {"fc.weight"}
    r = route_parameters(Odd(), matrix_patterns=["tab*"])
    assert _names(r.matrix) == {"fc.weight", "table"}


def test_one_dimensional_parameter_cannot_be_forced_to_muon():
    with pytest.raises(UserError, match="fc.bias"):
        route_parameters(Odd(), matrix_patterns=["fc.*"], adamw_patterns=["table"])


def test_spec_keeps_lr_ratio_and_names_self_reduced_parameters():
    cfg = Config.model_validate({"model": {"name": "gpt", "n_layer": 1, "width": 16, "n_head": 2, "block_size": 8},
                                 "optim": {"name": "muon", "lr": 0.02, "matrix": {"adamw_lr": 0.004}}})
    model = build_model(cfg.model, build_dataset(cfg.data, 8).info)
    spec = optimizer_spec(cfg.optim, model, num_outputs=256)
    opt = spec.build()
    assert set(spec.self_reduced) == {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                                      "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight"}
    from dist_train.optim import set_lr

    set_lr(opt, 0.01)  # half the peak: both kinds of group follow, keeping their 5:1 ratio
    lrs = {g["algorithm"]: g["lr"] for g in opt.param_groups}
    assert lrs["muon"] == pytest.approx(0.01) and lrs["adamw"] == pytest.approx(0.002)
    assert set(opt.param_names.values()) == {n for n, _ in model.named_parameters()}


def test_owners_spread_each_bank_and_give_remainders_to_the_least_loaded():
    """Each bank is spread evenly (the reduce-scatter needs equal slots per rank); what does not divide
    goes to the ranks with the least NS cost so far, biggest banks first."""
    from dist_train.optim.owners import Bank, assign_owners, row_counts

    big = Bank(group=0, shape=(64, 64), params=[object()])        # cost 64^3
    mid = Bank(group=0, shape=(16, 32), params=[object()] * 3)    # cost 32*16^2 each
    load = assign_owners([mid, big], world=2)
    assert big.owner == [0]
    assert sorted(mid.owner) == [0, 1, 1]  # one each, the remainder to rank 1 (rank 0 holds the big one)
    assert load == [64**3 + 32 * 16**2, 2 * 32 * 16**2]
    assert mid.slots(2) == 2 and big.slots(2) == 1
    assert row_counts(5, 4) == [2, 2, 1, 0] and row_counts(3, 4) == [1, 1, 1, 0] and row_counts(8, 2) == [4, 4]
