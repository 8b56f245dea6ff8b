#!/usr/bin/env bash
# The GPU check: on a machine with CUDA, a bf16 FSDP2 step of the Llama 3.2 1B shape (its published
# depth, width and heads; the vocabulary of the byte corpus, so no tokenizer or download is needed),
# its MFU and NVML joules per token, then the real-GPU energy test. Under 8 minutes on one H100.
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
rm -rf "$OUT"
timeout 420 .venv/bin/dist-train launch configs/llama1b_gpu_check.yaml --nproc "$NGPU" "$@"
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
last = [r for r in recs if "mfu" in r][-1]
keys = ("step", "loss", "step_time_s", "tokens_per_s", "mfu", "tflops_per_device", "peak_mem_bytes",
        "joules_per_token", "tokens_per_j", "power_w", "gpu_util_pct")
summary = {k: last.get(k) for k in keys}
(run / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PY
"$PY" -m pytest -q tests/test_energy_gpu.py -p no:cacheprovider
