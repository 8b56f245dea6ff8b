"""`dist-train export RUN_DIR [--step N] [--out PATH] [--format safetensors|hf]`: the trained model,
out of the framework.

Writes the plain model's weights as one safetensors file under the model's own parameter names
(`embed.*`, `blocks.<i>.*`, `head.*`), whatever trained it:

- end-to-end runs (none, DDP, FSDP2, FairScale OSS): the `model` entries of the DCP checkpoint,
  loaded without a process group (DCP gathers FSDP2's shards into whole tensors);
- DeepSpeed: the engine's files (ZeRO-3 partitions merged by DeepSpeed's own `zero_to_fp32`);
- local-learning pipelines: every stage is rebuilt over one model (a stage's main path is the
  model's own embed/blocks/head), each stage's entries are loaded into it, and the auxiliary heads
  and other stage-only parts are left behind. A method whose stages are not a split of the model
  (NoProp's denoisers, for one) is refused by name.

Beside it, `<out>.yaml` holds what rebuilds the model: the config's `model` section and the data
set's sizes. `load_exported(path)` builds that model and loads the file with `strict=True`.

`--format hf` writes a folder that Hugging Face `transformers` loads instead (`export_hf.py`), for a
model that has an HF counterpart; the weights come from the same gathering as above.
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from pathlib import Path
from typing import Optional

import torch
import yaml
from torch import nn

from dist_train.errors import UserError
from dist_train.train.checkpoint import MARKER, committed_checkpoints


def _checkpoint(run_dir: Path, step: Optional[int]) -> Path:
    found = dict(committed_checkpoints(run_dir / "checkpoints"))
    if not found:
        raise UserError(f"export: {run_dir} has no committed checkpoint to export")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise UserError(f"export: --step {step}: no committed checkpoint step-{step} in {run_dir} "
                        f"(committed: {', '.join(map(str, sorted(found)))})")
    return found[step]


def _dcp_load(entries: dict, folder: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load(entries, checkpoint_id=str(folder))


@contextlib.contextmanager
def _mmap_only_for_zip_files():
    """DeepSpeed's `zero_to_fp32` loads with mmap=True, which torch refuses for the legacy (non-zip)
    files DeepSpeed itself writes: map those files without mmap for the duration (this process only;
    the files were scanned by `pickle_scan` before)."""
    real_load = torch.load

    def load(f, *args, **kwargs):
        if kwargs.get("mmap") and isinstance(f, (str, Path)) and not zipfile.is_zipfile(f):
            kwargs["mmap"] = False
        return real_load(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real_load


def _deepspeed_state(folder: Path, tag: str, zero_stage: int) -> dict:
    if zero_stage >= 3:  # each rank's partition of the flat fp32 groups, merged by DeepSpeed's own tool
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with _mmap_only_for_zip_files():
            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    states = folder / tag / "mp_rank_00_model_states.pt"
    return torch.load(states, map_location="cpu", weights_only=False)["module"]  # scanned before


def _load_into(module: nn.Module, cfg, folder: Path, key: Optional[str], backend: str) -> None:
    """Load `module`'s weights from the checkpoint part saved under `key` (a stage) by `backend`."""
    if backend == "deepspeed":
        module.load_state_dict(_deepspeed_state(folder, key or "deepspeed", cfg.parallel.zero_stage))
        return
    state = module.state_dict()
    _dcp_load({key: {"model": state}} if key else {"model": state}, folder)
    module.load_state_dict(state)


FORMATS = ("safetensors", "hf")


