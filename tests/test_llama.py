"""The Llama 3 decoder (`model.name: llama`) against Hugging Face `transformers`, built offline from
a config: logits of the same weights, parameter counts of the published shapes, the FLOPs formula,
optimizer routing, per-example gradients for DP-SGD, its config keys, and the distributed paths
(FSDP2 on 2 ranks, a 2-stage DGL pipeline) against their single-process references.

Tolerances: logits 1e-5 absolute in float32 (the two models do the same arithmetic in a slightly
different order; observed ~1e-7 at logits of size ~1); per-example norms rtol 1e-5 / atol 1e-6 as
the privacy layer tests; distributed runs as tests/test_backends_multiproc.py and
tests/test_local_pipeline.py (1e-4 on the loss and 1e-3 on the gradient norm; 1e-5 per stage loss).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cli_helpers import assert_user_error, forked_cli, forked_run
from local_models import assert_stages_match_reference
from dist_train.config import load_config
from dist_train.config.schema import Config
from dist_train.errors import UserError
from dist_train.models.llama import FLAVORS, Llama, LlamaOptions, LlamaSpec, RopeScaling, ffn_hidden
from dist_train.optim import optimizer_spec
from dist_train.optim.routing import route_parameters
from dist_train.privacy import per_sample_grad_norms
from dist_train.privacy.layers import EmbeddingRule, LinearRule, RMSNormRule, rule_for
from dist_train.train.local_reference import local_reference
from dp_reference import single_example_grad_norms

os.environ["HF_HUB_OFFLINE"] = "1"  # a hidden hub call fails instead of hanging
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
V, W, L, H, KV, HIDDEN, T = 97, 64, 2, 8, 2, 160, 32  # GQA: 4 query heads per key/value head


def hf_llama(model: Llama, hidden: int, rope_theta: float, scaling, tie: bool):
    """Hugging Face's LlamaForCausalLM of `model`'s shape, holding `model`'s weights (copied by name)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {} if scaling is None else {"rope_scaling": {
        "rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor, "original_max_position_embeddings": scaling.original_context}}
    cfg = LlamaConfig(vocab_size=model.vocab_size, hidden_size=model.width, intermediate_size=hidden,
                      num_hidden_layers=model.n_layer, num_attention_heads=model.n_head,
                      num_key_value_heads=model.n_kv_heads, rope_theta=rope_theta, rms_norm_eps=1e-5,
                      tie_word_embeddings=tie, max_position_embeddings=model.block_size,
                      attention_bias=False, mlp_bias=False, attn_implementation="eager", **rope)
    hf = LlamaForCausalLM(cfg).eval()
    names = {"model.embed_tokens.weight": "embed.tok.weight", "model.norm.weight": "head.norm.weight",
             "lm_head.weight": "head.output.weight"}
    per_layer = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                 "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                 "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
                 "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
                 "post_attention_layernorm": "ffn_norm"}
    for i in range(model.n_layer):
        names.update({f"model.layers.{i}.{a}.weight": f"blocks.{i}.{b}.weight" for a, b in per_layer.items()})
    ours = dict(model.named_parameters(remove_duplicate=False))
    hf.load_state_dict({hf_name: ours[name].detach().clone() for hf_name, name in names.items()}, strict=True)
    return hf


