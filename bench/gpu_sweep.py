"""Batch sweeps for the GPU benches (``refl_step.py --full``, ``rollout_step.py``).

One measurement is a (family, config, batch) cell: warm-up steps, one step under
``torch.utils.flop_counter.FlopCounterMode`` (FLOPs per step), then ``timed`` synchronised steps
(min and median seconds). The derived numbers are computed in one place, :func:`derive`:

    images_per_s = batch / median_s
    achieved     = flops_per_step / median_s
    mfu          = achieved / peak_flops_per_s

``peak_flops_per_s`` is the device's own matmul rate, measured in the same process by
:func:`measure_peak_flops` (bf16 8192^3 on CUDA, float32 1024^3 on the CPU), so the MFU does not
depend on a datasheet number. :func:`sweep` walks configurations x batch sizes, stops a
configuration at its first out-of-memory error (recorded as ``"out of memory"``) and stops adding
batch sizes when the wall-clock budget would be exceeded (recorded as ``"skipped"`` with the
reason). :func:`render_table` prints the Markdown table the README quotes.

JSON written by both benches::

    bench, complete (false while a sweep is still writing row by row), env {torch, diffusers,
    transformers, peft, python, device, threads, gpu, cuda, cudnn, gpu_memory_gib | cpu},
    peak_flops {dtype, n, reps, trials, flops_per_s}, settings {model, reward, sampling_steps,
    stop_step | eta, guidance_scale, lora_rank, warmup, timed, batches, switches, budget_s, weights},
    rows [ {family, config, batch, status ("ok" | "out of memory" | "skipped" | "error"), reason,
           resolution, switches, gradient_checkpointing, vae_checkpointing, sampling_steps, reward,
           warmup, untimed_steps, timed, times_s, min_s, median_s, images_per_s, flops_per_step,
           flops_source, achieved_flops_per_s, mfu, peak_mem_bytes, peak_mem_gib, peak_mem_kind,
           cell_wall_s, vs_reference} ],
    best [ {family, config, batch, images_per_s, mfu, peak_mem_gib, vs_reference} ],
    sdxl_memory [ {config, peak_mem_gib, within_24gib, within_24e9_bytes, memory_kind} ]  (refl_step, SDXL)
"""
from __future__ import annotations

import gc
import json
import math
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

OOM = "out of memory"
GIB = 2**30
SDXL_LIMIT_BYTES = 24 * GIB  # the issue's "24 GB" read as GiB; the row also says whether it is under 24e9 bytes


# ---------------------------------------------------------------- command-line values
# argparse types: a bad value exits with status 2 and "argument --flag: ..." (no traceback)
def _int(s: str, least: int, what: str) -> int:
    import argparse

    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"{v} is not {what}")
    return v


def positive_int(s: str) -> int:
    return _int(s, 1, "at least 1")


def nonneg_int(s: str) -> int:
    return _int(s, 0, "at least 0")


def batch_list(s: str) -> list[int]:
    """``1,2,4``: batch sizes, each at least 1, at least one."""
    import argparse

    parts = [p.strip() for p in s.split(",")]
    if not s.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"{s!r}: give comma-separated batch sizes, e.g. 1,2,4")
    return [positive_int(p) for p in parts]


def positive_float(s: str) -> float:
    import argparse

    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{v} is not a finite number above 0")
    return v


def usage_error(msg: str) -> None:
    """A bad combination of flags: the message on stderr, exit status 2 (as argparse's own)."""
    import sys

    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mem_bytes(device) -> tuple[int, str]:
    """(bytes, kind): CUDA max_memory_allocated since the last reset, or the process's max RSS on the CPU
    (monotonic over the process: an upper bound there, not a per-cell number)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated()), "cuda max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process max RSS (CPU)"


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def environment(device) -> dict:
    import diffusers
    import peft
    import transformers

    dev = torch.device(device)
    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "python": platform.python_version(), "device": str(dev), "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   gpu_memory_gib=torch.cuda.get_device_properties(dev).total_memory / GIB)
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine())
    return env


def device_tag(device) -> str:
    """``h200`` for "NVIDIA H200", ``cpu`` on the CPU: the suffix of the result files."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(dev).lower().replace("nvidia", "").strip()
    return "-".join(name.split()[:2]) or "gpu"


