"""`model.name: hf`: Hugging Face causal LMs trained by dist-train, built offline from small configs.

The references are `transformers` itself: the `*ForCausalLM` built from the same config and
weights gives the same logits, and its own loss (which shifts the labels inside: logits at
positions 0..T-2 against tokens 1..T-1) equals dist-train's loss on the first T-1 positions. The
security cases use crafted model folders: remote code (`auto_map`), a pickled `.bin` that would
run a command, a hub id.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_user_error, config_file, forked_cli, forked_run
from dp_reference import single_example_grad_norms

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

VOCAB = 256  # the byte corpus'
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def hf_config(family: str, vocab: int = VOCAB, **extra):
    """A small config of `family` (GQA where the family has it; Mistral with a sliding window that
    the test's sequences exceed, so that its mask is really the sliding one)."""
    small = {**SMALL, "vocab_size": vocab, **extra}
    if family == "llama":
        return transformers.LlamaConfig(**small)
    if family == "qwen2":
        return transformers.Qwen2Config(**small)
    if family == "qwen3":
        return transformers.Qwen3Config(**small, head_dim=8)
    if family == "mistral":
        return transformers.MistralConfig(**small, sliding_window=8)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, **extra)
    raise KeyError(family)


def hf_folder(tmp: Path, family: str, vocab: int = VOCAB, seed: int = 0, **extra) -> tuple[Path, torch.nn.Module]:
    """An HF model folder (config.json + model.safetensors) and the HF model it holds."""
    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(hf_config(family, vocab, **extra)).eval()
    folder = tmp / f"{family}-model"
    ref.save_pretrained(folder)
    return folder, ref


def build(folder: Path, vocab: int = VOCAB, block_size: int = 16, **extra):
    from dist_train.config.schema import ModelSection
    from dist_train.data.base import DataInfo
    from dist_train.models import build_model

    info = DataInfo(task="lm", vocab_size=vocab, input_shape=None, num_classes=None, train_size=0, val_size=0)
    return build_model(ModelSection(name="hf", hf_config=str(folder), block_size=block_size, **extra), info).eval()


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "gpt2"])
def test_loss_equals_hfs_own_shifted_loss(family: str, tmp_path: Path) -> None:
    folder, ref = hf_folder(tmp_path, family)
    model = build(folder)
    x = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=x, labels=x).loss  # HF shifts: logits[:, :-1] against x[:, 1:]
        got = model.loss(model(x[:, :-1]), x[:, 1:])
    assert float(got) == pytest.approx(float(want), abs=1e-5)
    assert abs(float(want) - torch.log(torch.tensor(float(VOCAB)))) < 1.0  # a real loss, not a constant


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gpt2"])
def test_logits_equal_hfs(family: str, tmp_path: Path) -> None:
    folder, ref = hf_folder(tmp_path, family)
    model = build(folder)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x).logits, atol=1e-5, rtol=0)
    # A stage boundary carries the hidden states only: blocks chained by hand give the same logits.
    with torch.no_grad():
        h = model.embed(x)
        for block in model.blocks:
            h = block(h.clone())
        assert torch.allclose(model.head(h), ref(x).logits, atol=1e-5, rtol=0)
        # HF's eager attention takes the mask each block builds (SDPA's causal path needs none)
        assert torch.allclose(build(folder, hf_attn_implementation="eager")(x), ref(x).logits, atol=1e-5, rtol=0)


def test_the_protocol_and_the_parameter_roles(tmp_path: Path) -> None:
    from dist_train.optim.routing import route_parameters

    folder, ref = hf_folder(tmp_path, "llama")
    model = build(folder)
    assert len(model.blocks) == 2 and isinstance(model.blocks, torch.nn.ModuleList)
    routes = route_parameters(model, num_outputs=VOCAB)
    matrix = {n for n, _ in routes.matrix}
    assert "blocks.0.layer.self_attn.q_proj.weight" in matrix and "blocks.1.layer.mlp.down_proj.weight" in matrix
    assert routes.reasons["embed.embed_tokens.weight"] == "embedding"
    assert routes.reasons["head.lm_head.weight"].startswith("output head")
    # 6 N + 12 L H Q T, N without the embedding (the head counted)
    n = sum(p.numel() for p in ref.parameters()) - ref.model.embed_tokens.weight.numel()
    if ref.lm_head.weight is ref.model.embed_tokens.weight:
        n += ref.lm_head.weight.numel()
    assert model.num_flops_per_token(16) == 6 * n + 12 * 2 * 4 * 8 * 16