def _randomised(model: nn.Module) -> nn.Module:
    """Weights far from the init (norm gains away from 1 too), so that a wrong pairing of rotary
    dimensions, head grouping or gain shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    return model


SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context=16)


@pytest.mark.parametrize("kv", [KV, H], ids=["gqa", "mha"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("scaling", [None, SCALING], ids=["rope", "rope_scaled"])
def test_logits_equal_hugging_face(scaling, tie, kv):
    torch.manual_seed(0)
    model = _randomised(Llama(V, L, W, H, kv, HIDDEN, T, rope_theta=10000.0, rope_scaling=scaling,
                              tie_embeddings=tie)).eval()
    hf = hf_llama(model, HIDDEN, 10000.0, scaling, tie)
    x = torch.randint(0, V, (3, T))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert ours.abs().max() > 0.5  # not vacuous: logits of size ~1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    if tie:
        assert model.head.output.weight is model.embed.tok.weight


def test_rope_scaling_changes_the_model():
    """The scaled case above is not the unscaled one in disguise: at this context the scaling moves logits."""
    torch.manual_seed(0)
    model = _randomised(Llama(V, L, W, H, KV, HIDDEN, T, rope_theta=10000.0, rope_scaling=SCALING)).eval()
    x = torch.randint(0, V, (2, T))
    with torch.no_grad():
        scaled = model(x)
        for block in model.blocks:
            block.rope_scaling = None
        plain = model(x)
    assert (scaled - plain).abs().max() > 1e-2


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_meta_build_then_to_empty_and_init_weights(tie):
    """Built on meta, moved with to_empty, initialised in place: a working model (no buffer left
    uninitialised: each block computes its rotary tables), tied again, and initialised as documented."""
    with torch.device("meta"):
        model = Llama(V, 4, 256, H, KV, 512, T, tie_embeddings=tie)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert (model.head.output.weight is model.embed.tok.weight) == tie
    assert model.embed.tok.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for i, block in enumerate(model.blocks):  # residual projections scaled by depth
        assert block.feed_forward.w2.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * (i + 1)), rel=0.05)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules() if isinstance(m, nn.RMSNorm))
    logits = model(torch.randint(0, V, (2, T)))
    assert torch.isfinite(logits).all() and logits.shape == (2, T, V)


# --- published shapes --------------------------------------------------------------------------

PUBLISHED = {"1B": 1_235_814_400, "3B": 3_212_749_824, "8B": 8_030_261_248, "70B": 70_553_706_496}
LLAMA3_VOCAB = 128_256


class _Info:
    vocab_size = LLAMA3_VOCAB


@pytest.mark.parametrize("flavor", ["debug", *PUBLISHED])
def test_flavour_parameter_counts_equal_hugging_face(flavor):
    from transformers import LlamaConfig, LlamaForCausalLM

    opts = LlamaOptions(flavor=flavor)
    with torch.device("meta"):
        ours = LlamaSpec.build(opts, _Info, block_size=8192)
        hf = LlamaForCausalLM(LlamaConfig(
            vocab_size=LLAMA3_VOCAB, hidden_size=opts.width, intermediate_size=opts.ffn_hidden,
            num_hidden_layers=opts.n_layer, num_attention_heads=opts.n_head, num_key_value_heads=opts.kv_heads,
            tie_word_embeddings=opts.tie_embeddings))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in hf.parameters())
    if flavor in PUBLISHED:
        assert count == PUBLISHED[flavor]


def test_ffn_hidden_rule():
    # Meta's rule by hand: 8B 4*4096 -> 2/3 -> 10922 -> x1.3 -> 14198 -> up to a multiple of 1024 = 14336.
    assert ffn_hidden(4096, 1024, 1.3) == 14336
    assert ffn_hidden(2048, 256, 1.5) == 8192 and ffn_hidden(3072, 256, 1.0) == 8192
    assert ffn_hidden(8192, 4096, 1.3) == 28672 and ffn_hidden(256, 256, None) == 768


def test_num_flops_per_token_formula():
    opts = LlamaOptions(flavor="8B")
    with torch.device("meta"):
        model = LlamaSpec.build(opts, _Info, block_size=8192)
    d, kv_dim, f, n_layer, n_head, q = 4096, 1024, 14336, 32, 32, 128
    per_layer = d * d + 2 * d * kv_dim + d * d + 3 * d * f + 2 * d  # q, k, v, o; w1, w2, w3; two norms
    n = n_layer * per_layer + d + LLAMA3_VOCAB * d  # blocks, final norm, output projection (no embedding)
    for t in (8192, 2048):
        assert model.num_flops_per_token(t) == 6 * n + 12 * n_layer * n_head * q * t
    assert model.num_flops_per_token() == model.num_flops_per_token(8192)
    # Tied: the output matmul still runs, so it still counts.
    tied = Llama(V, L, W, H, KV, HIDDEN, T, tie_embeddings=True)
    untied = Llama(V, L, W, H, KV, HIDDEN, T, tie_embeddings=False)
    assert tied.num_flops_per_token() == untied.num_flops_per_token()


# --- optimizer routing and DP-SGD --------------------------------------------------------------

MATRICES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_muon_routing_by_role(tie):
    model = Llama(V, L, W, H, KV, HIDDEN, T, tie_embeddings=tie)
    r = route_parameters(model, num_outputs=V)
    assert {n for n, _ in r.matrix} == {f"blocks.{i}.{m}.weight" for i in range(L) for m in MATRICES}
    adamw = {n for n, _ in r.adamw_decay + r.adamw_no_decay}
    norms = {f"blocks.{i}.{m}.weight" for i in range(L) for m in ("attention_norm", "ffn_norm")} | {"head.norm.weight"}
    assert adamw == {"embed.tok.weight", *norms, *(() if tie else ("head.output.weight",))}
    assert r.reasons["embed.tok.weight"] == "embedding"
    if not tie:
        assert r.reasons["head.output.weight"].startswith("output head")
    # Every parameter exactly once, so the optimizers build (NorMuon + its AdamW groups).
    assert sorted(id(p) for _, p in r.matrix + r.adamw_decay + r.adamw_no_decay) == sorted(id(p) for p in model.parameters())
    cfg = Config.model_validate({"optim": {"name": "normuon"}})
    optimizer_spec(cfg.optim, model, num_outputs=V).build()


def test_adamw_groups_hold_a_tied_table_once():
    from dist_train.optim.build import param_groups

    model = Llama(V, L, W, H, KV, HIDDEN, T, tie_embeddings=True)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert sorted(id(p) for p in decay["params"] + no_decay["params"]) == sorted(id(p) for p in model.parameters())
    assert any(p is model.embed.tok.weight for p in no_decay["params"])  # an embedding: no decay
    torch.optim.AdamW([decay, no_decay])


def _sum_loss(logits, targets):
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def test_dp_per_example_grads_match_single_example_backward():
    torch.manual_seed(0)
    model = _randomised(Llama(V, L, W, H, KV, HIDDEN, 12))
    # Every layer with parameters has a built-in rule (no torch.func fallback).
    kinds = {type(m): type(rule_for(m)) for m in model.modules() if list(m.parameters(recurse=False))}
    assert kinds == {nn.Embedding: EmbeddingRule, nn.Linear: LinearRule, nn.RMSNorm: RMSNormRule}
    x, t = torch.randint(0, V, (4, 12)), torch.randint(0, V, (4, 12))
    got = per_sample_grad_norms(model, _sum_loss, x, t)
    torch.testing.assert_close(got, single_example_grad_norms(model, _sum_loss, x, t), rtol=1e-5, atol=1e-6)


def test_dp_refuses_tied_embeddings_by_name():
    model = Llama(V, L, W, H, KV, HIDDEN, 12, tie_embeddings=True)
    x, t = torch.randint(0, V, (2, 12)), torch.randint(0, V, (2, 12))
    with pytest.raises(UserError, match=r"head.output.weight is the same tensor as embed.tok.weight"):
        per_sample_grad_norms(model, _sum_loss, x, t)


class _OldStyleScale(torch.autograd.Function):
    """An old-style autograd.Function (no setup_context), as fused kernels often are: torch.func
    cannot transform it, so DP-SGD's generic fallback cannot serve a layer built on it."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        return gy * w, (gy * x).reshape(-1, w.numel()).sum(0)


class FusedNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return _OldStyleScale.apply(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5), self.weight)


def test_dp_refuses_an_unknown_layer_by_name():
    model = Llama(V, L, W, H, KV, HIDDEN, 12)
    model.blocks[1].ffn_norm = FusedNorm(W)
    x, t = torch.randint(0, V, (2, 12)), torch.randint(0, V, (2, 12))
    with pytest.raises(UserError, match=r"FusedNorm has no DP layer rule .*register_rule"):
        per_sample_grad_norms(model, _sum_loss, x, t)


# --- config keys -------------------------------------------------------------------------------

def test_flavour_then_overrides():
    o = LlamaOptions(flavor="8B", n_layer=2)
    assert (o.width, o.n_layer, o.n_head, o.kv_heads, o.ffn_hidden, o.tie_embeddings) == (4096, 2, 32, 8, 14336, False)
    assert o.rope_scaling.factor == 8.0 and o.rope_scaling.original_context == 8192
    assert LlamaOptions(flavor="1B").tie_embeddings and LlamaOptions(flavor="3B").rope_scaling.factor == 32.0
    assert LlamaOptions(flavor="8B", rope_scaling=None).rope_scaling is None  # explicit null turns it off
    assert LlamaOptions(flavor="debug", n_kv_heads=None).kv_heads == 16
    partial = LlamaOptions(flavor="1B", rope_scaling={"original_context": 4096})
    assert (partial.rope_scaling.factor, partial.rope_scaling.original_context) == (32.0, 4096)
    d = LlamaOptions()
    assert (d.flavor, d.width, d.n_layer, d.n_head, d.kv_heads) == ("debug", 256, 6, 16, 4)
    assert set(FLAVORS) == {"debug", "1B", "3B", "8B", "70B"}


