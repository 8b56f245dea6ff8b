"""The checkpoint layouts `dist-train export` gathers one model from (overrides of a 2-rank run)."""

LAYOUTS = {
    "ddp": ["parallel.backend=ddp"],
    "fsdp": ["parallel.backend=fsdp"],
    "deepspeed_zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
    "pipeline": ["parallel.stages=2", "local.method=dgl"],
}
