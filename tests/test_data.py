"""Data sets and the step sampler: determinism, formats, splits, resumable order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dist_train.config.schema import DataSection
from dist_train.data import (
    StepSampler,
    TokenDataset,
    build_dataset,
    build_token_bin,
    load_stdlib_bytes,
    open_token_bin,
    rank_slice,
    write_token_bin,
)
from dist_train.data.base import VAL_SEED
from dist_train.data.stdlib_bytes import build_stdlib_bytes, split_interleaved
from dist_train.errors import UserError


# ---- stdlib bytes -------------------------------------------------------------------------------

def test_stdlib_corpus_deterministic_and_nonempty():
    a = load_stdlib_bytes(200_000)
    b = load_stdlib_bytes(200_000)
    assert a.dtype == np.uint8 and len(a) == 200_000
    assert np.array_equal(a, b)
    assert b"import" in a.tobytes()


def test_stdlib_dataset_split_and_batches():
    ds = build_dataset(DataSection(name="stdlib_bytes", max_bytes=100_000, val_fraction=0.1), block_size=32)
    info = ds.info
    assert info.task == "lm" and info.vocab_size == 256
    assert info.train_size + info.val_size == 100_000 and 8_000 <= info.val_size <= 20_000
    idx = ds.sampler("train", seed=0, global_batch=8).global_indices(3)
    x, y = ds.get_batch("train", idx)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    # Targets are inputs shifted by one token.
    assert torch.equal(x[:, 1:], y[:, :-1])
    corpus, _ = split_interleaved(load_stdlib_bytes(100_000), 0.1)
    start = int(idx[0])
    assert x[0].tolist() == list(corpus[start:start + 32])


def test_stdlib_val_chunks_spread_through_corpus():
    data = np.arange(100 * 16, dtype=np.uint8)
    train, val = split_interleaved(data, 0.1, chunk=16)
    assert len(val) == 10 * 16 and len(train) == 90 * 16
    # Val chunks come from all over the corpus, not its tail.
    assert set(np.concatenate([train, val]).tolist()) == set(data.tolist())
    assert val[0] != data[-16]


def test_stdlib_no_files_is_user_error(tmp_path):
    with pytest.raises(UserError, match="no .py files"):
        build_stdlib_bytes(10_000, 0.1, 16, root=tmp_path)


def test_stdlib_skips_site_packages(tmp_path):
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "a.py").write_bytes(b"THIRD PARTY")
    (tmp_path / "b.py").write_bytes(b"bbb")
    (tmp_path / "a.py").write_bytes(b"aaa")
    assert load_stdlib_bytes(10_000, root=tmp_path).tobytes() == b"aaabbb"


# ---- token_bin ----------------------------------------------------------------------------------

@pytest.mark.parametrize("llmc", [False, True])
def test_token_bin_round_trip(tmp_path, llmc):
    tokens = np.arange(1000) % 300
    path = tmp_path / "t.bin"
    write_token_bin(path, tokens, llmc_header=llmc)
    assert path.stat().st_size == 2 * 1000 + (1024 if llmc else 0)
    arr = open_token_bin(path)
    assert arr.dtype == np.uint16 and np.array_equal(arr, tokens)
    ds = build_dataset(DataSection(name="token_bin", path=str(path), val_fraction=0.2), block_size=8)
    assert ds.info.vocab_size == 300  # max token + 1
    assert (ds.info.train_size, ds.info.val_size) == (800, 200)
    x, y = ds.get_batch("val", torch.tensor([0, 5]))
    assert x[0].tolist() == list(tokens[800:808]) and y[1].tolist() == list(tokens[806:814])


def test_token_bin_val_path_and_vocab_from_config(tmp_path):
    write_token_bin(tmp_path / "train.bin", np.arange(100), llmc_header=True)
    write_token_bin(tmp_path / "val.bin", np.arange(50) + 7)
    ds = build_token_bin(str(tmp_path / "train.bin"), str(tmp_path / "val.bin"), 1000, 0.1, 4)
    assert ds.info.vocab_size == 1000 and (ds.info.train_size, ds.info.val_size) == (100, 50)


def test_token_bin_errors(tmp_path):
    with pytest.raises(UserError, match="data.path: file not found"):
        build_dataset(DataSection(name="token_bin", path=str(tmp_path / "nope.bin")), block_size=8)
    write_token_bin(tmp_path / "small.bin", np.arange(20))
    with pytest.raises(UserError, match="fewer than one block"):
        build_dataset(DataSection(name="token_bin", path=str(tmp_path / "small.bin")), block_size=64)
    # llm.c header claiming more tokens than the file holds: truncated.
    write_token_bin(tmp_path / "trunc.bin", np.arange(100), llmc_header=True)
    with open(tmp_path / "trunc.bin", "r+b") as fh:
        fh.truncate(1024 + 50)
    with pytest.raises(UserError, match="truncated"):
        open_token_bin(tmp_path / "trunc.bin")


def test_token_bin_uint32_round_trip(tmp_path):
    tokens = (np.arange(1000) * 131) % 128_256  # ids above 65,535: Llama 3's vocabulary
    path = tmp_path / "t.bin"
    write_token_bin(path, tokens, llmc_header=True, dtype="uint32")
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [20240801, 7, 1000] and path.stat().st_size == 1024 + 4 * 1000
    arr = open_token_bin(path)
    assert arr.dtype == np.uint32 and np.array_equal(arr, tokens)
    with pytest.raises(ValueError, match="llm.c header"):
        write_token_bin(path, tokens, dtype="uint32")  # a bare file is uint16 by definition
    with pytest.raises(ValueError, match="fit in uint16"):
        write_token_bin(path, tokens, llmc_header=True)


def test_token_bin_unknown_llmc_version(tmp_path):
    write_token_bin(tmp_path / "t.bin", np.arange(100), llmc_header=True)
    with open(tmp_path / "t.bin", "r+b") as fh:
        fh.seek(4)
        fh.write(np.array([3], dtype="<i4").tobytes())
    with pytest.raises(UserError, match="version 3 is not supported"):
        open_token_bin(tmp_path / "t.bin")


def _shards(folder, name, sizes, start=0, dtype="uint16"):
    """llm.c shards `{name}_00000k.bin` of consecutive ids (shard k begins at 1000 k + start)."""
    for k, n in enumerate(sizes):
        write_token_bin(folder / f"{name}_{k:06d}.bin", np.arange(n) + 1000 * k + start, llmc_header=True,
                        dtype=dtype)


def test_token_bin_glob_shards_with_val_siblings(tmp_path):
    _shards(tmp_path, "fineweb_train", [100, 3, 50])  # the 3-token shard holds no window of 8 + 1
    _shards(tmp_path, "fineweb_val", [40], start=500)
    ds = build_dataset(DataSection(name="token_bin", path=str(tmp_path / "fineweb_train_*.bin")), block_size=8)
    assert (ds.info.train_size, ds.info.val_size) == (153, 40)  # val from fineweb_val_*.bin, not a fraction
    assert ds.num_samples("train") == (100 - 8) + (50 - 8) and ds.num_samples("val") == 32
    # Window numbering runs through the shards; no window crosses a boundary.
    x, y = ds.get_batch("train", torch.tensor([0, 91, 92, 133]))
    assert x[1].tolist() == list(range(91, 99)) and y[1, -1].item() == 99  # last window of shard 0
    assert x[2].tolist() == list(range(2000, 2008))  # first window of shard 2 (shard 1 has none)
    assert y[3, -1].item() == 2049
    assert ds.info.vocab_size == 2050
    # A list of files (any order the user gives), with an explicit val list.
    listed = build_token_bin([str(tmp_path / "fineweb_train_000002.bin"), str(tmp_path / "fineweb_train_000000.bin")],
                             [str(tmp_path / "fineweb_val_000000.bin")], None, 0.1, 8)
    assert listed.get_batch("train", torch.tensor([0]))[0][0, 0].item() == 2000


def test_token_bin_shards_without_val_use_the_tail(tmp_path):
    _shards(tmp_path, "part", [100, 100])
    ds = build_token_bin(str(tmp_path / "part_*.bin"), None, None, 0.25, 8)
    assert (ds.info.train_size, ds.info.val_size) == (150, 50)
    assert ds.get_batch("val", torch.tensor([0]))[0][0, 0].item() == 1050
    with pytest.raises(UserError, match="no file matches.*prepare-data"):
        build_token_bin(str(tmp_path / "nope_*.bin"), None, None, 0.1, 8)
    with pytest.raises(UserError, match="each fewer than one block"):
        build_token_bin(str(tmp_path / "part_*.bin"), None, None, 0.1, 200)


def test_token_bin_vocabulary_from_meta_and_checks(tmp_path):
    _shards(tmp_path, "train", [100], dtype="uint32")
    _shards(tmp_path, "val", [100])
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 128_256}))
    ds = build_token_bin(str(tmp_path / "train_*.bin"), None, None, 0.1, 8)
    # The vocabulary comes from meta.json (the model's output size), not from the ids seen.
    assert ds.info.vocab_size == 128_256 and ds.tokenizer_path is None
    with pytest.raises(UserError, match="data.vocab_size: 1000 is smaller than the vocabulary of 128256"):
        build_token_bin(str(tmp_path / "train_*.bin"), None, 1000, 0.1, 8)
    # uint16 shards cannot hold a 128k vocabulary's ids: the file or the tokenizer is wrong.
    _shards(tmp_path, "u16", [100])
    with pytest.raises(UserError, match="holds uint16 tokens.*vocabulary of 128256"):
        build_token_bin(str(tmp_path / "u16_*.bin"), None, None, 0.1, 8)
    # An id outside the vocabulary is bad input, never an index error in the embedding.
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 50}))
    with pytest.raises(UserError, match="token id 99, outside the vocabulary of 50"):
        build_token_bin(str(tmp_path / "u16_*.bin"), None, None, 0.1, 8)


# ---- sampler ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["windows", "epochs"])
def test_sampler_is_pure_function_of_step(mode):
    a = StepSampler(population=37, global_batch=8, seed=5, mode=mode)
    seq = [a.global_indices(s) for s in range(10)]
    fresh = StepSampler(population=37, global_batch=8, seed=5, mode=mode)
    assert torch.equal(fresh.global_indices(7), seq[7])  # no history needed
    assert torch.equal(a.global_indices(3), seq[3])  # calling again does not change anything
    assert all(s.dtype == torch.long and s.shape == (8,) for s in seq)
    assert all(int(s.min()) >= 0 and int(s.max()) < 37 for s in seq)
    assert not torch.equal(seq[0], seq[1])
    other_seed = StepSampler(population=37, global_batch=8, seed=6, mode=mode)
    assert not torch.equal(other_seed.global_indices(0), seq[0])


def test_epoch_sampler_walks_permutations_across_boundaries():
    s = StepSampler(population=10, global_batch=4, seed=0, mode="epochs")
    walked = torch.cat([s.global_indices(i) for i in range(5)])  # 20 = exactly two epochs
    assert sorted(walked[:10].tolist()) == list(range(10))
    assert sorted(walked[10:].tolist()) == list(range(10))
    assert not torch.equal(walked[:10], walked[10:])  # a new permutation each epoch


def test_rank_slices_concatenate_to_global_batch():
    s = StepSampler(population=1000, global_batch=12, seed=1, mode="windows")
    g = s.global_indices(4)
    for world in (1, 2, 3, 4):
        parts = [rank_slice(g, r, world) for r in range(world)]
        assert all(len(p) == 12 // world for p in parts)
        assert torch.equal(torch.cat(parts), g)


def test_batch_not_divisible_is_user_error():
    g = StepSampler(population=100, global_batch=10, seed=0, mode="windows").global_indices(0)
    with pytest.raises(UserError, match="divisible"):
        rank_slice(g, 0, 3)


def test_next_indices_advances_step():
    s = StepSampler(population=100, global_batch=4, seed=0, mode="epochs")
    first = s.next_indices(rank=1, world=2)
    assert s.step == 1 and torch.equal(first, s.global_indices(0)[2:])


def test_state_dict_round_trip_and_mismatch():
    s = StepSampler(population=100, global_batch=8, seed=3, mode="windows")
    for _ in range(5):
        s.next_indices()
    state = s.state_dict()
    assert state == {"seed": 3, "global_batch": 8, "step": 5}
    resumed = StepSampler(population=100, global_batch=8, seed=3, mode="windows")
    resumed.load_state_dict(state)
    assert resumed.step == 5
    # A different world size after resume reads the same global batch, resharded.
    assert torch.equal(torch.cat([rank_slice(resumed.global_indices(5), r, 4) for r in range(4)]),
                       s.global_indices(5))
    with pytest.raises(UserError, match="global batch"):
        StepSampler(population=100, global_batch=16, seed=3, mode="windows").load_state_dict(state)
    with pytest.raises(UserError, match="seed"):
        StepSampler(population=100, global_batch=8, seed=4, mode="windows").load_state_dict(state)


def test_val_sampler_ignores_train_seed():
    ds = build_dataset(DataSection(name="stdlib_bytes", max_bytes=50_000), block_size=16)
    a, b = ds.sampler("val", seed=0, global_batch=4), ds.sampler("val", seed=123, global_batch=4)
    assert a.seed == b.seed == VAL_SEED
    assert torch.equal(a.global_indices(0), b.global_indices(0))
    assert not torch.equal(ds.sampler("train", 0, 4).global_indices(0), ds.sampler("train", 123, 4).global_indices(0))


def test_lm_windows_cover_the_whole_split():
    tokens = np.arange(20, dtype=np.uint16)
    ds = TokenDataset(tokens, tokens, vocab_size=20, block_size=5, source="test")
    last = ds.num_samples("train") - 1
    x, y = ds.get_batch("train", torch.tensor([last]))
    assert y[0, -1].item() == 19  # the last window ends at the last token
    with pytest.raises(IndexError):
        ds.get_batch("train", torch.tensor([last + 1]))


# ---- digits -------------------------------------------------------------------------------------

def test_digits_shapes_and_split():
    ds = build_dataset(DataSection(name="digits", val_fraction=0.1), block_size=64)
    info = ds.info
    assert info.task == "classify" and info.input_shape == (1, 8, 8) and info.num_classes == 10
    assert info.train_size + info.val_size == 1797 and info.val_size == 180
    assert set(ds.train_ids.tolist()).isdisjoint(ds.val_ids.tolist())
    x, y = ds.get_batch("train", ds.sampler("train", seed=0, global_batch=16).global_indices(0))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert info.image_norm == ((0.0,), (1.0,))  # the input is the [0, 1] image itself
    # The split is fixed (seed 0), never a function of train.seed.
    again = build_dataset(DataSection(name="digits", val_fraction=0.1), block_size=64)
    assert torch.equal(again.val_ids, ds.val_ids)


def test_digits_test_split_leaves_val_as_it_was():
    base = build_dataset(DataSection(name="digits", val_fraction=0.2), block_size=64)
    ds = build_dataset(DataSection(name="digits", val_fraction=0.2, test_fraction=0.2), block_size=64)
    assert base.info.test_size == 0
    with pytest.raises(ValueError, match="no test split"):
        base.sampler("test", 0, 8)
    assert torch.equal(ds.val_ids, base.val_ids)  # the same validation images with or without test
    info = ds.info
    assert info.train_size + info.val_size + info.test_size == 1797 and info.test_size == 359
    ids = [set(ds.train_ids.tolist()), set(ds.val_ids.tolist()), set(ds.test_ids.tolist())]
    assert ids[0].isdisjoint(ids[1]) and ids[0].isdisjoint(ids[2]) and ids[1].isdisjoint(ids[2])
    x, y = ds.get_batch("test", ds.sampler("test", seed=0, global_batch=8).global_indices(0))
    assert x.shape == (8, 1, 8, 8) and y.shape == (8,)


def test_stdlib_test_split_is_interleaved_and_optional():
    from dist_train.data.stdlib_bytes import split_interleaved3

    data = np.arange(100 * 16, dtype=np.uint16)
    train, val = split_interleaved(data, 0.1, chunk=16)
    t3, v3, e3 = split_interleaved3(data, 0.1, 0.0, chunk=16)
    assert np.array_equal(train, t3) and np.array_equal(val, v3) and len(e3) == 0  # test 0: as before
    train, val, test = split_interleaved3(data, 0.1, 0.1, chunk=16)
    assert len(val) == len(test) == 10 * 16 and len(train) == 80 * 16
    parts = [set(a.tolist()) for a in (train, val, test)]
    assert parts[0].isdisjoint(parts[1]) and parts[0].isdisjoint(parts[2]) and parts[1].isdisjoint(parts[2])
    assert test.max() > data[len(data) // 2] > test.min()  # spread through the corpus, not a tail
    ds = build_dataset(DataSection(name="stdlib_bytes", max_bytes=100_000, test_fraction=0.1), block_size=16)
    assert ds.info.test_size > 0 and ds.get_batch("test", torch.tensor([0]))[0].shape == (1, 16)


def test_val_plus_test_fraction_below_one():
    with pytest.raises(ValueError, match="test_fraction"):
        DataSection(name="digits", val_fraction=0.5, test_fraction=0.5)


# ---- shapes32 -----------------------------------------------------------------------------------

def test_shapes32_is_deterministic_balanced_and_split_disjoint():
    from dist_train.data.shapes32 import NUM_CLASSES, generate_shapes32

    images, labels = generate_shapes32(400, seed=0)
    assert images.shape == (400, 3, 32, 32) and images.dtype == np.uint8 and labels.dtype == np.int64
    again, _ = generate_shapes32(400, seed=0)
    assert np.array_equal(images, again)  # a pure function of (count, seed)
    assert not np.array_equal(images, generate_shapes32(400, seed=1)[0])
    ds = build_dataset(DataSection(name="shapes32", num_examples=1000, val_fraction=0.2, test_fraction=0.1),
                       block_size=64)
    info = ds.info
    assert (info.train_size, info.val_size, info.test_size) == (700, 200, 100)
    assert info.input_shape == (3, 32, 32) and info.num_classes == NUM_CLASSES
    seen = {}
    for split in ("train", "val", "test"):
        x, y = ds.get_batch(split, torch.arange(ds.num_samples(split)))
        assert x.shape == (ds.num_samples(split), 3, 32, 32) and x.dtype == torch.float32
        counts = torch.bincount(y, minlength=NUM_CLASSES)
        assert counts.min() == counts.max()  # every class equally often
        seen[split] = {bytes(img.numpy().tobytes()) for img in ds._splits[split][0]}
        assert len(seen[split]) == ds.num_samples(split)  # no image twice
    assert seen["train"].isdisjoint(seen["val"]) and seen["train"].isdisjoint(seen["test"])
    assert seen["val"].isdisjoint(seen["test"])
    ids = [set(ds.ids[s].tolist()) for s in ("train", "val", "test")]
    assert ids[0].isdisjoint(ids[1]) and ids[1].isdisjoint(ids[2])
    # standardised with the training split's statistics
    x, _ = ds.get_batch("train", torch.arange(700))
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    # info.image_norm undoes it: x * std + mean is the stored uint8 image / 255 (InfoPro's decoder target)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in info.image_norm)
    x, _ = ds.get_batch("val", torch.arange(5))
    raw = ds._splits["val"][0][:5].float() / 255.0
    torch.testing.assert_close(x * std + mean, raw, atol=1e-5, rtol=0)


def test_shapes32_default_test_split_and_config_checks():
    from dist_train.config import load_config

    ds = build_dataset(DataSection(name="shapes32", num_examples=200), block_size=64)
    assert ds.info.test_size == 20 and ds.info.val_size == 20  # default: 10% test, 10% val
    cfg = load_config(None, ["data.name=shapes32", "model.name=cnn"])
    assert cfg.data.name == "shapes32"
    with pytest.raises(UserError, match="gpt"):
        load_config(None, ["data.name=shapes32", "model.name=gpt"])
