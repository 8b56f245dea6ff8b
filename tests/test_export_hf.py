"""`dist-train export RUN --format hf`: a folder that `transformers.AutoModelForCausalLM.from_pretrained`
loads, with the logits of the model dist-train trained, from DDP, FSDP2, DeepSpeed ZeRO-3 and
2-stage pipeline checkpoints; and dist-train's own Llama written as HF's `LlamaForCausalLM`.

The independent checks: HF's model, built by `transformers` from the exported folder alone, gives
the run's last validation loss on the same batches, and the same logits as dist-train's own export
(`load_exported`) of the same checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_user_error, config_file, forked_cli, forked_run
from tiers import fast_first
from layouts import LAYOUTS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

YAML = """\
run: {{name: x}}
model: {{name: hf, hf_config: {folder}, block_size: 16}}
data: {{name: stdlib_bytes, max_bytes: 200000}}
train: {{batch_size: 8, steps: 3, log_every: 3, eval_batches: 2}}
optim: {{name: adamw, lr: 3.0e-3, warmup_steps: 1}}
runtime: {{threads: 1}}
telemetry: {{progress: "off", tensorboard: false}}
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("qwen")
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=64, tie_word_embeddings=True)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / "qwen3")
    return config_file(tmp_path_factory, YAML.format(folder=tmp / "qwen3"))


def _val_batches(n: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from dist_train.config.schema import DataSection
    from dist_train.data import build_dataset

    data = build_dataset(DataSection(name="stdlib_bytes", max_bytes=200000), block_size=16)
    sampler = data.sampler("val", 0, batch_size)
    return [data.get_batch("val", sampler.global_indices(i)) for i in range(n)]


def _round_trip(config: Path, tmp_path: Path, overrides: list[str]) -> None:
    """Train 2 ranks, export both formats; HF's model from the folder gives dist-train's logits and
    the run's last val_loss."""
    from dist_train.export import load_exported

    forked_run([str(config), f"run.dir={tmp_path}", *overrides], tmp_path, nproc=2)
    run = tmp_path / "x"
    folder, plain = tmp_path / "hf", tmp_path / "model.safetensors"
    for args in (["--format", "hf", "--out", str(folder)], ["--out", str(plain)]):
        done = forked_cli(["export", str(run), *args], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors"}

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ours = load_exported(plain).eval()
    want = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
    losses = []
    with torch.no_grad():
        for x, y in _val_batches(2, 8):
            logits = hf(x).logits
            assert torch.allclose(logits, ours(x), atol=1e-5, rtol=0)
            losses.append(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())))
    assert sum(losses) / len(losses) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("layout", fast_first("ddp", *sorted(set(LAYOUTS) - {"ddp"})))
def test_hf_export_loads_in_transformers_with_the_runs_logits(layout: str, config: Path, tmp_path: Path) -> None:
    _round_trip(config, tmp_path, LAYOUTS[layout])


@pytest.mark.slow
def test_a_llama_run_exports_as_llama_for_causal_lm(config: Path, tmp_path: Path) -> None:
    llama = ["model.name=llama", "model.flavor=debug", "model.n_layer=2", "model.width=32", "model.n_head=4",
             "model.n_kv_heads=2", "model.multiple_of=16", "model.tie_embeddings=true"]
    cfg = tmp_path / "llama.yaml"
    cfg.write_text(config.read_text().replace(config.read_text().split("\n")[1], "model: {name: llama, block_size: 16}"))
    _round_trip(cfg, tmp_path, llama + LAYOUTS["fsdp"])
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and written["tie_word_embeddings"] is True


def test_a_model_without_an_hf_counterpart_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "mlp.yaml"
    cfg.write_text("run: {name: m}\nmodel: {name: mlp, n_layer: 2, width: 16}\ndata: {name: digits}\n"
                   "train: {batch_size: 8, steps: 1, eval_batches: 1}\nruntime: {threads: 1}\n"
                   "telemetry: {progress: \"off\", tensorboard: false}\n")
    forked_run([str(cfg), f"run.dir={tmp_path}"], tmp_path)
    assert_user_error(forked_cli(["export", str(tmp_path / "m"), "--format", "hf"], tmp_path),
                      "model.name mlp", "no Hugging Face counterpart")
    assert not (tmp_path / "m" / "export").exists()


