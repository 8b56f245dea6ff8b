"""`dist-train bench models`: the HF side is the same shape as the llama side, and at the smoke size
both train through the same loop on 2 ranks with every target computed from the rows."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from dist_train.bench.models import SIZES, WORLD, run, write_hf_config
from dist_train.bench.report import SIZE_ENV


def test_the_hf_side_has_the_llama_sides_shape(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    size = SIZES["quick"]
    config = json.loads((write_hf_config(size, tmp_path) / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"]) == (size["width"], size["n_layer"], size["n_head"], size["n_kv_heads"])
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "transformers_version"}))
    from dist_train.config import load_config
    from dist_train.data.base import DataInfo
    from dist_train.models import build_model

    cfg = load_config(None, ["model.name=llama", f"model.n_layer={size['n_layer']}", f"model.width={size['width']}",
                             f"model.n_head={size['n_head']}", f"model.n_kv_heads={size['n_kv_heads']}",
                             f"model.block_size={size['block']}"])
    with torch.device("meta"):
        ours = build_model(cfg.model, DataInfo(task="lm", vocab_size=256, input_shape=None, num_classes=None,
                                               train_size=0, val_size=0))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())


@pytest.mark.slow
def test_smoke_run_measures_both_sides_and_derives_the_targets(monkeypatch) -> None:
    monkeypatch.setenv(SIZE_ENV, "smoke")
    doc = run(quick=True)
    rows = doc["results"]
    assert {(r["side"], r["ranks"]) for r in rows} == {("llama", WORLD), ("hf", WORLD), ("llama", 1), ("hf", 1)}
    two = [r for r in rows if r["ranks"] == WORLD]
    assert all(r["tokens_s"] > 0 and r["step_bytes"] > 0 and r["setup_bytes"] > 0 for r in two)
    # Same data, seed and shape: the first losses agree roughly (different init draws, same scale).
    losses = {r["side"]: r["loss"] for r in two}
    assert abs(losses["llama"] - losses["hf"]) < 1.0, losses

    def med(side, key, ranks=WORLD):
        return statistics.median(r[key] for r in rows if r["side"] == side and r["ranks"] == ranks)

    t = {x["metric"]: x for x in doc["targets"]}
    assert t["tokens_s_vs_hf"]["value"] == pytest.approx(med("llama", "tokens_s") / med("hf", "tokens_s"))
    assert t["memory_vs_hf"]["value"] == pytest.approx(med("llama", "step_bytes") / med("hf", "step_bytes"))
    assert t["setup_memory_2_vs_1"]["value"] == pytest.approx(med("llama", "setup_bytes") /
                                                              med("llama", "setup_bytes", 1))
