"""`dist-train bench dp`: DP-SGD on the byte-level GPT — non-private SGD vs dist-train's DP-SGD
(book-keeping) vs Opacus (per-sample hooks, and its ghost clipping) at the same batch.

The four sides share everything but the per-example clipping: the same GPT (`build_model`, fresh from
seed 0), the same training windows of the `stdlib_bytes` corpus (step k's B windows drawn from seed
1000 + k, identical on every side, fetched before the model is built), the same fixed batch B (no
Poisson sampling: sampling is not what is timed), the same optimizer (plain SGD, lr 0.05, no
momentum), the same clipping norm C = 1 and noise multiplier sigma = 1 on the three private sides,
one intra-op thread each, fp32:
1. non-private: forward, mean cross-entropy, backward, `SGD.step`.
2. dist-train: the framework's real `DPSGD` transform attached to the model (its `BookKeeper`, as in a
   run); per step forward, `(loss * B).backward()` (one backward pass of activation gradients only),
   `keeper.accumulate(B)` (ghost / instantiated per-example norms by the hybrid rule, clipped sums
   built directly from the kept activations and output gradients), then the transform itself (noise
   N(0, sigma^2 C^2) per coordinate, division by B, the accountant's record), then `SGD.step`.
   The physical batch is the whole batch.
3. Opacus hooks: `PrivacyEngine.make_private(..., poisson_sampling=False, grad_sample_mode="hooks")`:
   per-sample gradients of every parameter instantiated by its hooks, clipped, noised and scaled by
   its `DPOptimizer`.
4. Opacus ghost clipping: `grad_sample_mode="ghost"`; the loss goes through the criterion wrapper it
   returns (`DPLossFastGradientClipping`, per-example mean over positions), whose `backward()` runs two
   backward passes (norms, then the re-weighted loss).
The model's position ids are `arange(T).expand(B, T)`, a stride-0 view; Opacus 1.6's ghost embedding
norm calls `.view(-1, 1)` on its input and fails on it ("view size is not compatible with input
tensor's size and stride"), so on EVERY side a forward pre-hook makes the position embedding's input
contiguous (a B x T int64 copy; the model's code and arithmetic are unchanged).

(a) Step: every side runs in its own fresh process (forked from a server that imported torch and
Opacus once), with the framework's host-heap setting (`runtime.cpu_malloc`, default "cache": freed
blocks stay in the heap for the next step, see dist_train/runtime/malloc.py — the same on every
side), `warmup` untimed steps, then `steps` timed ones (the wall time of the whole step, optimizer
included). samples/s = B / median step time. Repeats alternate the order of the sides (forward, then
reversed) so drift on a shared machine falls on all of them; figures are medians over repeats, and
ratios are medians of the per-repeat ratios.
Memory, the target's figure: the peak of ALLOCATED tensor bytes over what was allocated once model,
optimizer and privacy wrappers were built — what training adds on top of the built model (the
interpreter, torch and the parameters are common to all sides and would push every ratio towards 1).
On CUDA that is `max_memory_allocated`; on CPU the same count, read from the allocator's own events
(`AllocatedPeak`: torch.profiler's memory events, every allocation and free, temporaries included)
over `mem_steps` further, untimed steps after the timed ones (the profiler slows ops). Beside it, on
CPU, the resident set: the peak RSS (VmHWM, reset after the build) of the warm-up and timed steps
minus the RSS at that moment. RSS adds what malloc keeps resident — with "cache" the heap's
high-water mark and its fragmentation, with glibc's defaults whatever it has not trimmed or unmapped —
which depends on the order of a side's allocations more than on what it needs, and moved by ±5-20%
between runs of one side; it is shown, not targeted.

(b) Maximum batch: on CPU there is no out-of-memory wall at these sizes, so the maximum batch is the
largest B of the grid 8, 12, 16, 24, 32, 48, ... (powers of two and 1.5x powers of two, up to a cap)
whose allocated-bytes increase (as in (a), over `max_batch_steps` steps with a fresh model per B)
stays under a fixed budget (`budget_mib` of the size); on CUDA the budget is the device memory and a
B fits unless it raises out-of-memory. Non-private, dist-train and Opacus hooks each search in their
own process, walking the grid upwards and stopping at the first B over budget.

Sizes: full = 4 layers x width 128 x 4 heads x block 64, batch 64, 2 warm-up + 12 timed steps,
7 repeats, 2 GiB budget; quick = 2 layers (same width, heads, block), batch 32, 1 + 5 steps,
3 repeats, 512 MiB; smoke = a tiny model for the tests (measures nothing).

Targets: dist-train's memory increase <= 1.1x non-private's; its samples/s >= 0.75x
non-private's and >= 1.3x Opacus ghost clipping's; its maximum batch strictly larger than Opacus
hooks' (ratio of maximum batches >= 1.01). Shown beside them with no target: Opacus's memory and
throughput ratios, and the maximum batches of non-private and dist-train. A missed target is
reported as missed: every side gets the same batch, steps and threads.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from dist_train.bench.report import command_line, document, make_target, pick_size, utc_now

SIDES = ("nonprivate", "dist-train", "opacus-hooks", "opacus-ghost")
MAX_BATCH_SIDES = ("nonprivate", "dist-train", "opacus-hooks")
PRELOAD = ("torch", "opacus", "dist_train.privacy.dp_sgd", "dist_train.models", "dist_train.data",
           "dist_train.config", "dist_train.bench.dp")
LR, CLIP, SIGMA, SEED = 0.05, 1.0, 1.0, 0
MIB = 2 ** 20

SIZES = {
    # Tests only: a tiny model and a couple of steps; proves it runs, measures nothing. The search's
    # grid is 8, 12 (a step up the grid, each B a fresh model and a profiled step; 16 and 24 added nothing).
    "smoke": {"layers": 1, "width": 32, "heads": 2, "block": 16, "batch": 4, "warmup": 1, "steps": 2,
              "repeats": 1, "budget_mib": 512, "max_batch_cap": 12, "max_batch_steps": 1, "mem_steps": 1,
              "max_bytes": 200_000},
    "quick": {"layers": 2, "width": 128, "heads": 4, "block": 64, "batch": 32, "warmup": 1, "steps": 5,
              "repeats": 3, "budget_mib": 512, "max_batch_cap": 1024, "max_batch_steps": 2, "mem_steps": 2,
              "max_bytes": 1_000_000},
    "full": {"layers": 4, "width": 128, "heads": 4, "block": 64, "batch": 64, "warmup": 2, "steps": 12,
             "repeats": 7, "budget_mib": 2048, "max_batch_cap": 4096, "max_batch_steps": 2, "mem_steps": 2,
             "max_bytes": 2_000_000},
}


def batch_grid(cap: int, start: int = 8) -> list[int]:
    """8, 12, 16, 24, 32, 48, ... up to `cap`: powers of two and 1.5x powers of two."""
    out, b = [], start
    while b <= cap:
        out.append(b)
        if b * 3 // 2 <= cap:
            out.append(b * 3 // 2)
        b *= 2
    return out


# ------------------------------------------------------------------------------ one side, in a worker


def _config(size: dict, batch: int, sigma: float = SIGMA, clip: float = CLIP):
    """The run's config: model, data and the privacy settings every private side reads."""
    from dist_train.config import load_config

    return load_config(None, [
        "model.name=gpt", f"model.n_layer={size['layers']}", f"model.width={size['width']}",
        f"model.n_head={size['heads']}", f"model.block_size={size['block']}", "model.dropout=0.0",
        "data.name=stdlib_bytes", f"data.max_bytes={size['max_bytes']}",
        "optim.name=dp_sgd", f"privacy.noise_multiplier={sigma}", f"privacy.max_grad_norm={clip}",
        f"privacy.max_physical_batch={batch}", f"train.batch_size={batch}", f"train.seed={SEED}"])


