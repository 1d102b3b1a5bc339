"""`amorlip bench overhead`: per-step time and peak memory of full training steps, CLIP against the others
(the paper's Table 2: relative time and memory of AmorLIP over CLIP, swept over T_online and f_d).

How (docs/benchmarks.md gives the reasons):
* every variant trains in its own spawned process, through the unchanged `amorlip.train.train` fed by a
  `BenchStream` of pre-made batches; the parent hands a baton round-robin, so exactly one process runs at a
  time and the steps interleave (clip, X, Y, clip, X, Y, ..., the order reversed every other round): machine
  drift and other jobs' load hit every variant alike.
* per-step time: wall clock (CPU) or CUDA events (GPU) from receiving a batch to asking for the next one.
  Steps are grouped in blocks of lcm(t_online, t_target, log_every) steps so that every block holds the
  same mix of amortization and logging steps; a block's mean is the amortized step cost. Reported: the
  median block mean, and the median over blocks of the paired ratio to CLIP's same block (Delta), with half
  the interquartile range of those ratios as the noise.
* peak memory: on CUDA `torch.cuda.max_memory_allocated` of each variant's own process; on the CPU the peak
  of live tensor bytes, from the profiler's allocator events, in a fresh process per variant, plus the growth
  of the timing process's peak RSS (`ru_maxrss`) for reference.
* `--grad-checkpointing` adds the reference again with open_clip's gradient checkpointing on: the time it costs
  and the activation memory it saves, measured beside the default.
"""
from __future__ import annotations

import copy
import math
import os
import resource
import traceback
from typing import Any

import torch

from amorlip.bench.common import (
    BenchStream,
    StepHooks,
    StepTimer,
    Variant,
    add_variant_options,
    base_parser,
    block_length,
    build_variants,
    default_dataset_size,
    environment,
    load_warning,
    mb,
    mp_context,
    parse_args,
    pct,
    peak_allocated_from_trace,
    progress,
    quiet_worker,
    resolve_device,
    run_training,
    scratch_dir,
    write_json,
)
from amorlip.config import ConfigError
from amorlip.report import format_table
from amorlip.stats import paired_stats

RECV_TIMEOUT_S = 900.0


def _rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ----------------------------------------------------------------------------------------------------
# Worker processes


class _Measured(Exception):
    """Raised from a hook to leave the training run once everything needed is measured (the rest of the run,
    its final checkpoint and plots, would only cost time)."""


class _Baton(StepHooks):
    """Wait for the parent's 'go' before each step and report the step's time after it; on 'finish', record
    the peak memory and leave the run."""

    def __init__(self, conn: Any, device: torch.device, rss_before: int) -> None:
        self.conn, self.device, self.rss_before = conn, device, rss_before
        self.timer = StepTimer(device)
        self.started = False
        self.memory: dict[str, Any] = {}

    def before(self, step: int) -> None:
        if not self.started:
            self.started = True
            self.conn.send(("ready", {"pid": os.getpid(), "threads": torch.get_num_threads()}))
        msg = self.conn.recv()
        if msg == "finish":
            self.memory = {"rss_growth": _rss_bytes() - self.rss_before}
            if self.device.type == "cuda":
                self.memory["cuda_peak"] = int(torch.cuda.max_memory_allocated(self.device))
            raise _Measured
        self.timer.start()

    def after(self, step: int) -> None:
        self.timer.stop(step)
        self.conn.send(("done", self.timer.wall[step], self.timer.gpu.get(step)))


def _timing_worker(conn: Any, cfg_dict: dict, dataset_size: int) -> None:
    try:
        quiet_worker()
        from amorlip.config import config_from_dict
        from amorlip.distributed import pick_device
        import amorlip.train  # noqa: F401  (imported before the RSS baseline)

        cfg = config_from_dict(cfg_dict)
        device = pick_device(cfg.train.device)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        hooks = _Baton(conn, device, _rss_bytes())
        stream = BenchStream(cfg.train.batch_size, dataset_size, hooks=hooks, pin_memory=device.type == "cuda")
        try:
            run_training(cfg, stream)
        except _Measured:
            pass
        conn.send(("result", hooks.memory))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class _StopProfiler(StepHooks):
    """Stop the profiler after `last_step`, and leave the run at the next step."""

    def __init__(self, prof: Any, last_step: int) -> None:
        self.prof, self.last_step, self.running = prof, last_step, True

    def before(self, step: int) -> None:
        if not self.running:
            raise _Measured

    def after(self, step: int) -> None:
        if self.running and step >= self.last_step:
            self.prof.stop()
            self.running = False


