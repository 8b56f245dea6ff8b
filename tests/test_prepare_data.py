"""`dist-train prepare-data`: local text -> a byte-level BPE (or a loaded tokenizer.json) -> llm.c
shards that token_bin reads, a model trains on, and whose sample decodes back to text."""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from dist_train.cli import main  # noqa: E402
from dist_train.config.schema import DataSection  # noqa: E402
from dist_train.data import build_dataset, open_token_bin  # noqa: E402
from dist_train.data.prepare import prepare_data, train_bpe  # noqa: E402
from dist_train.models.sampling import decode, prompt_ids  # noqa: E402
from dist_train.registry import MODELS  # noqa: E402

from cli_helpers import assert_user_error, clean_env, forked_cli  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# A few small stdlib modules: real, varied text (~60 KB), the same on every install of this Python.
TEXT = [str(STDLIB / name) for name in ("json", "csv.py", "bisect.py", "colorsys.py")]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A 600-id BPE trained on TEXT, its shards forced to uint32 (a vocabulary this small fits
    uint16; the flag makes the Llama 3 format testable without a 128k tokenizer) and small."""
    out = tmp_path_factory.mktemp("bpe") / "data"
    prepare_data(TEXT, str(out), train_bpe_vocab=600, dtype="uint32", shard_tokens=8_000, progress=False)
    return out


def test_byte_level_bpe_round_trips_text():
    texts = [(STDLIB / "bisect.py").read_text(), "héllo wörld €\r\n\ttabs  and  spaces\n\n", "😀 ünïcode ∑"]
    tok = train_bpe(iter(texts[:1] * 3), 400)
    for text in texts:  # text it never saw in training too: byte-level BPE covers every byte
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert tok.get_vocab_size() <= 400 and tok.token_to_id("<|endoftext|>") == 0


def test_prepare_data_writes_llmc_shards_token_bin_reads(bpe_dir):
    meta = json.loads((bpe_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 600 and meta["eot_id"] == 0
    assert len(meta["train_shards"]) > 1 and meta["text_files"] >= 4 and meta["skipped_files"] == 0
    total = meta["train_tokens"] + meta["val_tokens"]
    assert 0.05 < meta["val_tokens"] / total < 0.2  # --val-fraction 0.1, interleaved by pieces
    first = open_token_bin(bpe_dir / "train_000000.bin")
    assert first.dtype == np.uint32 and len(first) == 8_000 and first[0] == 0  # a file starts with end-of-text
    ds = build_dataset(DataSection(name="token_bin", path=str(bpe_dir / "train_*.bin")), block_size=32)
    assert (ds.info.train_size, ds.info.val_size) == (meta["train_tokens"], meta["val_tokens"])
    assert ds.info.vocab_size == 600 and ds.tokenizer_path == str(bpe_dir / "tokenizer.json")
    tok = Tokenizer.from_file(ds.tokenizer_path)
    # The shards hold the text: the first file's tokens decode to its beginning.
    head = tok.decode(first[1:200].tolist())
    assert head and Path(sorted(Path(TEXT[0]).glob("*.py"))[0]).read_text().startswith(head[:50])

    class Cfg:  # the two train.* keys generation reads
        class train:
            sample_prompt = "def "

    ids = prompt_ids(Cfg, ds)
    assert tok.decode(ids.tolist()) == "def " and decode(ids.tolist(), ds) == "def "


def test_loaded_tokenizer_encodes_like_the_trained_one(bpe_dir, tmp_path):
    meta = prepare_data([TEXT[1]], str(tmp_path / "again"), tokenizer=str(bpe_dir / "tokenizer.json"),
                        val_fraction=0.0, progress=False)
    assert meta["dtype"] == "uint16" and meta["val_tokens"] == 0 and meta["train_shards"] == ["train_000000.bin"]
    tok = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    expected = [0, *tok.encode(Path(TEXT[1]).read_text(), add_special_tokens=False).ids]
    # Pieces are encoded apart but cut after newlines, where byte-level pre-tokenization splits anyway.
    assert open_token_bin(tmp_path / "again" / "train_000000.bin").tolist() == expected
    # The end-of-text token's text inside a document stays text: only the file's start is a boundary.
    (tmp_path / "eot.txt").write_text("a = '<|endoftext|>'\n")
    prepare_data([str(tmp_path / "eot.txt")], str(tmp_path / "eot"), tokenizer=str(bpe_dir / "tokenizer.json"),
                 val_fraction=0.0, progress=False)
    ids = open_token_bin(tmp_path / "eot" / "train_000000.bin").tolist()
    assert ids.count(0) == 1 and ids[0] == 0 and tok.decode(ids[1:]) == "a = '<|endoftext|>'\n"


def _big_vocab_tokenizer(path: Path) -> None:
    """A word-level tokenizer of 70,000 ids: more than uint16 holds."""
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"] = 70_000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_prepare_data_bad_input_is_one_line(tmp_path, bpe_dir, capsys):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\0\1\2" * 100)
    (tmp_path / "bad.json").write_text("{not json")
    _big_vocab_tokenizer(tmp_path / "big.json")
    text = TEXT[1]
    cases = [
        (["prepare-data", str(tmp_path / "bin"), "--train-bpe", "500"], ["no text found"]),
        (["prepare-data", str(tmp_path / "nope"), "--train-bpe", "500"], ["no such file or folder"]),
        (["prepare-data", str(tmp_path / "*.txt"), "--train-bpe", "500"], ["no file matches"]),
        (["prepare-data", text, "--train-bpe", "200"], ["--train-bpe", "256"]),
        (["prepare-data", text, "--tokenizer", str(tmp_path / "bad.json")], ["not a readable tokenizer.json"]),
        (["prepare-data", text, "--tokenizer", "gpt2"], ["gpt2", "never downloads"]),
        (["prepare-data", text, "--tokenizer", "meta-llama/Meta-Llama-3-8B"], ["never downloads"]),
        (["prepare-data", text, "--tokenizer", str(tmp_path / "big.json"), "--dtype", "uint16"],
         ["--dtype uint16", "70001"]),
        (["prepare-data", text, "--train-bpe", "500", "--tokenizer", str(bpe_dir / "tokenizer.json")],
         ["not allowed with"]),
        (["prepare-data", text, "--train-bpe", "500", "--val-fraction", "1.5"], ["--val-fraction"]),
    ]
    for i, (args, needles) in enumerate(cases):
        args = [*args, "--out", str(tmp_path / "out")]
        # Two through a whole (forked) process; the rest through the same entry point in this one.
        proc = forked_cli(args, tmp_path) if i in (0, 8) else _in_process(args, capsys)
        assert_user_error(proc, *needles)
        assert not list(tmp_path.glob("out/*.bin"))
    # An out folder that already holds shards is refused (a mix of two corpora otherwise).
    assert_user_error(_in_process(["prepare-data", text, "--train-bpe", "500", "--out", str(bpe_dir)], capsys),
                      "already holds token shards")


def _in_process(args: list[str], capsys) -> subprocess.CompletedProcess:
    """`dist-train ARGS` through `dist_train.cli.main` in this process: exit status, stdout, stderr."""
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as e:  # argparse's errors
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["dist-train", *args], code, out, err)


def test_large_vocabulary_uint32_shards(tmp_path):
    """A tokenizer of more than 65,536 ids gets uint32 shards, and the data set reports its vocabulary."""
    _big_vocab_tokenizer(tmp_path / "big.json")
    (tmp_path / "t.txt").write_text("".join(f"w{(i * 7919) % 70_000}" + ("\n" if i % 10 == 9 else " ")
                                            for i in range(4000)))
    meta = prepare_data([str(tmp_path / "t.txt")], str(tmp_path / "out"), tokenizer=str(tmp_path / "big.json"),
                        val_fraction=0.2, progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001 and meta["eot"] is None
    ds = build_dataset(DataSection(name="token_bin", path=str(tmp_path / "out" / "train_*.bin")), block_size=16)
    assert ds.info.vocab_size == 70_001
    x, _ = ds.get_batch("train", torch.tensor([0]))
    assert int(x.max()) > 65_535 or int(ds._splits["train"].arrays[0].max()) > 65_535


@pytest.mark.parametrize("model", [
    "gpt",
    pytest.param("llama", marks=pytest.mark.skipif("llama" not in MODELS, reason="the llama model is not registered")),
])
def test_train_on_prepared_shards_and_decode_the_sample(bpe_dir, tmp_path, model):
    shapes = {"gpt": "{name: gpt, n_layer: 1, width: 32, n_head: 2, block_size: 32}",
              "llama": "{name: llama, n_layer: 1, width: 32, n_head: 4, n_kv_heads: 2, multiple_of: 16, "
                       "block_size: 32}"}[model]
    (tmp_path / "c.yaml").write_text(f"""\
