"""`dist-train` command line: run, launch, plan, bench, prepare-data.

Bad input (a UserError anywhere) prints one line and exits 2; a collective timeout exits 1 naming
the rank and phase. Tracebacks are kept for real bugs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

from dist_train.errors import ERROR_DIR_ENV, DistTimeoutError, UserError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (configs/quickstart.yaml is built in)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=50")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would add a usage block)
        self.exit(2, f"dist-train: error: {message} (see dist-train --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dist-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="train in the current process group (torchrun, srun, mpiexec) or alone")
    _add_config_args(p)

    p = sub.add_parser("launch", help="start N local workers through torch's elastic agent")
    _add_config_args(p)
    p.add_argument("--nproc", type=int, default=1, help="worker processes on this node")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    p.add_argument("--node-rank", type=int, default=0, help="rank of this node")
    p.add_argument("--master-addr", default=None, help="routable address of node 0 (required with --nnodes > 1)")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port on node 0")
    p.add_argument("--max-restarts", type=int, default=0, help="restart the worker group this many times on failure")
    p.add_argument("--threads", type=int, default=None, help="OMP/torch threads per worker (default: cores / nproc)")

    p = sub.add_parser("plan", help="validate config and layout, print the plan, train nothing")
    _add_config_args(p)
    p.add_argument("--nproc", type=int, default=None, help="processes per node (default: from the environment, else 1)")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes")

    p = sub.add_parser("slurm", help="render the sbatch script for this config into the run directory and submit it")
    _add_config_args(p)
    p.add_argument("--nodes", type=int, required=True, help="nodes for the job")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (0: a CPU-only cluster)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node (default: one per GPU)")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--time", default=None, help="time limit, e.g. 2:00:00 or 1-00:00:00")
    p.add_argument("--dry-run", action="store_true", help="render and print the script, submit nothing")

    p = sub.add_parser("export", help="write a run's trained model as one safetensors file (+ its model config)")
    p.add_argument("run_dir", help="the run directory (runs/<name>)")
    p.add_argument("--step", type=int, default=None, help="the committed checkpoint to export (default: the latest)")
    p.add_argument("--out", default=None, help="output file, or folder for --format hf "
                                               "(default: <run_dir>/export/<name>-step<N>.safetensors or ...-hf)")
    p.add_argument("--format", dest="fmt", choices=("safetensors", "hf"), default="safetensors",
                   help="safetensors: dist-train's names + a model config; hf: a folder transformers loads")

    p = sub.add_parser("prepare-data", help="tokenize local text files into token shards (data.name: token_bin)")
    p.add_argument("text", nargs="+", metavar="TEXT", help="text files, folders (all files below) or globs")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--tokenizer", default=None, help="a local Hugging Face tokenizer.json (never downloaded)")
    how.add_argument("--train-bpe", type=int, default=None, metavar="VOCAB",
                     help="train a byte-level BPE of VOCAB ids on the text")
    p.add_argument("--out", required=True, help="output folder (shards, tokenizer.json, meta.json)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out as val shards")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard at most")
    p.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                   help="token dtype (auto: uint16 when the vocabulary fits)")

    p = sub.add_parser("bench", help="run a named benchmark against its baseline")
    p.add_argument("name", help="benchmark name (see `dist-train bench list`)")
    p.add_argument("--quick", action="store_true", help="smaller version that finishes in a few minutes")
    p.add_argument("--json", dest="json_path", default=None, help="write results as JSON to this file")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from dist_train.config import load_config
    from dist_train.config.layout import check_layout
    from dist_train.runtime import discover, init_distributed
    from dist_train.train.loop import train
    from dist_train.train.memory_check import check_memory

    cfg = load_config(args.config, args.overrides)
    world = discover()
    check_layout(cfg, world.world_size)  # before any collective, so bad input cannot hang a rank
    # The model (built on meta) against what the features need, and the plan against the rank's memory.
    data = check_memory(cfg, world.world_size, world.local_world_size, device=_own_gpu(cfg, world)).data
    ctx = init_distributed(cfg, world)
    try:
        command = shlex.split(os.environ.get("DIST_TRAIN_COMMAND", "")) or [sys.argv[0], *sys.argv[1:]]
        if cfg.parallel.stages > 1:
            from dist_train.train.local_loop import train_local

            last = train_local(cfg, ctx, command, data=data)
        else:
            last = train(cfg, ctx, command, data=data)
    finally:
        ctx.destroy()
    if last.get("stopped"):  # preempted, or a non-finite step under on_nonfinite=stop: saved first
        _report_worker_error(f"stopped after step {last['stopped_at']}: {last['stopped']}; checkpoint "
                             f"step-{last['stopped_at']} is committed and the same command resumes from it",
                             prefix="dist-train: ", print_here=world.rank == 0)
        return int(last["exit_code"])
    if world.rank == 0 and last:
        run_dir = Path(cfg.run.dir) / cfg.run.name
        val = f", val loss {last['val_loss']:.4f}" if "val_loss" in last else ""
        val += f", val acc {last['val_acc']:.3f}" if "val_acc" in last else ""
        if "step" in last:
            loss = "-" if last.get("loss") is None else f"{last['loss']:.4f}"  # '-': the window's steps were dropped
            print(f"done: step {last['step']}, loss {loss}{val}, "
                  f"{last['samples_per_s']:.1f} samples/s; run dir {run_dir}")
        else:  # resumed a run that had already reached train.steps (e.g. `make demo` a second time)
            print(f"done: {run_dir} had already reached train.steps={cfg.train.steps}; nothing was trained "
                  "(raise train.steps or pick another run.name)")
        if "energy_summary" in last:
            print(last["energy_summary"])
        if "sample" in last:
            print(f"sample: {cfg.train.sample_prompt}{last['sample']}")
    return 0


def _own_gpu(cfg, world):
    """The GPU this rank will use (as runtime.dist picks it), or None on CPU: the memory check reads
    only its own device's free memory."""
    import torch

    if cfg.runtime.device == "cpu" or not torch.cuda.is_available():
        return None
    return torch.device("cuda", world.local_rank % torch.cuda.device_count())