def _memory_worker(conn: Any, cfg_dict: dict, dataset_size: int, last_step: int, trace_path: str) -> None:
    """Fresh process: profile allocator events from before the model is built to the end of `last_step`."""
    try:
        quiet_worker()
        from torch.profiler import ProfilerActivity, profile

        from amorlip.config import config_from_dict

        cfg = config_from_dict(cfg_dict)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        # the profiler's C++ side logs its start/stop to stderr; errors reach the parent through `conn`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        hooks = _StopProfiler(prof, last_step)
        prof.start()
        try:
            run_training(cfg, BenchStream(cfg.train.batch_size, dataset_size, hooks=hooks))
        except _Measured:
            pass
        finally:
            if hooks.running:
                prof.stop()
        prof.export_chrome_trace(trace_path)
        conn.send(("result", {"tensor_peak": peak_allocated_from_trace(trace_path)}))
    except BaseException:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _recv(conn: Any, label: str, proc: Any) -> tuple:
    if not conn.poll(RECV_TIMEOUT_S):
        raise RuntimeError(f"bench worker for {label!r} sent nothing for {RECV_TIMEOUT_S:.0f} s (pid {proc.pid})")
    try:
        msg = conn.recv()
    except EOFError:
        raise RuntimeError(f"bench worker for {label!r} died (exit code {proc.exitcode})") from None
    if msg[0] == "error":
        hint = ""
        if "OutOfMemoryError" in msg[1]:
            hint = ("\nhint: every variant trains in its own process, all at once on the same device, so the device "
                    "must hold all of them; lower --batch-size or measure fewer variants per run")
        raise RuntimeError(f"bench worker for {label!r} failed:\n{msg[1]}{hint}")
    return msg


# ----------------------------------------------------------------------------------------------------
# Orchestration


def _spawn(ctx: Any, target: Any, args: tuple) -> tuple[Any, Any]:
    parent, child = ctx.Pipe()
    p = ctx.Process(target=target, args=(child, *args), daemon=True)
    p.start()
    child.close()
    return p, parent


def measure(variants: list[Variant], dataset_size: int, rounds: int, memory_last_step: int | None, tmp: str,
            show: bool = True) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]]]:
    """Time `rounds` steps of every variant, one process per variant, one process running at a time.

    With `memory_last_step` (CPU), a fresh profiler process per variant measures the peak of live tensor bytes
    over steps 0..memory_last_step first; these run while the timing processes start up, and all of them end
    before the first timed step. Returns ({label: [seconds per step]}, {label: memory figures}).
    """
    ctx = mp_context()
    timing: dict[str, tuple[Any, Any]] = {}
    mem_procs: dict[str, tuple[Any, Any]] = {}
    try:
        for v in variants:
            timing[v.label] = _spawn(ctx, _timing_worker, (v.cfg.to_dict(), dataset_size))
        if memory_last_step is not None:
            for i, v in enumerate(variants):
                cfg = copy.deepcopy(v.cfg)
                cfg.train.steps = memory_last_step + 2
                cfg.train.name = f"{cfg.train.name}-mem"
                mem_procs[v.label] = _spawn(ctx, _memory_worker, (cfg.to_dict(), dataset_size, memory_last_step,
                                                                  os.path.join(tmp, f"trace{i}.json")))
        memory: dict[str, dict[str, Any]] = {v.label: {} for v in variants}
        for label, (p, conn) in mem_procs.items():
            memory[label]["tensor_peak"] = _recv(conn, label, p)[1]["tensor_peak"]
            p.join(timeout=120)
        for label, (p, conn) in timing.items():
            # 'ready': model built, first batch in hand, waiting for 'go'
            memory[label]["worker"] = _recv(conn, label, p)[1]
        times: dict[str, list[float]] = {v.label: [] for v in variants}
        order = [v.label for v in variants]
        bar = progress(rounds * len(order), "overhead", disable=not show)
        for r in range(rounds):
            for label in order if r % 2 == 0 else reversed(order):
                p, conn = timing[label]
                conn.send("go")
                _, wall, gpu = _recv(conn, label, p)
                times[label].append(gpu if gpu is not None else wall)
                bar.update(1)
        bar.close()
        for label in order:
            p, conn = timing[label]
            conn.send("finish")
            memory[label].update(_recv(conn, label, p)[1])
        for p, _ in timing.values():
            p.join(timeout=120)
        return times, memory
    finally:
        for p, _ in [*timing.values(), *mem_procs.values()]:
            if p.is_alive():
                p.terminate()