run: {{name: bpe, dir: {tmp_path / 'runs'}}}
model: {shapes}
data: {{name: token_bin, path: {bpe_dir / 'train_*.bin'}}}
train: {{batch_size: 4, steps: 2, log_every: 1, eval_batches: 1, sample_tokens: 16, sample_prompt: "import "}}
runtime: {{threads: 1}}
telemetry: {{progress: "off"}}
""")
    proc = forked_cli(["run", "c.yaml"], tmp_path, env=clean_env(HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sample = (tmp_path / "runs" / "bpe" / "sample.txt").read_text()
    assert sample.startswith("import ") and len(sample) > len("import ")
    # Decoded text, not ids: the sample is what the tokenizer makes of 16 sampled ids.
    assert not sample[len("import "):].replace(" ", "").isdigit()


def test_llama_debug_config_reads_prepared_shards(bpe_dir, tmp_path):
    """configs/llama_debug.yaml trains on data/stdlib_bpe/ from prepare-data; without it, one line says so."""
    config = str(Path(__file__).resolve().parents[1] / "configs" / "llama_debug.yaml")
    assert_user_error(forked_cli(["plan", config, "--nproc", "2"], tmp_path),
                      "data/stdlib_bpe/train_*.bin", "dist-train prepare-data")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stdlib_bpe").symlink_to(bpe_dir)
    proc = forked_cli(["plan", config, "--nproc", "2"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "vocabulary 600 (meta.json)" in proc.stdout and "uint32" in proc.stdout