def test_tied_embeddings_are_untied_and_a_smaller_data_vocabulary_trims(tmp_path: Path) -> None:
    folder, ref = hf_folder(tmp_path, "qwen3", vocab=300, tie_word_embeddings=True)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    model = build(folder, vocab=VOCAB)
    assert model.head.lm_head.weight is not model.embed.embed_tokens.weight
    assert model.head.lm_head.weight.shape[0] == VOCAB == model.hf_config.vocab_size
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x).logits[..., :VOCAB], atol=1e-5, rtol=0)


def test_the_hf_rms_norm_rule_gives_the_per_example_gradients(tmp_path: Path) -> None:
    from dist_train.privacy.layers import FuncRule, rule_for

    folder, _ = hf_folder(tmp_path, "qwen3")
    norm = build(folder).head.norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    rule = rule_for(norm)
    assert rule is not None and type(rule).__name__ == "HFRMSNormRule"
    a, g = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    got, want = rule.instantiate(norm, a, g)["weight"], FuncRule().instantiate(norm, a, g)["weight"]
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_dp_per_example_norms_equal_one_backward_per_example(family: str, tmp_path: Path) -> None:
    from dist_train.privacy import per_sample_grad_norms

    folder, _ = hf_folder(tmp_path, family)
    model = build(folder, block_size=8)
    with torch.no_grad():  # norm gains away from 1, so that their gradients matter
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)

    def sum_loss(out, t):
        return torch.nn.functional.cross_entropy(out.flatten(0, 1), t.flatten(), reduction="sum")

    x, t = torch.randint(0, VOCAB, (3, 8)), torch.randint(0, VOCAB, (3, 8))
    got = per_sample_grad_norms(model, sum_loss, x, t)
    torch.testing.assert_close(got, single_example_grad_norms(model, sum_loss, x, t), rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradients(tmp_path: Path) -> None:
    from dist_train.parallel.activation_checkpointing import apply_activation_checkpointing

    folder, _ = hf_folder(tmp_path, "mistral")
    plain, wrapped = build(folder).train(), apply_activation_checkpointing(build(folder).train())
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(6))
    for m in (plain, wrapped):
        m.loss(m(x[:, :-1]), x[:, 1:]).backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), wrapped.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert list(wrapped.state_dict()) == list(plain.state_dict())  # checkpoints move between the two


# --- weights, remote code and the pickle scan ------------------------------------------------------

def test_weights_load_from_a_file_and_from_a_scanned_bin(tmp_path: Path) -> None:
    folder, ref = hf_folder(tmp_path, "llama", seed=5)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    bin_file = tmp_path / "pytorch_model.bin"
    torch.save(state, bin_file)
    x = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((folder / "config.json").read_text())
    with torch.no_grad():
        want = ref(x).logits
        for weights in (bin_file, folder / "model.safetensors"):
            assert torch.allclose(build(config_only, hf_weights=str(weights))(x), want, atol=1e-5)
        fresh = build(config_only)(x)  # no weights: a fresh init, not the reference's
    assert not torch.allclose(fresh, want, atol=1e-3)


class _RunsACommand:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _errors(fn) -> str:
    from dist_train.errors import UserError

    with pytest.raises(UserError) as e:
        fn()
    return str(e.value)


def test_unsafe_bin_remote_code_and_hub_ids_are_refused(tmp_path: Path) -> None:
    folder, _ = hf_folder(tmp_path, "llama")
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((folder / "config.json").read_text())
    with open(evil / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": _RunsACommand()}, fh)
    assert "system" in _errors(lambda: build(evil)) and "pytorch_model.bin" in _errors(lambda: build(evil))

    remote = tmp_path / "remote"
    remote.mkdir()
    raw = json.loads((folder / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**raw, "auto_map": {"AutoModelForCausalLM": "x.Evil"}}))
    assert "remote code" in _errors(lambda: build(remote)) and "hf_trust_remote_code" in _errors(lambda: build(remote))

    assert "does not exist locally" in _errors(lambda: build(Path("Qwen/Qwen3-0.6B")))
    other_shape, _ = hf_folder(tmp_path / "wide", "llama", vocab=VOCAB + 8)
    assert "does not fit model.hf_config" in _errors(
        lambda: build(folder, hf_weights=str(other_shape / "model.safetensors")))
    (tmp_path / "empty").mkdir()
    assert "holds no model" in _errors(lambda: build(folder, hf_weights=str(tmp_path / "empty")))
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "'bert' is not supported" in _errors(lambda: build(other))
    big = _errors(lambda: build(folder, vocab=VOCAB + 1))
    assert f"({VOCAB + 1})" in big and f"({VOCAB})" in big
    assert "max_position_embeddings (64)" in _errors(lambda: build(folder, block_size=65))


