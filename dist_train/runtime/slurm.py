"""`dist-train slurm CONFIG --nodes N --gpus-per-node G [...] [key=value ...]`: render and submit.

The script is the shipped template (`slurm/train.sbatch`, or `slurm/train_multinode.sbatch` for more
than one node) with the job's resources as `#SBATCH` lines and its arguments filled in; it is written
into the run directory (`<run>/slurm/train.sbatch`, next to what the job will write) and submitted
with `sbatch --parsable`. The counts appear once, as `#SBATCH` directives: the tasks read their rank
and world from Slurm's variables. With `--dry-run` nothing is submitted.

Across nodes, a sharding backend (fsdp) gets HSDP by default: the script appends
`parallel.dp_replicate=${SLURM_NNODES}` to the run's arguments, so each node's tasks form one shard
group and only the gradient all-reduce crosses nodes. An explicit `parallel.dp_replicate` (in the
config or the arguments) wins; ddp, and a local-learning pipeline, are left as they are.

The config and the layout are checked first, for the whole world the job will have (nodes x tasks),
so a wrong count is one line and exit 2 here rather than a failed job in the queue.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from dist_train.config import load_config
from dist_train.config.load import resolve_config_path
from dist_train.config.layout import check_layout
from dist_train.errors import UserError

TEMPLATES = Path(__file__).resolve().parents[1] / "slurm_templates"  # the repository's slurm/ folder
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # Slurm's --time forms: M, M:S, H:M:S, D-H[:M[:S]]


def render(args: argparse.Namespace) -> tuple[Path, str]:
    """(where the script goes, its text) for the parsed `dist-train slurm` arguments."""
    if args.nodes < 1:
        raise UserError(f"--nodes {args.nodes}: a job needs at least one node")
    if args.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node {args.gpus_per_node} is negative")
    tasks = args.tasks_per_node if args.tasks_per_node is not None else args.gpus_per_node
    if tasks < 1:
        raise UserError("--tasks-per-node: a CPU-only job (--gpus-per-node 0) needs --tasks-per-node N")
    if args.time is not None and not _TIME.match(args.time):
        raise UserError(f"--time {args.time!r}: not a Slurm time (minutes, H:M:S or D-H:M:S)")
    config = resolve_config_path(args.config)  # a file, or a built-in name such as quickstart.yaml
    cfg = load_config(str(config), args.overrides)
    hsdp = _replicas_per_node(cfg, args.nodes)
    if hsdp:
        cfg = load_config(str(config), [*args.overrides, f"parallel.dp_replicate={args.nodes}"])
    check_layout(cfg, args.nodes * tasks)

    run_dir = (Path(cfg.run.dir) / cfg.run.name).resolve()
    template = TEMPLATES / ("train_multinode.sbatch" if args.nodes > 1 else "train.sbatch")
    lines = template.read_text().splitlines()
    directives = [f"#SBATCH --job-name={cfg.run.name}", f"#SBATCH --nodes={args.nodes}",
                  f"#SBATCH --ntasks-per-node={tasks}", f"#SBATCH --chdir={Path.cwd()}",
                  f"#SBATCH --output={run_dir}/slurm-%j.out"]
    if args.gpus_per_node:
        directives.append(f"#SBATCH --gpus-per-node={args.gpus_per_node}")
    if args.partition:
        directives.append(f"#SBATCH --partition={args.partition}")
    if args.time:
        directives.append(f"#SBATCH --time={args.time}")
    last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    kept = [line for line in lines[:last + 1] if not line.startswith("#SBATCH --job-name")]
    body = lines[last + 1:]
    argv = [str(config.resolve()), *args.overrides]
    filled = ["# Rendered by: dist-train slurm " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
              f"set -- {' '.join(shlex.quote(a) for a in argv)}",
              f"export DIST_TRAIN_PYTHON=${{DIST_TRAIN_PYTHON:-{shlex.quote(sys.executable)}}}"]
    if hsdp:
        filled += ["# HSDP by default for a sharding backend across nodes: one shard group per node, replicated",
                   "# across nodes (set parallel.dp_replicate in the config or the arguments to choose otherwise).",
                   'set -- "$@" "parallel.dp_replicate=${SLURM_NNODES}"']
    text = "\n".join([*kept, *directives, *filled, *body]) + "\n"
    return run_dir / "slurm" / template.name, text


def _replicas_per_node(cfg, nodes: int) -> bool:
    """Does the job default to HSDP with one shard group per node (`parallel.dp_replicate` = the node
    count)? Yes when it spans nodes, trains end to end (a pipeline's stages, not its nodes, split the
    ranks), its backend shards over a replicate x shard mesh, and neither the config nor the
    arguments set `parallel.dp_replicate` (an explicit value, 1 included, wins). A backend that does
    not shard (ddp) replicates over every rank anyway and is left as it is."""
    from dist_train.registry import BACKENDS

    return (nodes > 1 and cfg.parallel.stages == 1 and BACKENDS.get(cfg.parallel.backend).hybrid_shards
            and "dp_replicate" not in cfg.parallel.model_fields_set)


def submit(args: argparse.Namespace) -> int:
    script, text = render(args)
    if not args.dry_run and shutil.which("sbatch") is None:
        raise UserError("dist-train slurm: sbatch not found: Slurm is not installed here "
                        "(--dry-run renders the script without submitting it)")
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    script.chmod(0o755)
    if args.dry_run:
        print(text, end="")
        print(f"dist-train: wrote {script} (not submitted: --dry-run)")
        return 0
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                          env={**os.environ})
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"sbatch refused the job: {reason}")
    job = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job}: {script} (output: {script.parent.parent}/slurm-{job}.out)")
    return 0
