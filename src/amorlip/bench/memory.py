"""`amorlip bench memory`: peak memory of each objective's loss at growing batch, tiled against dense, and of
full training steps with cached-feature accumulation (train.accum_steps K) at a fixed global batch.

* loss (part a): every objective alone on fixed unit-norm features (bench loss's `LossCase`), forward +
  backward at each `--batch-sizes` B, dense (`tile_size 0`) and tiled (`--tile-size`, default auto), the
  transient peak (CUDA max_memory_allocated; CPU: the profiler's tensor peak, `bench.common.cpu_tensor_peak`)
  as a multiple of one B x B fp32 matrix, on a step that runs AmorLIP's Stage I and on one that does not
  (the larger is kept). Time: the tiled/dense ratio of paired, interleaved repeats (median and IQR).
  An objective without a tiled path (none at present) gets a dense row only.
* step (part b): the unchanged training loop (bench overhead's interleaved processes) for each K of
  `--accum`, same model and global batch: step time ratio to K = 1 (= time per sample, the batch is fixed),
  paired per block, and the step's peak memory (CUDA: max allocated; CPU: the profiler's tensor peak in a
  fresh process).
* `--budget-mb`: per objective and mode, the largest measured B whose loss peak fits, and an extrapolation
  from the largest measured B (dense ~ B^2, tiled ~ B: a fixed strip of rows times B columns); per K, the
  largest global batch a step could take, from `peak = fixed + a B / K` fitted through K = 1 and the largest K
  (a rough guide: a step's peak is the parameters, gradients and optimizer state plus one micro-batch).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch

from amorlip.bench.common import (
    base_parser,
    build_variants,
    environment,
    load_warning,
    mb,
    parse_args,
    progress,
    resolve_device,
    scratch_dir,
    split_list,
    write_json,
)
from amorlip.config import ConfigError
from amorlip.objectives.registry import DEFAULT_OBJECTIVE, REGISTRY
from amorlip.report import format_table
from amorlip.stats import paired_stats


def _tile_key(objective: str) -> str | None:
    """The tile-size key of a tiled objective (its registry entry's `tile_key`), else None."""
    entry = REGISTRY.get(objective)
    return None if entry is None else entry.tile_key


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(case: Any, i: int, device: torch.device) -> float:
    case.zero_grad()
    _sync(device)
    t0 = time.perf_counter()
    case.step(i)
    _sync(device)
    return time.perf_counter() - t0


def _resolved_tile(objective: str, cfg: Any, batch: int) -> int:
    from amorlip.objectives.tiled import resolve_tile

    section = _tile_key(objective).split(".")[0]
    return resolve_tile(cfg.sections[section].tile_size, batch, batch)


def loss_memory(opts: Any, overrides: list, device: torch.device, show: bool) -> list[dict[str, Any]]:
    """Part (a): rows of {objective, batch, mode, tile, peak_bytes, x_matrix, time ratio}."""
    from amorlip.bench.loss import LossCase, transient_peak

    batches = split_list(opts.batch_sizes, int)
    if not batches or min(batches) < 2:
        raise ConfigError("--batch-sizes must list batch sizes >= 2, e.g. 1024,2048,4096")
    tile_text = "null" if opts.tile_size in (None, "auto") else str(opts.tile_size)
    rows: list[dict[str, Any]] = []
    names = split_list(opts.objectives)
    with scratch_dir("memory") as tmp:
        bar = progress(len(names) * len(batches) * 2 * (opts.repeats + 2), "memory/loss", disable=not show)
        for name in names:
            for batch in batches:
                modes = [("dense", "0"), ("tiled", tile_text)] if _tile_key(name) else [("dense", None)]
                cases = {}
                for mode, tile in modes:
                    ov = [o for o in overrides if not o[0].startswith("train.batch")]
                    if tile is not None:
                        ov.append((_tile_key(name), tile))
                    opts_one = copy.copy(opts)
                    opts_one.objectives = name
                    cfg = build_variants(opts_one, ov, 1, tmp)[0].cfg
                    case = LossCase(name, cfg, batch, opts.dim, 10 * batch, device)
                    rows_tile = _resolved_tile(name, cfg, batch) if tile is not None else 0
                    cases[mode] = (case, rows_tile)
                times: dict[str, list[float]] = {m: [] for m in cases}
                order = list(cases)
                for r in range(opts.repeats + 1):  # round 0: warm-up
                    for m in order if r % 2 == 0 else reversed(order):
                        t = _timed_step(cases[m][0], 1 + r, device)
                        if r:
                            times[m].append(t)
                        bar.update(1)
                stats = paired_stats(times, "dense", 1)
                for m, (case, tile_rows) in cases.items():
                    peak = transient_peak(case, [0, 1], device)  # step 0 runs AmorLIP's Stage I
                    bar.update(1)
                    s = stats[m]
                    rows.append({"objective": name, "batch": batch, "mode": m, "tile_rows": tile_rows,
                                 "peak_bytes": peak, "x_matrix": peak / (batch * batch * 4),
                                 "ms_median": 1e3 * s.median, "time_ratio": s.ratio,
                                 "time_ratio_q25": s.ratio_q25, "time_ratio_q75": s.ratio_q75})
                    del case
                cases.clear()
        bar.close()
    return rows


def largest_batch(rows: list[dict[str, Any]], budget: float) -> list[dict[str, Any]]:
    """Per (objective, mode): the largest measured B within `budget` bytes, and an extrapolation from the
    largest measured B (dense: peak ~ B^2; tiled: peak ~ B)."""
    out = []
    keys = dict.fromkeys((r["objective"], r["mode"]) for r in rows)
    for name, mode in keys:
        mine = sorted((r for r in rows if r["objective"] == name and r["mode"] == mode), key=lambda r: r["batch"])
        fits = [r["batch"] for r in mine if r["peak_bytes"] <= budget]
        top = mine[-1]
        power = 1.0 if mode == "tiled" and top["tile_rows"] else 2.0
        est = int(top["batch"] * (budget / top["peak_bytes"]) ** (1.0 / power)) if top["peak_bytes"] > 0 else None
        out.append({"objective": name, "mode": mode, "largest_measured": max(fits) if fits else None,
                    "extrapolated": est, "scaling": "B" if power == 1.0 else "B^2"})
    return out


def step_memory(opts: Any, overrides: list, device: torch.device, show: bool) -> dict[str, Any]:
    """Part (b): full training steps with train.accum_steps K at a fixed global batch, interleaved."""
    from amorlip.bench.common import block_length, default_dataset_size
    from amorlip.bench.overhead import measure

    ks = split_list(opts.accum, int)
    if not ks or min(ks) < 1:
        raise ConfigError("--accum must list accumulation steps >= 1, e.g. 1,2,4,8")
    if 1 not in ks:
        ks = [1, *ks]
    ks = sorted(dict.fromkeys(ks))
    entries = ",".join(f"{opts.step_objective}[train.accum_steps={k}]" for k in ks)
    with scratch_dir("memory-step") as tmp:
        opts_one = copy.copy(opts)
        opts_one.objectives = entries
        probe = build_variants(opts_one, overrides, 1, tmp)
        block = block_length([v.cfg for v in probe], opts.steps)
        steps = block * max(1, opts.steps // block)
        total = opts.warmup + steps + 1
        variants = build_variants(opts_one, overrides, total, tmp)
        for v, k in zip(variants, ks):
            v.label = f"K={k}"
        batch = variants[0].cfg.train.batch_size
        bad = [k for k in ks if batch % k]
        if bad:
            raise ConfigError(f"--accum {bad} does not divide the global batch {batch}")
        dataset_size = default_dataset_size(variants[0].cfg, total, None)
        mem_last = 1 if device.type == "cpu" else None
        times, memory = measure(variants, dataset_size, opts.warmup + steps, mem_last, tmp, show)
        measured = {k: v[opts.warmup:] for k, v in times.items()}
        stats = paired_stats(measured, "K=1", block)
    key = "cuda_peak" if device.type == "cuda" else "tensor_peak"
    rows = []
    for v, k in zip(variants, ks):
        s = stats[v.label]
        rows.append({"accum_steps": k, "micro_batch": batch // k, "step_ms_median": 1e3 * s.median,
                     "time_ratio": s.ratio, "time_ratio_q25": s.ratio_q25, "time_ratio_q75": s.ratio_q75,
                     "blocks": s.blocks, "peak_bytes": memory[v.label].get(key), "step_times_s": measured[v.label]})
    return {"model": variants[0].cfg.model.name, "objective": opts.step_objective, "batch_size": batch,
            "steps": steps, "warmup": opts.warmup, "block": block, "memory_key": key, "rows": rows}


def step_memory_model(rows: list[dict[str, Any]], batch: int) -> tuple[float, float | None]:
    """Fit `peak = fixed + a * (B / K)` (parameters, gradients and optimizer state, plus activations of one
    micro-batch) through K = 1 and the largest K; returns (fixed bytes, a bytes per micro-batch sample), a = None
    when the peaks do not grow with the micro-batch (nothing to extrapolate)."""
    pts = [(batch / r["accum_steps"], r["peak_bytes"]) for r in rows if r.get("peak_bytes")]
    if len(pts) < 2:
        return (pts[0][1] if pts else 0.0), None
    (b1, p1), (bk, pk) = pts[0], pts[-1]
    if b1 == bk or p1 <= pk:
        return float(min(p1, pk)), None
    a = (p1 - pk) / (b1 - bk)
    return float(p1 - a * b1), float(a)


def run(extra: list[str]) -> dict[str, Any]:
    """`amorlip bench memory EXTRA...`: the loss part and the training-step part (each skippable); prints their
    tables and returns (and with --json writes) the results."""
    opts, overrides = _parse(extra)
    device = resolve_device(opts.device)
    load_warning(opts.threads)
    show = not opts.no_progress
    if opts.threads:
        torch.set_num_threads(opts.threads)
    opts.dim = opts.dim or (512 if device.type == "cuda" else 256)
    opts.batch_sizes = opts.batch_sizes or ("4096,8192,16384" if device.type == "cuda" else "1024,2048,4096")
    if opts.repeats < 1 or opts.steps < 1 or opts.warmup < 0 or opts.dim < 1:
        raise ConfigError("--repeats and --steps must be >= 1, --warmup >= 0, --dim >= 1")
    if opts.tile_size not in (None, "auto"):
        try:
            if int(opts.tile_size) < 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"--tile-size must be auto or a number of rows >= 0 (got {opts.tile_size!r})") from None
    budget = None if opts.budget_mb is None else opts.budget_mb * 2**20
    out: dict[str, Any] = {"command": "memory", "device": str(device), "dim": opts.dim, "budget_mb": opts.budget_mb,
                           "environment": environment(device)}
    if not opts.skip_loss:
        out.update(_loss_part(opts, overrides, device, show, budget))
    if not opts.skip_step:
        out["step"] = _step_part(opts, overrides, device, show, budget)
    write_json(opts.json, out)
    return out


def _parse(extra: list[str]) -> tuple[Any, list[tuple[str, str]]]:
    """The command's options and the config overrides."""
    parser = base_parser(
        "memory",
        "Peak memory of each objective's loss at growing batch, tiled vs dense (in B x B fp32 matrices), and of "
        "full steps with train.accum_steps K at a fixed global batch (step time as a ratio to K = 1).",
    )
    parser.add_argument("--objectives", default="clip,siglip,amorlip,sogclr,fastclip,neuclip",
                        help="comma-separated objectives for the loss part (default: all)")
    parser.add_argument("--batch-sizes", default=None, help="loss part: comma-separated B (default: 1024,2048,4096 "
                        "on CPU, 4096,8192,16384 on CUDA)")
    parser.add_argument("--dim", type=int, help="loss part: feature width d (default: 256 on CPU, 512 on CUDA)")
    parser.add_argument("--tile-size", default=None, help="loss part: the tiled rows' tile_size (default: auto)")
    parser.add_argument("--repeats", type=int, default=3, help="loss part: timed repeats per mode (default 3)")
    parser.add_argument("--accum", default="1,2,4,8", help="step part: comma-separated train.accum_steps K")
    parser.add_argument("--step-objective", default=DEFAULT_OBJECTIVE,
                        help=f"step part: the objective (default: {DEFAULT_OBJECTIVE})")
    parser.add_argument("--steps", type=int, default=12, help="step part: measured steps per K (default 12)")
    parser.add_argument("--warmup", type=int, default=2, help="step part: unmeasured steps per K first (default 2)")
    parser.add_argument("--budget-mb", type=float, help="report the largest batch whose peak fits this many MiB")
    parser.add_argument("--skip-loss", action="store_true", help="skip the loss part")
    parser.add_argument("--skip-step", action="store_true", help="skip the training-step part")
    return parse_args(parser, extra)


def _loss_part(opts: Any, overrides: list[tuple[str, str]], device: torch.device, show: bool,
               budget: float | None) -> dict[str, Any]:
    """The loss part (`loss_memory`) printed; with a budget also the largest batch that fits it."""
    rows = loss_memory(opts, overrides, device, show)
    table = format_table(
        ["objective", "B", "mode", "tile", "peak MB", "x B*B*4", "ms", "time / dense"],
        [[r["objective"], r["batch"], r["mode"], r["tile_rows"] or "-", mb(r["peak_bytes"]),
          f"{r['x_matrix']:.3f}x", f"{r['ms_median']:.1f}",
          f"{r['time_ratio']:.2f} [{r['time_ratio_q25']:.2f}, {r['time_ratio_q75']:.2f}]"] for r in rows])
    print(f"\nbench memory (loss): d={opts.dim}, fp32, {device}; forward + backward on fixed features, "
          f"{opts.repeats} interleaved repeats")
    print(table)
    print("x B*B*4: transient peak over one B x B fp32 matrix; time / dense: median [IQR] of the paired ratios.")
    out: dict[str, Any] = {"loss": rows, "loss_table": table}
    if budget is not None:
        fits = largest_batch(rows, budget)
        ftable = format_table(["objective", "mode", "largest measured B", "extrapolated B", "peak ~"],
                              [[f["objective"], f["mode"], f["largest_measured"] or "-", f["extrapolated"] or "-",
                                f["scaling"]] for f in fits])
        print(f"\nlargest batch whose loss fits {opts.budget_mb:g} MiB:")
        print(ftable)
        out.update(loss_budget=fits, loss_budget_table=ftable)
    return out


def _step_part(opts: Any, overrides: list[tuple[str, str]], device: torch.device, show: bool,
               budget: float | None) -> dict[str, Any]:
    """The training-step part (`step_memory`) with the peaks' linear model, printed."""
    res = step_memory(opts, overrides, device, show)
    k1 = res["rows"][0]
    fixed, per_sample = step_memory_model(res["rows"], res["batch_size"])
    for r in res["rows"]:
        r["peak_ratio"] = (r["peak_bytes"] / k1["peak_bytes"]) if r["peak_bytes"] and k1["peak_bytes"] else None
        r["fits_batch"] = (int((budget - fixed) / per_sample * r["accum_steps"])
                           if budget is not None and per_sample and budget > fixed else None)
    res.update(fixed_bytes=fixed, bytes_per_micro_sample=per_sample)
    headers = ["K", "micro-batch", "step ms", "time / K=1", "peak MB", "peak / K=1"]
    if budget is not None:
        headers.append(f"batch in {opts.budget_mb:g} MiB (model)")
    table = format_table(headers, [
        [r["accum_steps"], r["micro_batch"], f"{r['step_ms_median']:.1f}",
         f"{r['time_ratio']:.2f} [{r['time_ratio_q25']:.2f}, {r['time_ratio_q75']:.2f}]", mb(r["peak_bytes"]),
         "-" if r["peak_ratio"] is None else f"{r['peak_ratio']:.2f}x",
         *([r["fits_batch"] or "-"] if budget is not None else [])] for r in res["rows"]])
    print(f"\nbench memory (step): {res['objective']} / {res['model']}, global batch {res['batch_size']}, {device}; "
          f"{res['steps']} measured steps per K after {res['warmup']}, blocks of {res['block']}, interleaved")
    print(table)
    print("time / K=1: median [IQR] over blocks of the paired step-time ratio (= time per sample: the batch is "
          "fixed); peak: " + ("CUDA max allocated" if device.type == "cuda" else "the profiler's tensor peak")
          + " of the step.")
    res["table"] = table
    return res