def measure_peak_flops(device, n: Optional[int] = None, reps: int = 10, trials: int = 3) -> dict:
    """The device's dense matmul rate, FLOP/s: the best of ``trials`` timings of ``reps``
    n x n x n matmuls (2 n^3 FLOPs each) after a warm-up; bf16 on CUDA, float32 on the CPU."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = n or (8192 if cuda else 1024)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    best = math.inf
    for _ in range(trials):
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    del a, b
    free_memory(dev)
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "reps": reps, "trials": trials,
            "flops_per_s": 2 * n**3 * reps / best}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (forward and backward), by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def measure(step: Callable[[int], object], *, warmup: int, timed: int, device, flops: bool = True) -> dict:
    """Run ``step(i)`` ``warmup`` times, once under the flop counter, then ``timed`` times,
    each synchronised and timed. Returns times, FLOPs per step and peak memory of the timed steps."""
    i = 0
    for _ in range(warmup):
        step(i)
        i += 1
    n_flops = None
    if flops:
        n_flops = count_flops(lambda: step(i))
        i += 1
    reset_peak(device)
    times = []
    for _ in range(timed):
        sync(device)
        t0 = time.perf_counter()
        step(i)
        sync(device)
        times.append(time.perf_counter() - t0)
        i += 1
    mem, kind = peak_mem_bytes(device)
    return {"times_s": times, "flops_per_step": n_flops, "peak_mem_bytes": mem, "peak_mem_kind": kind}


def derive(row: dict, peak_flops_per_s: float) -> dict:
    """min / median seconds, images/s, achieved FLOP/s and MFU from a row with ``times_s``,
    ``batch`` and ``flops_per_step`` (see the module docstring for the formulas)."""
    t = row["times_s"]
    med = statistics.median(t)
    row.update(min_s=min(t), median_s=med, images_per_s=row["batch"] / med)
    f = row.get("flops_per_step")
    if f:
        row["achieved_flops_per_s"] = f / med
        row["mfu"] = f / med / peak_flops_per_s
    else:
        row["achieved_flops_per_s"] = row["mfu"] = None
    if row.get("peak_mem_bytes") is not None:
        row["peak_mem_gib"] = row["peak_mem_bytes"] / GIB
    return row


def add_ratios(rows: list[dict], reference: str = "reference") -> None:
    """``vs_reference``: images/s of a row over the reference config's images/s, same family
    and batch (> 1: faster than the reference-style loop); None where either is missing. A row
    with UNet gradient checkpointing on is compared with ``<reference>+mem`` (the reference loop
    with it on too, as SDXL's sweep runs it), one without with ``<reference>``: like with like."""
    ref = {(r["config"], r["family"], r["batch"]): r for r in rows
           if r["config"] in (reference, f"{reference}+mem") and r.get("status") == "ok"}
    for r in rows:
        name = f"{reference}+mem" if r.get("gradient_checkpointing") else reference
        m = ref.get((name, r["family"], r["batch"]))
        r["vs_reference"] = (r["images_per_s"] / m["images_per_s"]) if (m and r.get("status") == "ok") else None


def sweep(family: str, configs: Sequence[str], batches: Sequence[int], run_cell: Callable[[str, int], dict], *,
          peak_flops_per_s: float, budget_s: Optional[float] = None, device="cpu",
          clock: Callable[[], float] = time.monotonic, on_row: Callable[[dict], None] = lambda r: None,
          skip: Optional[dict] = None) -> list[dict]:
    """Measure every configuration at every batch size, in order.

    ``run_cell(config, batch)`` returns :func:`measure`'s dict (plus any extra keys to record) or
    raises. A configuration stops at its first out-of-memory error (that row: ``status: "out of
    memory"``, larger batches: ``"skipped"``). ``budget_s``: wall seconds for the whole sweep,
    shared evenly by the configurations not yet run; a batch size is started only when the
    configuration's share left is at least twice what its previous batch size took (the first
    batch size always runs while any share is left). ``skip``: {config: reason} for
    configurations that cannot run here (every batch recorded as skipped with the reason).
    """
    skip = dict(skip or {})
    rows: list[dict] = []
    start = clock()
    deadline = None if budget_s is None else start + budget_s
    for ci, cfg in enumerate(configs):
        cfg_start = clock()
        share_end = None if deadline is None else cfg_start + max(0.0, deadline - cfg_start) / (len(configs) - ci)
        last_cost = None
        stop_reason = skip.get(cfg)
        for b in batches:
            base = {"family": family, "config": cfg, "batch": b}
            if stop_reason is not None:
                rows.append({**base, "status": "skipped", "reason": stop_reason})
                on_row(rows[-1])
                continue
            now = clock()
            if share_end is not None and (now >= share_end or (last_cost is not None and share_end - now < 2 * last_cost)):
                rows.append({**base, "status": "skipped", "reason": f"budget: {share_end - now:.0f} s of this config's "
                             f"share left, the previous batch size took {last_cost or 0:.0f} s"})
                on_row(rows[-1])
                continue
            t0 = clock()
            try:
                got = run_cell(cfg, b)
            except Exception as err:  # noqa: BLE001 - a cell's failure is recorded, the sweep goes on
                if not is_oom(err):
                    rows.append({**base, "status": "error", "reason": f"{type(err).__name__}: {err}"[:500]})
                    on_row(rows[-1])
                    stop_reason = "an earlier batch size failed"
                    free_memory(device)
                    continue
                del err
                free_memory(device)
                rows.append({**base, "status": OOM, "reason": OOM})
                on_row(rows[-1])
                stop_reason = f"{OOM} at batch {b}"
                continue
            last_cost = clock() - t0
            row = derive({**base, "status": "ok", **got, "cell_wall_s": last_cost}, peak_flops_per_s)
            rows.append(row)
            on_row(row)
    add_ratios(rows)
    return rows


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (family, config): the measured batch size with the most images/s."""
    best: dict = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        k = (r["family"], r["config"])
        if k not in best or r["images_per_s"] > best[k]["images_per_s"]:
            best[k] = r
    return [{"family": f, "config": c, "batch": r["batch"], "images_per_s": r["images_per_s"], "mfu": r.get("mfu"),
             "peak_mem_gib": r.get("peak_mem_gib"), "vs_reference": r.get("vs_reference")} for (f, c), r in best.items()]


def write_json(path, result: dict) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return p


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def render_table(result: dict) -> str:
    """The Markdown table of a sweep result: one line per measured (or failed) cell."""
    lines = [f"{result.get('bench', 'bench')} on {result.get('env', {}).get('gpu') or result.get('env', {}).get('device', '?')}, "
             f"peak matmul {result['peak_flops']['flops_per_s'] / 1e12:.1f} TFLOP/s ({result['peak_flops']['dtype']})", "",
             "| config | family | batch | images/s | median s/step | min s/step | MFU % | peak GiB | vs reference |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['config']} | {r['family']} | {r['batch']} | {r['status']} | | | | | |")
            continue
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        ratio = None if r.get("vs_reference") is None else f"{r['vs_reference']:.2f}x"
        lines.append(f"| {r['config']} | {r['family']} | {r['batch']} | {r['images_per_s']:.3g} | {r['median_s']:.3f} | "
                     f"{r['min_s']:.3f} | {_fmt(mfu, '.1f')} | {_fmt(r.get('peak_mem_gib'), '.2f')} | {ratio or '–'} |")
    best = best_rows(result["rows"])
    if best:
        lines += ["", "Best batch size per configuration: " + "; ".join(
            f"{b['config']} ({b['family']}): {b['images_per_s']:.3g} images/s at batch {b['batch']}" for b in best)]
    return "\n".join(lines)


def budget_line(budget_s: Optional[float]) -> str:
    return "none" if budget_s is None else f"{budget_s:.0f} s"