def run(extra: list[str]) -> dict[str, Any]:
    """`amorlip bench overhead EXTRA...`: every variant's full training steps, interleaved, against the
    reference's; prints the table and returns (and with --json writes) the results."""
    opts, overrides = _parse(extra)
    device = resolve_device(opts.device)
    load_warning(opts.threads)
    show = not opts.no_progress
    if opts.warmup < 0 or (opts.steps is not None and opts.steps < 1):
        raise ConfigError("--steps must be >= 1 and --warmup >= 0")

    with scratch_dir("overhead") as tmp:
        probe = build_variants(opts, overrides, 1, tmp)
        full_block = opts.block or block_length([v.cfg for v in probe], 10**9)
        steps = opts.steps or full_block * max(1, math.ceil(max(60, 4 * full_block) / full_block))
        block = opts.block or block_length([v.cfg for v in probe], steps)
        total = opts.warmup + steps + 1  # +1: a spare step the loop runs after the last measured one
        variants, ref = _variants(opts, overrides, total, tmp)
        dataset_size = default_dataset_size(ref.cfg, total, opts.dataset_size)

        mem_last = None
        if device.type == "cpu" and not opts.no_memory:
            mem_last = max([1, *[p for v in variants for p in _periods(v)]])
        times, memory = measure(variants, dataset_size, opts.warmup + steps, mem_last, tmp, show)
        measured = {k: v[opts.warmup:] for k, v in times.items()}
        stats = paired_stats(measured, ref.label, block)

    mem_key = "cuda_peak" if device.type == "cuda" else "tensor_peak"
    results, rows = _results(variants, ref, stats, memory, measured, mem_key)
    mem_name = "peak CUDA alloc" if device.type == "cuda" else "peak tensors"
    headers = ["variant", "step time", "Δ time", "noise", mem_name, "Δ mem", "RSS growth", "Δ RSS"]
    table = format_table(headers, rows)
    cfg = ref.cfg
    threads = memory[ref.label].get("worker", {}).get("threads")
    print(f"\nbench overhead: {cfg.model.name}, batch {cfg.train.batch_size}, {cfg.model.precision}, {device} "
          f"({threads} threads per process); {steps} measured steps per variant after {opts.warmup} warm-up, "
          f"blocks of {block}, interleaved")
    print(table)
    print("step time: median over blocks of the block-mean step; Δ: median over blocks of the paired ratio to "
          f"{ref.label}; noise: half its interquartile range.")
    out = {
        "command": "overhead", "model": cfg.model.name, "batch_size": cfg.train.batch_size,
        "precision": cfg.model.precision, "steps": steps, "warmup": opts.warmup, "block": block,
        "dataset_size": dataset_size, "environment": environment(device), "variants": results, "table": table,
        "worker_threads": memory[ref.label].get("worker", {}).get("threads"),
    }
    write_json(opts.json, out)
    return out