def cmd_launch(args: argparse.Namespace) -> int:
    from dist_train.runtime.launch import launch

    return launch(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from dist_train.train.plan import plan

    print(plan(args.config, args.overrides, args.nproc, args.nnodes))
    return 0


def cmd_slurm(args: argparse.Namespace) -> int:
    from dist_train.runtime.slurm import submit

    return submit(args)


def cmd_export(args: argparse.Namespace) -> int:
    from dist_train.export import export

    out = export(Path(args.run_dir), args.step, Path(args.out) if args.out else None, args.fmt)
    print(f"exported {out}" if args.fmt == "hf" else f"exported {out} (model config: {out.with_suffix('.yaml')})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dist_train.bench import run_benchmark

    return run_benchmark(args.name, quick=args.quick, json_path=args.json_path)


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from dist_train.data.prepare import prepare_data

    meta = prepare_data(args.text, args.out, args.tokenizer, args.train_bpe, args.val_fraction, args.shard_tokens,
                        args.dtype)
    print(f"wrote {meta['train_tokens']} train and {meta['val_tokens']} val tokens ({meta['dtype']}, vocabulary "
          f"{meta['vocab_size']}) to {args.out}; train with data: {{name: token_bin, path: {args.out}/train_*.bin}}")
    return 0


def _report_worker_error(msg: str, prefix: str = "dist-train: error: ", print_here: bool = True) -> None:
    """Under `launch`, leave the message for the launcher (which prints it once for all ranks)."""
    err_dir = os.environ.get(ERROR_DIR_ENV)
    if err_dir:
        rank = os.environ.get("RANK", "0")
        Path(err_dir, f"rank{rank}.txt").write_text(prefix + msg)
    elif print_here:
        print(prefix + msg, file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    from dist_train.runtime.env import strip_deepspeed_local_rank

    argv = strip_deepspeed_local_rank(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    # Overrides may come after options (`launch cfg.yaml --nproc 2 train.steps=5`), which argparse's
    # positional matching does not allow; collect the stragglers here.
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    handler = {"run": cmd_run, "launch": cmd_launch, "plan": cmd_plan, "slurm": cmd_slurm, "export": cmd_export,
               "bench": cmd_bench, "prepare-data": cmd_prepare_data}[args.command]
    try:
        return handler(args)
    except UserError as e:
        _report_worker_error(str(e))
        return 2
    except DistTimeoutError as e:
        _report_worker_error(str(e))
        return 1
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """Console-script and `python -m dist_train` entry point."""
    code = main()
    if os.environ.get("RANK") is not None:  # a distributed worker: see exit_worker
        from dist_train.runtime.dist import exit_worker

        exit_worker(code)
    raise SystemExit(code)