def test_remote_code_runs_only_when_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder whose config names its own classes (auto_map): refused by default; with
    model.hf_trust_remote_code its code is what builds the model."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not the user's cache
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "configuration_mine.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass MineConfig(LlamaConfig):\n    model_type = 'llama'\n")
    (folder / "modeling_mine.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_mine import MineConfig\n\n\n"
        "class MineForCausalLM(LlamaForCausalLM):\n    config_class = MineConfig\n")
    raw = hf_config("llama").to_dict()
    raw["auto_map"] = {"AutoConfig": "configuration_mine.MineConfig", "AutoModelForCausalLM": "modeling_mine.MineForCausalLM"}
    (folder / "config.json").write_text(json.dumps(raw))
    assert "hf_trust_remote_code" in _errors(lambda: build(folder))
    model = build(folder, hf_trust_remote_code=True)
    assert model.architecture == "MineForCausalLM" and type(model.hf_config).__name__ == "MineConfig"


YAML = """\
run: {{name: h}}
model: {{name: hf, hf_config: {folder}, block_size: 16}}
data: {{name: stdlib_bytes, max_bytes: 200000}}
train: {{batch_size: 8, steps: 4, log_every: 1, eval_batches: 1}}
optim: {{name: adamw, lr: 3.0e-3, warmup_steps: 2}}
runtime: {{threads: 1}}
checkpoint: {{every: 0, at_end: false}}
telemetry: {{progress: "off", tensorboard: false}}
"""


@pytest.fixture(scope="module")
def qwen_config(tmp_path_factory) -> Path:
    folder, _ = hf_folder(tmp_path_factory.mktemp("qwen"), "qwen3")
    return config_file(tmp_path_factory, YAML.format(folder=folder))


@pytest.mark.parametrize("override, words", [
    ("model.hf_config=Qwen/Qwen3-0.6B", ["model.hf_config", "does not exist locally"]),
    ("model.hf_trust_remote_code=maybe", ["model.hf_trust_remote_code"]),
    ("model.hf_attn_implementation=flash", ["model.hf_attn_implementation", "'sdpa'", "'flash'"]),
])
def test_bad_input_is_one_line(qwen_config: Path, tmp_path: Path, override: str, words: list[str]) -> None:
    assert_user_error(forked_cli(["plan", str(qwen_config), override], tmp_path), *words)


def test_a_missing_hf_config_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: hf}\ndata: {name: stdlib_bytes, max_bytes: 200000}\n")
    assert_user_error(forked_cli(["plan", str(cfg)], tmp_path), "model.hf_config")


def test_remote_code_is_one_line(qwen_config: Path, tmp_path: Path) -> None:
    folder = Path(qwen_config.read_text().split("hf_config: ")[1].split(",")[0])
    remote = tmp_path / "remote"
    remote.mkdir()
    raw = json.loads((folder / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**raw, "auto_map": {"AutoConfig": "c.C"}}))
    assert_user_error(forked_cli(["plan", str(qwen_config), f"model.hf_config={remote}"], tmp_path),
                      "remote code", "auto_map")


# --- distributed ---------------------------------------------------------------------------------

def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process(qwen_config: Path, tmp_path: Path) -> None:
    forked_run([str(qwen_config), f"run.dir={tmp_path}", "run.name=one", "parallel.backend=none"], tmp_path)
    forked_run([str(qwen_config), f"run.dir={tmp_path}", "run.name=two", "parallel.backend=fsdp"], tmp_path, nproc=2)
    one, two = _records(tmp_path / "one" / "metrics.jsonl"), _records(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-4)
    assert one[0]["loss"] != pytest.approx(one[-1]["loss"], rel=1e-3)  # it trains


@pytest.mark.slow
def test_two_stage_dgl_pipeline_matches_its_sequential_reference(qwen_config: Path, tmp_path: Path) -> None:
    from dist_train.config import load_config
    from local_models import assert_stages_match_reference

    overrides = [f"run.dir={tmp_path}", "run.name=pipe", "parallel.stages=2", "local.method=dgl",
                 "local.send_targets=true", "train.steps=5", "train.sample_tokens=4"]  # generation crosses the cut too
    forked_run([str(qwen_config), *overrides], tmp_path, nproc=2, timeout=240)
    assert_stages_match_reference(tmp_path / "pipe", load_config(qwen_config, overrides))