def test_resolved_config_round_trips(tmp_path):
    """The run directory's config.yaml spells out every key of the flavour and loads back the same."""
    from dist_train.config.load import dump_config

    cfg = load_config(ROOT / "configs" / "llama3_8b.yaml", [f"data.path={tmp_path / 'train.bin'}", "model.n_layer=2"])
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    again = load_config(tmp_path / "config.yaml")
    assert again.model.options() == cfg.model.options() and again.model.rope_scaling.factor == 8.0


@pytest.mark.parametrize("overrides, words", [
    (["model.flavor=9B"], "model.flavor: expected one of 'debug', '1B', '3B', '8B' or '70B', got '9B'"),
    (["model.n_kv_heads=3"], "model.n_kv_heads (3) must divide model.n_head"),
    (["model.rope_scaling.factor=-1"], "model.rope_scaling.factor"),
    (["model.tie_embeddings=true"], "model.tie_embeddings: a local pipeline"),
])
def test_bad_keys_are_one_line(tmp_path, overrides, words):
    # The quickstart is a 2-stage pipeline: tied embeddings are refused there, by name.
    proc = forked_cli(["plan", "quickstart.yaml", "model.name=llama", "model.n_head=4", *overrides], tmp_path)
    assert_user_error(proc, words)


def test_tied_embeddings_are_fine_without_a_pipeline():
    cfg = load_config(None, ["model.name=llama", "model.flavor=1B", "parallel.stages=1", "model.n_layer=1",
                             "model.width=32", "model.n_head=4", "model.n_kv_heads=2"])
    assert cfg.model.tie_embeddings and cfg.model.width == 32


# --- distributed runs against their single-process references ----------------------------------

TINY_LLAMA = ["model.name=llama", "model.n_layer=2", "model.width=32", "model.n_head=4", "model.n_kv_heads=2",
              "model.multiple_of=32", "model.block_size=16", "data.max_bytes=200000", "train.batch_size=8",
              "train.log_every=1", "optim.warmup_steps=2", "train.eval_batches=1", "telemetry.tensorboard=false",
              "checkpoint.every=0", "checkpoint.at_end=false"]
STEPS = 4