def _parse(extra: list[str]) -> tuple[Any, list[tuple[str, str]]]:
    """The command's options and the config overrides."""
    parser = base_parser(
        "overhead",
        "Per-step time and peak memory of full training steps, measured interleaved in one run: absolute "
        "figures for clip, relative deltas for the others (the paper's Table 2).",
    )
    add_variant_options(parser, "clip,amorlip")
    parser.add_argument("--steps", type=int, help="measured steps per variant (default: 4 blocks, at least 60)")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured steps per variant first (default 10)")
    parser.add_argument("--block", type=int, help="steps per statistics block (default: lcm of the periodic costs)")
    parser.add_argument("--dataset-size", type=int, help="samples the stream pretends to have (default: the config's)")
    parser.add_argument("--aa", action="store_true", help="add a second clip process (A/A control: shows the noise)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="add a row: the reference with model.grad_checkpointing true (its time and memory cost)")
    parser.add_argument("--no-memory", action="store_true", help="CPU: skip the profiler memory pass")
    return parse_args(parser, extra)


def _variants(opts: Any, overrides: list[tuple[str, str]], total: int, tmp: str) -> tuple[list[Variant], Variant]:
    """(the variants of `total` steps, the reference), with the A/A and grad-checkpointing rows after the
    reference when asked."""
    variants = build_variants(opts, overrides, total, tmp)
    ref = next(v for v in variants if v.is_reference)
    if opts.aa:
        aa = copy.deepcopy(ref.cfg)
        aa.train.name = f"{aa.train.name}-aa"
        variants.insert(variants.index(ref) + 1, Variant(f"{ref.label} (A/A)", aa))
    if opts.grad_checkpointing:
        variants.insert(variants.index(ref) + 1, grad_checkpointing_variant(ref))
    return variants, ref


def _results(variants: list[Variant], ref: Variant, stats: dict[str, Any], memory: dict[str, dict[str, Any]],
             measured: dict[str, list[float]], mem_key: str) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Per variant: its time and memory against the reference's, and its table row."""
    rows, results = [], []
    for v in variants:
        s = stats[v.label]
        peak = memory[v.label].get(mem_key)
        rss = memory[v.label].get("rss_growth")
        ref_peak = memory[ref.label].get(mem_key)
        ref_rss = memory[ref.label].get("rss_growth")
        mem_delta = 100.0 * (peak / ref_peak - 1.0) if peak and ref_peak else None
        rss_delta = 100.0 * (rss / ref_rss - 1.0) if rss and ref_rss else None
        results.append({
            "label": v.label, "objective": v.cfg.objective, "reference": v.is_reference,
            "step_ms_median": 1e3 * s.median, "step_ms_q25": 1e3 * s.q25, "step_ms_q75": 1e3 * s.q75,
            "time_delta_pct": s.delta_pct, "time_noise_pct": s.noise_pct, "blocks": s.blocks,
            "paired_ratios": s.ratios, mem_key: peak, "mem_delta_pct": mem_delta,
            "rss_growth": rss, "rss_delta_pct": rss_delta, "step_times_s": measured[v.label],
            "amor": _amor_settings(v),
        })
        if v.is_reference:
            rows.append([v.label, f"{1e3 * s.median:.2f} ms", "ref", "-", f"{mb(peak)} MB", "ref",
                         f"{mb(rss)} MB", "ref"])
        else:
            rows.append([v.label, f"{1e3 * s.median:.2f} ms", pct(s.delta_pct), f"±{s.noise_pct:.2f}%",
                         f"{mb(peak)} MB", pct(mem_delta), f"{mb(rss)} MB", pct(rss_delta)])
    return results, rows


def grad_checkpointing_variant(ref: Variant) -> Variant:
    """The reference configuration with open_clip's gradient checkpointing on (`--grad-checkpointing`)."""
    if ref.cfg.model.grad_checkpointing:
        raise ConfigError("--grad-checkpointing adds a row with model.grad_checkpointing true, but the reference "
                          "already has it (drop --model.grad-checkpointing, or --grad-checkpointing)")
    cfg = copy.deepcopy(ref.cfg)
    cfg.model.grad_checkpointing = True
    cfg.train.name = f"{cfg.train.name}-gc"
    return Variant(f"{ref.label} +grad-ckpt", cfg)


def _periods(v: Variant) -> list[int]:
    from amorlip.objectives.registry import period_steps

    return [p for p in period_steps(v.cfg) if p <= 64]


def _amor_settings(v: Variant) -> dict[str, Any] | None:
    """The settings that size the objective's amortised work (its registry entry's `amortised`), or None."""
    from amorlip.objectives.registry import entry_of

    entry = entry_of(v.cfg)
    if entry is None or not entry.amortised:
        return None
    options = entry.options_of(v.cfg)
    return {key: getattr(options, key) for key in entry.amortised}
