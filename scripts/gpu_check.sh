#!/usr/bin/env bash
# The GPU check: on a machine with CUDA, a bf16 FSDP2 step of the Llama 3.2 1B shape (its published
# depth, width and heads; the vocabulary of the byte corpus, so no tokenizer or download is needed),
# its MFU and NVML joules per token; the same run with every block compiled (parallel.compile), for
# tokens_s_compile_vs_eager_gpu (target >= 1.10; torchtitan's Llama 3 8B: 1.16x) over the windows after
# warm-up, so compile time is excluded (it is reported on its own); then the real-GPU energy test.
# Under 9 minutes on one H100.
# Without a CUDA device it says so and exits 0: nothing in the project depends on it.
#   scripts/gpu_check.sh [extra overrides...]     (figures: runs/gpu_check/summary.json)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here; nothing run"
  exit 0
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
OUT=runs/gpu_check
rm -rf "$OUT" "$OUT"_compile
timeout 300 .venv/bin/dist-train launch configs/llama1b_gpu_check.yaml --nproc "$NGPU" "$@"
timeout 300 .venv/bin/dist-train launch configs/llama1b_gpu_check.yaml --nproc "$NGPU" \
  run.name=gpu_check_compile parallel.compile=true "$@"
"$PY" - "$OUT" "$OUT"_compile <<'PY'
import json, statistics, sys
from pathlib import Path
def records(run):
    return [r for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if "mfu" in r]
def steady(recs):  # the windows after the first two: warm-up and, when compiled, compilation
    return statistics.median(r["tokens_per_s"] for r in recs[2:])
eager, compiled = records(sys.argv[1]), records(sys.argv[2])
last = eager[-1]
keys = ("step", "loss", "step_time_s", "tokens_per_s", "mfu", "tflops_per_device", "peak_mem_bytes",
        "joules_per_token", "tokens_per_j", "power_w", "gpu_util_pct")
summary = {k: last.get(k) for k in keys}
summary.update(tokens_s_eager=steady(eager), tokens_s_compile=steady(compiled),
               mfu_compile=compiled[-1].get("mfu"), compile_s=next((r["compile_s"] for r in compiled if "compile_s" in r), None))
summary["tokens_s_compile_vs_eager_gpu"] = summary["tokens_s_compile"] / summary["tokens_s_eager"]
summary["tokens_s_compile_vs_eager_gpu_met"] = summary["tokens_s_compile_vs_eager_gpu"] >= 1.10
(Path(sys.argv[1]) / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PY
"$PY" -m pytest -q tests/test_energy_gpu.py -p no:cacheprovider