def _batches(data, n: int, batch: int, device) -> list:
    """Step k's batch: B windows drawn from seed k (the same on every side)."""
    import torch

    out = []
    for k in range(n):
        g = torch.Generator().manual_seed(1_000 + k)
        idx = torch.randint(0, data.num_samples("train"), (batch,), generator=g)
        x, y = data.get_batch("train", idx)
        out.append((x.to(device), y.to(device)))
    return out


def _contiguous_input(module, args):
    return tuple(a.contiguous() for a in args)


def build_side(side: str, cfg, data, device, batch: int):
    """Model, optimizer and privacy machinery of one side; returns `step(x, y) -> loss`, and the
    model (for tests). The private sides take sigma and C from `cfg.privacy`."""
    import torch
    import torch.nn.functional as F

    from dist_train.models import build_model

    torch.manual_seed(SEED)
    model = build_model(cfg.model, data.info).to(device)
    model.embed.pos.register_forward_pre_hook(_contiguous_input)  # see the module docstring (Opacus ghost)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    vocab = data.info.vocab_size

    def mean_loss(logits, y):
        return F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))

    if side == "nonprivate":
        return _nonprivate_step(model, opt, mean_loss), model
    if side == "dist-train":
        return _dist_train_step(model, opt, mean_loss, cfg, data), model
    return _opacus_step(side, model, opt, mean_loss, cfg, batch, vocab), model