def export(run_dir: Path, step: Optional[int] = None, out: Optional[Path] = None,
           fmt: str = "safetensors") -> Path:
    from safetensors.torch import save_file

    from dist_train.config import load_config
    from dist_train.data import build_dataset
    from dist_train.models import build_model
    from dist_train.tasks import get_task
    from dist_train.train import pickle_scan

    if fmt not in FORMATS:
        raise UserError(f"export: --format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"export: {run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    folder = _checkpoint(run_dir, step)
    if (unsafe := pickle_scan.unsafe_member(folder)) is not None:
        raise UserError(f"export: checkpoint {folder} refused: {unsafe}, which is not plain data")
    layout = json.loads((folder / MARKER).read_text()).get("layout", {})
    data = build_dataset(cfg.data, cfg.model.block_size)
    info = data.info
    if not get_task(info.task).exportable:  # e.g. the PDE model needs the grid and the moe section too
        raise UserError("export: PDE runs (model.name basis_mlp, basis_fno) are not exported; load the checkpoint with "
                        "dist-train run (checkpoint.resume) instead")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, info)
    if fmt == "hf":  # refused before any checkpoint is read
        from dist_train.export_hf import hf_exporter

        hf_exporter(model, f"model.name {cfg.model.name}")
    stages = cfg.parallel.stages
    # The format is the marker's (a one-replica stage saves with DCP whatever the backend).
    backend = "deepspeed" if layout.get("format") == "deepspeed" else "dcp"
    if stages == 1:
        _load_into(model, cfg, folder, None, backend)
    else:
        _load_stages(cfg, model, info, folder, backend, layout.get("cut_points") or None)

    if fmt == "hf":
        from dist_train.export_hf import write_hf_folder

        return write_hf_folder(model, out or run_dir / "export" / f"{cfg.run.name}-step{int(folder.name.split('-')[1])}-hf",
                               f"model.name {cfg.model.name}", getattr(data, "tokenizer_path", None),
                               {"run": str(run_dir), "checkpoint": folder.name})
    out = out or run_dir / "export" / f"{cfg.run.name}-step{int(folder.name.split('-')[1])}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    # safetensors stores each tensor once: a tied weight (GPT's head and embedding) is one entry
    # under its first name, and the loader ties it again through the model.
    state = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen[t.data_ptr()] = name
        state[name] = t.detach().contiguous().cpu()
    save_file(state, str(out), metadata={"run": str(run_dir), "checkpoint": folder.name})
    sizes = {"task": info.task, "vocab_size": info.vocab_size, "num_classes": info.num_classes,
             "input_shape": list(info.input_shape) if info.input_shape else None}
    out.with_suffix(".yaml").write_text(yaml.safe_dump({"model": cfg.model.model_dump(), "data": sizes},
                                                       sort_keys=False))
    return out


def _load_stages(cfg, model: nn.Module, info, folder: Path, backend: str, cuts) -> None:
    from dist_train.local.build import stage_of
    from dist_train.local.layout import stage_layout

    covered: set[int] = set()
    for k in range(cfg.parallel.stages):
        stage, _ = stage_of(cfg, model, info, stage_layout(k, cfg.parallel.stages, cfg.parallel.stages), cuts)
        _load_into(stage, cfg, folder, f"stage{k}", backend)
        covered |= {id(p) for p in stage.parameters()}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise UserError(f"export: local.method={cfg.local.method} stages are not a split of the model "
                        f"({missing[0]} belongs to no stage); there is no single model to export")


def load_exported(path: Path) -> nn.Module:
    """The exported model, built from `<path>.yaml` and loaded from `path` with strict=True."""
    from safetensors.torch import load_file

    from dist_train.config.schema import ModelSection
    from dist_train.data.base import DataInfo
    from dist_train.models import build_model

    spec = yaml.safe_load(Path(path).with_suffix(".yaml").read_text())
    sizes = spec["data"]
    info = DataInfo(task=sizes["task"], vocab_size=sizes["vocab_size"], num_classes=sizes["num_classes"],
                    input_shape=tuple(sizes["input_shape"]) if sizes["input_shape"] else None,
                    train_size=0, val_size=0, test_size=0)
    model = build_model(ModelSection(**spec["model"]), info)
    weights = load_file(str(path))
    # Tied weights were stored once: fill the other names from the module that shares the tensor.
    full = {name: weights.get(name) for name in model.state_dict()}
    for name, t in model.state_dict().items():
        if full[name] is None:
            twin = next(n for n, u in model.state_dict().items() if u.data_ptr() == t.data_ptr() and n in weights)
            full[name] = weights[twin]
    model.load_state_dict(full, strict=True)
    return model
