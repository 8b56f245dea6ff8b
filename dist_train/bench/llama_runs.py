"""The settings every benchmark that trains the `llama` on 2 CPU ranks shares (`bench models`,
`bench scale`, its checkpoint-stall section): one place, so that the sides of different benchmarks
are the same run and a change to the common set reaches all of them."""

from __future__ import annotations

# width 256 / 6 layers is torchtitan's debug model's size class; vocab 256 (the byte corpus). Each
# benchmark adds its own smoke size (what its test runs).
SIZES = {
    "full": {"n_layer": 6, "width": 256, "n_head": 8, "n_kv_heads": 4, "block": 256, "batch": 16,
             "warmup": 3, "measured": 20, "memory_steps": 2, "repeats": 5},
    "quick": {"n_layer": 4, "width": 128, "n_head": 4, "n_kv_heads": 2, "block": 128, "batch": 8,
              "warmup": 2, "measured": 8, "memory_steps": 2, "repeats": 3},
}


def llama_model(size: dict) -> list[str]:
    """The `llama` of a benchmark size (keys n_layer, width, n_head, n_kv_heads)."""
    return ["model.name=llama", f"model.n_layer={size['n_layer']}", f"model.width={size['width']}",
            f"model.n_head={size['n_head']}", f"model.n_kv_heads={size['n_kv_heads']}"]


def run_overrides(size: dict, run_dir: str, name: str, steps: int, model: list[str], *extra: str) -> list[str]:
    """`model` trained `steps` steps under FSDP2 per block on CPU, one thread a rank, on the byte corpus,
    with AdamW, one logged record at the end and nothing else (no evaluation, sample, checkpoint,
    TensorBoard, progress or energy); `extra` overrides come last and win."""
    return [*model, f"model.block_size={size['block']}", "data.name=stdlib_bytes", "data.max_bytes=2000000",
            "parallel.backend=fsdp", "parallel.stages=1", "runtime.device=cpu", "runtime.threads=1",
            f"train.batch_size={size['batch']}", f"train.steps={steps}", f"train.log_every={steps}",
            "train.eval_every=0", "train.eval_batches=1", "train.sample_tokens=0", "optim.name=adamw",
            "checkpoint.every=0", "checkpoint.at_end=false", "checkpoint.resume=never",
            "telemetry.tensorboard=false", 'telemetry.progress="off"', "telemetry.energy=none",
            f"run.dir={run_dir}", f"run.name={name}", *extra]