def _nonprivate_step(model, opt, mean_loss):
    def step(x, y):
        loss = mean_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def _dist_train_step(model, opt, mean_loss, cfg, data):
    from types import SimpleNamespace

    from dist_train.privacy.dp_sgd import DPSGD

    backend = SimpleNamespace(module=model, mesh=None, dp_size=1)
    transform = DPSGD(cfg, data, None, model)
    transform.attach(backend)

    def step(x, y):
        loss = mean_loss(model(x), y)
        transform.backward(backend, loss, x.size(0), True)  # (loss * B).backward(); keeper.accumulate(B)
        transform(backend)  # noise, division by B, accountant
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def _opacus_step(side: str, model, opt, mean_loss, cfg, batch: int, vocab: int):
    """Opacus's per-sample hooks or its ghost clipping (`grad_sample_mode`) around the same model."""
    import warnings

    import torch
    from opacus import PrivacyEngine

    mode = {"opacus-hooks": "hooks", "opacus-ghost": "ghost"}[side]
    # make_private wants a loader; it is not iterated (the batches are the shared ones). Its size
    # sets the expected batch size Opacus divides by: exactly B.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(4 * batch)), batch_size=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-RNG and full-backward-hook notices
        out = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                           noise_multiplier=cfg.privacy.noise_multiplier,
                                           max_grad_norm=cfg.privacy.max_grad_norm, poisson_sampling=False, grad_sample_mode=mode)
    gsm, dp_opt = out[0], out[1]
    if mode == "hooks":
        def step(x, y):
            loss = mean_loss(gsm(x), y)
            with warnings.catch_warnings():
                # Opacus reads per-sample gradients off module outputs by design; torch notes that
                # the first layer's input needs no gradient. Benign, and it would print every run.
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                loss.backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
            return loss.detach()
        return step

    criterion = out[2]

    def step(x, y):
        logits = gsm(x)
        loss = criterion(logits.reshape(-1, vocab), y.reshape(-1), shape=logits.shape)
        loss.backward()  # two backward passes inside
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cuda_allocated_increase(run, device) -> int:
    """CUDA: the peak allocated bytes while `run()` runs, over those allocated before it."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def allocated_increase(run, device) -> int:
    """The peak allocated tensor bytes while `run()` runs, over those allocated before it (CUDA's
    counters; on CPU the allocator's events, `AllocatedPeak`)."""
    from dist_train.bench.memory import AllocatedPeak

    if device.type == "cuda":
        return _cuda_allocated_increase(run, device)
    with AllocatedPeak() as mem:
        run()
    return mem.peak


def _heap(cfg) -> bool:
    """The framework's host-heap setting, as a run applies it (every side alike)."""
    from dist_train.runtime.malloc import configure_cpu_malloc

    return configure_cpu_malloc(cfg.runtime.cpu_malloc)


def step_worker(rank: int, world: int, size: dict, side: str) -> dict:
    """(a) One side in its own process: warm-up, timed steps, memory."""
    import warnings

    import torch

    from dist_train.bench.memory import peak_rss, reset_peak_rss
    from dist_train.data import build_dataset

    warnings.filterwarnings("ignore")
    device, batch = _device(), size["batch"]
    cfg = _config(size, batch)
    heap = cfg.runtime.cpu_malloc if _heap(cfg) else "system (mallopt not available)"
    data = build_dataset(cfg.data, cfg.model.block_size)
    batches = _batches(data, size["warmup"] + size["steps"], batch, device)
    step, _ = build_side(side, cfg, data, device, batch)
    rss_base, reset_ok = reset_peak_rss()
    times, losses = [], []
    for k, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        loss = step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if k >= size["warmup"]:
            times.append(dt)
    rss_increase = peak_rss() - rss_base
    # untimed: the allocated-bytes peak of further steps (on CPU the profiler that counts them slows ops)
    increase = allocated_increase(lambda: [step(x, y) for x, y in batches[:size["mem_steps"]]], device)
    return {"side": side, "times": times, "losses": losses, "increase": increase, "rss_base": rss_base,
            "rss_increase": rss_increase, "reset_ok": reset_ok, "cpu_malloc": heap, "device": device.type}


def max_batch_worker(rank: int, world: int, size: dict, side: str) -> dict:
    """(b) One side in its own process: walk the batch grid up until a batch exceeds the budget."""
    import gc
    import warnings

    import torch

    from dist_train.data import build_dataset

    warnings.filterwarnings("ignore")
    device = _device()
    budget = size["budget_mib"] * MIB if device.type == "cpu" else torch.cuda.get_device_properties(device).total_memory
    probe = _config(size, 8)  # the data and the heap setting do not depend on the batch
    data = build_dataset(probe.data, size["block"])
    _heap(probe)
    tried = []
    for batch in batch_grid(size["max_batch_cap"]):
        cfg = _config(size, batch)
        batches = _batches(data, size["max_batch_steps"], batch, device)
        step = None
        try:
            step, _ = build_side(side, cfg, data, device, batch)
            increase = allocated_increase(lambda: [step(x, y) for x, y in batches], device)
            fits = device.type == "cuda" or increase <= budget
        except torch.cuda.OutOfMemoryError:
            increase, fits = None, False
        tried.append({"batch": batch, "increase": increase, "fits": fits})
        del step, batches
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not fits:
            break
    fitting = [t["batch"] for t in tried if t["fits"]]
    return {"side": side, "tried": tried, "max_batch": max(fitting) if fitting else 0, "budget": budget,
            "capped": bool(tried) and tried[-1]["fits"], "device": device.type}


# ------------------------------------------------------------------------------ driver


def _spawn(fn, *args) -> dict:
    from dist_train.bench._spawn import run_on_ranks

    return run_on_ranks(fn, nprocs=1, args=args, threads=1, preload=PRELOAD)


def _ratio(a, b):
    return a / b if a is not None and b else None


def run(quick: bool) -> dict[str, Any]:
    import opacus
    import torch

    size_name, size = pick_size(SIZES, quick)
    command, started = command_line(), utc_now()
    t0 = time.perf_counter()
    per_side = _step_part(size)  # (a)
    t_step = time.perf_counter() - t0
    device = per_side["nonprivate"][0]["device"]
    fig = _step_figures(per_side, size["batch"], device)
    t1 = time.perf_counter()
    searches = {s: _spawn(max_batch_worker, size, s) for s in MAX_BATCH_SIDES}  # (b)
    t_max = time.perf_counter() - t1
    rows = fig["rows"] + _max_batch_rows(searches)
    max_b = {s: searches[s]["max_batch"] for s in MAX_BATCH_SIDES}
    budget_words = (f"a {size['budget_mib']} MiB increase of allocated bytes" if device == "cpu"
                    else "the device memory (out-of-memory)")
    targets, reported = _targets_and_reported(fig, max_b, size, device, budget_words)
    setup = {"size": size_name, **size, "device": device, "threads_per_side": 1, "dtype": "float32",
             "optimizer": f"SGD lr {LR}, no momentum", "max_grad_norm": CLIP, "noise_multiplier": SIGMA,
             "sampling": "fixed batch (no Poisson)", "opacus": opacus.__version__, "torch": torch.__version__,
             "grid": batch_grid(size["max_batch_cap"]),
             "memory": ("peak allocated tensor bytes over those after build (torch.profiler memory events, "
                        f"{size['mem_steps']} untimed steps); beside it peak RSS (VmHWM reset after build) minus RSS "
                        "after build, over the timed steps" if device == "cpu"
                        else "max_memory_allocated minus memory_allocated after build"),
             "cpu_malloc": sorted({r["cpu_malloc"] for rs in per_side.values() for r in rs}),
             "peak_reset_ok": all(r["reset_ok"] for rs in per_side.values() for r in rs),
             "step_times_s": {s: [r["times"] for r in per_side[s]] for s in SIDES},
             "first_losses": {s: per_side[s][0]["losses"][:2] for s in SIDES},
             "increase_bytes": {s: [r["increase"] for r in per_side[s]] for s in SIDES},
             "rss_increase_bytes": {s: [r["rss_increase"] for r in per_side[s]] for s in SIDES},
             "max_batch_tried": {s: searches[s]["tried"] for s in MAX_BATCH_SIDES},
             "seconds": {"step": t_step, "max_batch": t_max, "total": time.perf_counter() - t0}}
    return document("dp", command, started, setup, rows, targets, reported)


def _step_part(size: dict) -> dict[str, list[dict]]:
    """(a) step: every side in a fresh process, order alternating over repeats."""
    per_side: dict[str, list[dict]] = {s: [] for s in SIDES}
    for rep in range(size["repeats"]):
        for side in (SIDES if rep % 2 == 0 else tuple(reversed(SIDES))):
            per_side[side].append(_spawn(step_worker, size, side))
    return per_side


def _step_figures(per_side: dict[str, list[dict]], batch: int, device: str) -> dict[str, Any]:
    """Part (a)'s medians and per-repeat ratios against the non-private side, and its rows."""
    def sps(r: dict) -> float:
        return batch / statistics.median(r["times"])

    def median_ratio(num: str, den: str, key) -> float:
        return statistics.median(key(a) / key(b) for a, b in zip(per_side[num], per_side[den]))

    thr = {s: statistics.median(sps(r) for r in per_side[s]) for s in SIDES}
    inc = {s: statistics.median(r["increase"] for r in per_side[s]) for s in SIDES}
    mem_ratio = {s: median_ratio(s, "nonprivate", lambda r: r["increase"]) for s in SIDES}
    rss_inc = {s: statistics.median(r["rss_increase"] for r in per_side[s]) for s in SIDES}
    rss_ratio = {s: median_ratio(s, "nonprivate", lambda r: r["rss_increase"]) for s in SIDES}
    thr_ratio = {s: median_ratio(s, "nonprivate", sps) for s in SIDES}
    rows = [{"part": "a: step", "side": s, "batch": batch, "samples_per_s": thr[s],
             "step_ms_median": 1e3 * statistics.median(t for r in per_side[s] for t in r["times"]),
             "throughput_vs_nonprivate": thr_ratio[s],
             "mem_increase_mib": inc[s] / MIB, "mem_increase_vs_nonprivate": mem_ratio[s],
             **({"rss_increase_mib": rss_inc[s] / MIB, "rss_increase_vs_nonprivate": rss_ratio[s]} if device == "cpu" else {}),
             "repeats": len(per_side[s])} for s in SIDES]
    return {"rows": rows, "mem_ratio": mem_ratio, "rss_ratio": rss_ratio, "thr_ratio": thr_ratio,
            "dp_vs_ghost": median_ratio("dist-train", "opacus-ghost", sps),
            "dp_vs_hooks": median_ratio("dist-train", "opacus-hooks", sps)}


def _max_batch_rows(searches: dict[str, dict]) -> list[dict]:
    """(b) the largest batch under the memory budget, and the first batch over it, per side."""
    rows = []
    for s in MAX_BATCH_SIDES:
        res = searches[s]
        at_max = next((t for t in res["tried"] if t["batch"] == res["max_batch"]), None)
        over = res["tried"][-1] if not res["capped"] else None
        rows.append({"part": "b: max batch", "side": s, "max_batch": res["max_batch"],
                     "budget_mib": res["budget"] / MIB, "capped_at_grid_end": res["capped"],
                     "increase_at_max_mib": at_max["increase"] / MIB if at_max and at_max["increase"] is not None else None,
                     "first_over_budget": over["batch"] if over else None,
                     "increase_first_over_mib": over["increase"] / MIB if over and over["increase"] is not None else None})
    return rows


def _targets_and_reported(fig: dict, max_b: dict, size: dict, device: str, budget_words: str) -> tuple[list, list]:
    batch, mem_ratio, rss_ratio, thr_ratio = size["batch"], fig["mem_ratio"], fig["rss_ratio"], fig["thr_ratio"]
    targets = [
        make_target("dp_mem_ratio", mem_ratio["dist-train"], "<=", 1.1,
                    description=f"dist-train DP-SGD / non-private peak increase of allocated tensor bytes over "
                                f"the built model (median of per-repeat ratios), batch {batch}"),
        make_target("dp_throughput_ratio", thr_ratio["dist-train"], ">=", 0.75,
                    description=f"dist-train DP-SGD / non-private samples/s (median of per-repeat ratios), batch {batch}"),
        make_target("dp_vs_opacus_ghost", fig["dp_vs_ghost"], ">=", 1.3,
                    description=f"dist-train DP-SGD / Opacus ghost clipping samples/s (median of per-repeat ratios), batch {batch}"),
        make_target("dp_max_batch_vs_opacus_hooks", _ratio(max_b["dist-train"], max_b["opacus-hooks"]), ">=", 1.01,
                    description=f"dist-train / Opacus hooks maximum batch within {budget_words} "
                                f"(grid {batch_grid(size['max_batch_cap'])[:4]}..{size['max_batch_cap']}); >= 1.01 = strictly larger"),
    ]
    reported = [
        {"metric": "opacus_hooks_mem_ratio", "value": mem_ratio["opacus-hooks"],
         "description": "Opacus hooks / non-private memory increase"},
        {"metric": "opacus_ghost_mem_ratio", "value": mem_ratio["opacus-ghost"],
         "description": "Opacus ghost clipping / non-private memory increase"},
        *({"metric": f"rss_ratio_{s.replace('-', '_')}", "value": rss_ratio[s],
           "description": f"{s} / non-private peak-RSS increase (what malloc keeps resident included; no target)"}
          for s in SIDES if s != "nonprivate" and device == "cpu"),
        {"metric": "opacus_hooks_throughput_ratio", "value": thr_ratio["opacus-hooks"],
         "description": "Opacus hooks / non-private samples/s"},
        {"metric": "opacus_ghost_throughput_ratio", "value": thr_ratio["opacus-ghost"],
         "description": "Opacus ghost clipping / non-private samples/s"},
        {"metric": "dp_vs_opacus_hooks_throughput", "value": fig["dp_vs_hooks"],
         "description": "dist-train / Opacus hooks samples/s"},
        {"metric": "dp_max_batch_vs_nonprivate", "value": _ratio(max_b["dist-train"], max_b["nonprivate"]),
         "description": "dist-train / non-private maximum batch"},
        *({"metric": f"max_batch_{s.replace('-', '_')}", "value": max_b[s],
           "description": f"{s}: largest batch within {budget_words}"} for s in MAX_BATCH_SIDES),
    ]
    return targets, reported