DATA_PARALLEL = {"fsdp": ["parallel.backend=fsdp"], "ddp": ["parallel.backend=ddp"],
                 "deepspeed": ["parallel.backend=deepspeed", "parallel.zero_stage=2"]}


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(DATA_PARALLEL))
def test_two_ranks_match_single_process(dt, tmp_path, backend):
    ref = dt.run(tmp_path / "ref", "single", *TINY_LLAMA, steps=STEPS)
    got = dt.forked(tmp_path / backend, backend, *TINY_LLAMA, *DATA_PARALLEL[backend], steps=STEPS,
                    env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")})
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for g, r in zip(got, ref):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-4) and g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-3)
    assert got[-1]["val_loss"] == pytest.approx(ref[-1]["val_loss"], rel=1e-4)
    assert ref[0]["loss"] == pytest.approx(math.log(256), rel=0.05)  # a fresh byte-level model: ~uniform


@pytest.mark.slow
def test_two_stage_dgl_pipeline_matches_sequential_reference(tmp_path):
    overrides = [*TINY_LLAMA, f"train.steps={STEPS}", "train.sample_tokens=0", "parallel.stages=2",
                 "local.method=dgl", "local.send_targets=true",
                 f"run.dir={tmp_path}", "run.name=pipe"]
    forked_run(["quickstart.yaml", *overrides], tmp_path, nproc=2, timeout=240)
    assert_stages_match_reference(tmp_path / "pipe", load_config(None, overrides))


@pytest.mark.parametrize("method", ["dgl", "mono_forward", "infopro", "auglocal", "tpsgd", "man", "noprop"])
def test_local_methods_build_and_train_llama_stages(tmp_path, method):
    """Every local method that reads token data builds its heads for the llama's [B, T, width] stage
    outputs (the GPT's kind) and trains two steps, stages one after the other in one process."""
    overrides = [*TINY_LLAMA, "train.steps=2", "train.sample_tokens=0", "parallel.stages=2",
                 f"local.method={method}", f"run.dir={tmp_path}", "run.name=m"]
    losses = local_reference(load_config(None, overrides))["losses"]
    assert len(losses) == 2 and all(len(stage) == 2 and all(map(math.isfinite, stage)) for stage in losses)


def test_forward_forward_refuses_a_language_model(tmp_path):
    overrides = [*TINY_LLAMA, "train.steps=1", "parallel.stages=2", "local.method=forward_forward", f"run.dir={tmp_path}"]
    with pytest.raises(UserError, match="forward_forward needs a classifier"):
        local_reference(load_config(None, overrides))


def test_plan_8b_on_64_ranks(tmp_path):
    from dist_train.data.token_bin import write_token_bin

    shard = tmp_path / "fineweb_train_000001.bin"
    write_token_bin(shard, np.arange(100_000) % 50_000)  # val split (10%) > one 8193-token window
    start = time.monotonic()
    proc = forked_cli(["plan", str(ROOT / "configs" / "llama3_8b.yaml"), "--nproc", "64", f"data.path={shard}"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - start < 30
    assert "8.03 B parameters (8,030,261,248)" in proc.stdout and "flavor 8B" in proc.stdout
    assert "memory/rank" in proc.stdout and "dp=64" in proc.stdout


def test_swiglu_matches_its_formula_and_its_gradient():
    """The memory-saving SwiGLU (keeps only its two inputs for backward) against silu(a) * b written
    out, values and gradients in float64 (torch.autograd.gradcheck's finite differences too)."""
    from dist_train.models.llama import swiglu

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 5, 7, dtype=torch.float64, generator=g)
    ours = swiglu(a, b)
    ref = a * torch.sigmoid(a) * b
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-15)
    ga, gb = torch.autograd.grad((ours * w).sum(), (a, b))
    ra, rb = torch.autograd.grad((ref * w).sum(), (a, b))
    torch.testing.assert_close(ga, ra, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gb, rb, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(swiglu, (a, b))