@pytest.mark.parametrize("tied, scaled", [(False, False), (True, True)])
def test_llama_writes_as_llama_for_causal_lm(tied: bool, scaled: bool, tmp_path: Path) -> None:
    from dist_train.export_hf import write_hf_folder
    from dist_train.models.llama import Llama, RopeScaling

    torch.manual_seed(0)
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context=32) if scaled else None
    model = Llama(vocab_size=256, n_layer=2, width=32, n_head=4, n_kv_heads=2, hidden=64, block_size=16,
                  rope_theta=10000.0, rope_scaling=scaling, norm_eps=1e-5, tie_embeddings=tied).eval()
    write_hf_folder(model, tmp_path / "hf", "model.name llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x), atol=1e-5, rtol=0)


def test_the_tokenizer_travels_with_the_model(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from dist_train.export_hf import write_hf_folder
    from dist_train.models.llama import Llama

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["def f(x): return x + 1"] * 20, trainers.BpeTrainer(vocab_size=280))
    tok.save(str(tmp_path / "tokenizer.json"))
    model = Llama(vocab_size=tok.get_vocab_size(), n_layer=1, width=16, n_head=2, n_kv_heads=2, hidden=32,
                  block_size=8)
    write_hf_folder(model, tmp_path / "hf", "model.name llama", tokenizer=str(tmp_path / "tokenizer.json"))
    loaded = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    assert loaded("def f(x)")["input_ids"] == tok.encode("def f(x)").ids


@pytest.mark.slow
def test_a_token_bin_run_exports_its_tokenizer(tmp_path: Path) -> None:
    """Shards and tokenizer.json from `dist-train prepare-data`; the exported folder loads with
    AutoTokenizer and encodes as the data's tokenizer does."""
    from tokenizers import Tokenizer

    words = ["def", "return", "class", "import", "self", "if", "else", "for", "in", "range"]
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=gen).tolist()) for _ in range(1500)]
    (tmp_path / "text.txt").write_text("\n".join(lines))
    done = forked_cli(["prepare-data", str(tmp_path / "text.txt"), "--train-bpe", "300", "--out", str(tmp_path / "tok")],
                      tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=32)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "llama")
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"run: {{name: t, dir: {tmp_path}}}\nmodel: {{name: hf, hf_config: {tmp_path / 'llama'}, block_size: 16}}\n"
                    f"data: {{name: token_bin, path: {tmp_path / 'tok'}/train_*.bin}}\n"
                    "train: {batch_size: 4, steps: 1, eval_batches: 1}\nruntime: {threads: 1}\n"
                    "telemetry: {progress: \"off\", tensorboard: false}\n")
    forked_run([str(yaml)], tmp_path)
    done = forked_cli(["export", str(tmp_path / "t"), "--format", "hf", "--out", str(tmp_path / "hf")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    want = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")).encode(lines[0]).ids
    assert loaded(lines[0])["input_ids"] == want
    vocab = json.loads((tmp_path / "tok" / "meta.json").read_text())["vocab_size"]  # <= 300: the config's is trimmed
    assert transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).config.vocab_size == vocab


@pytest.mark.parametrize("family", ["gpt2", "mistral", "qwen2"])
def test_every_hf_family_writes_back_as_itself(family: str, tmp_path: Path) -> None:
    """An hf model of each family, its weights changed (as training would), written and loaded by
    transformers: same class, same logits (GPT-2's Conv1D weights keep their layout)."""
    from test_hf_models import build, hf_folder

    from dist_train.export_hf import write_hf_folder

    folder, ref = hf_folder(tmp_path, family)
    model = build(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    write_hf_folder(model, tmp_path / "out", "model.name hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(hf) is type(ref)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x), atol=1e-5, rtol=0)
