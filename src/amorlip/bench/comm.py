"""`amorlip bench comm`: collectives per training step in a 2-process (gloo, CPU) run.

The command spawns `--world-size` processes itself (gloo on the CPU, as the tests do) and runs the unchanged
trainer under DistributedDataParallel in each, fed by a `BenchStream`. Per step it records:

* the objective's collectives, by kind, from `amorlip.distributed.COLLECTIVES` (the counted helpers every
  objective must use), with their payload (bytes each rank contributes) and time, through timing wrappers
  put around those helpers in the worker processes. A gather with gradient is timed forward only: its
  backward (a reduce-scatter inside autograd) is neither counted nor timed, and moves as many bytes again.
* DDP's own gradient all-reduce, which does not go through those helpers: buckets per step, bytes and the
  time from launch to completion (overlapping the backward pass), through a counting DDP communication hook.

The table shows AmorLIP's feature gathers at 1/T_online of CLIP's payload: CLIP gathers both modalities with
gradient every step, AmorLIP gathers them (without gradient) on Stage-I steps only, plus `t_lambda` small
all-reduces of the amortization nets' gradients there (`amor.sync_grads`).
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from collections import Counter, defaultdict
from typing import Any

import torch

from amorlip.bench.common import (
    BenchStream,
    StepHooks,
    StepTimer,
    add_variant_options,
    base_parser,
    build_variants,
    default_dataset_size,
    environment,
    mp_context,
    parse_args,
    quiet_worker,
    run_training,
    scratch_dir,
    write_json,
)
from amorlip.config import ConfigError
from amorlip.report import format_table
from amorlip.batching import split_batch
from amorlip.objectives.registry import options_of

HELPERS = ("gather_with_grad", "gather_no_grad", "all_reduce_mean_", "all_reduce_sum_", "broadcast_")
KINDS = ("all_gather_grad", "all_gather", "all_reduce", "broadcast")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Tally:
    """Per-step bytes and seconds of the helpers and of DDP's bucket all-reduces (reset every step)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bytes: Counter = Counter()
        self.seconds: Counter = Counter()
        self.ddp_buckets = 0
        self.ddp_bytes = 0
        self.ddp_seconds = 0.0


TALLY = _Tally()


def _timed(name: str, fn: Any) -> Any:
    def wrapped(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(x, *args, **kwargs)
        TALLY.seconds[name] += time.perf_counter() - t0
        TALLY.bytes[name] += x.numel() * x.element_size()
        return out

    wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
    wrapped.__doc__ = fn.__doc__
    return wrapped


def _counting_allreduce_hook(state: Any, bucket: Any) -> Any:
    """DDP's default all-reduce, counted and timed (launch to completion)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buf = bucket.buffer()
    TALLY.ddp_buckets += 1
    TALLY.ddp_bytes += buf.numel() * buf.element_size()
    t0 = time.perf_counter()
    fut = default_hooks.allreduce_hook(None, bucket)

    def done(f: Any) -> Any:
        TALLY.ddp_seconds += time.perf_counter() - t0
        return f.value()

    return fut.then(done)


# DDP checks the hook's annotations against the real types (`from __future__ import annotations` makes them strings).
_counting_allreduce_hook.__annotations__ = {"state": object, "bucket": torch.distributed.GradBucket,
                                            "return": torch.futures.Future[torch.Tensor]}


def _install_instruments() -> None:
    """Timing wrappers around the counted helpers, and a DDP subclass that registers the counting hook.

    Objectives call `distributed.<helper>(...)` through the module, so replacing the module attributes reaches
    every call; the trainer's set-up (amorlip.train_setup.wrap) looks `DDP` up in its module when it wraps the
    model.
    """
    from torch.nn.parallel import DistributedDataParallel

    import amorlip.train_setup as setup_module
    from amorlip import distributed

    for name in HELPERS:
        setattr(distributed, name, _timed(name, getattr(distributed, name)))

    class CountingDDP(DistributedDataParallel):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.register_comm_hook(None, _counting_allreduce_hook)

    setup_module.DDP = CountingDDP


class _StepComm(StepHooks):
    """Per measured step: collective counts by kind, helper bytes/seconds, DDP buckets/bytes/seconds, time."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.timer = StepTimer(torch.device("cpu"))
        self.records: list[dict[str, Any]] = []
        self._before: Counter = Counter()

    def before(self, step: int) -> None:
        from amorlip.distributed import COLLECTIVES

        self._before = Counter(COLLECTIVES)
        TALLY.reset()
        self.timer.start()

    def after(self, step: int) -> None:
        from amorlip.distributed import COLLECTIVES

        self.timer.stop(step)
        if not self.warmup <= step < self.warmup + self.steps:
            return
        counts = Counter(COLLECTIVES)
        counts.subtract(self._before)
        self.records.append({
            "step": step,
            "counts": {k: int(counts.get(k, 0)) for k in KINDS},
            "helper_bytes": dict(TALLY.bytes),
            "helper_seconds": dict(TALLY.seconds),
            "ddp_buckets": TALLY.ddp_buckets,
            "ddp_bytes": TALLY.ddp_bytes,
            "ddp_seconds": TALLY.ddp_seconds,
            "step_seconds": self.timer.wall[step],
        })


def _worker(rank: int, world_size: int, port: int, cfg_dicts: list[dict], dataset_size: int, warmup: int,
            steps: int, threads: int, out_dir: str) -> None:
    """Collective: every spawned rank runs this together. One rank: run every variant's training in turn in the
    same process group, write its records."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    try:
        quiet_worker()
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        _install_instruments()
        from amorlip.config import config_from_dict

        results = []
        for d in cfg_dicts:
            cfg = config_from_dict(d)
            hooks = _StepComm(warmup, steps)
            run_training(cfg, BenchStream(cfg.train.batch_size, dataset_size, rank, world_size, hooks=hooks))
            results.append(hooks.records)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    except BaseException:  # noqa: BLE001
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the measured steps and means per step."""
    n = max(1, len(records))
    totals = {k: sum(r["counts"][k] for r in records) for k in KINDS}
    hb: dict[str, float] = defaultdict(float)
    hs: dict[str, float] = defaultdict(float)
    for r in records:
        for k, v in r["helper_bytes"].items():
            hb[k] += v
        for k, v in r["helper_seconds"].items():
            hs[k] += v
    gather_bytes = hb["gather_with_grad"] + hb["gather_no_grad"]
    return {
        "steps": len(records),
        "totals": totals,
        "per_step": {k: v / n for k, v in totals.items()},
        "gathers_per_step": (totals["all_gather_grad"] + totals["all_gather"]) / n,
        "gather_bytes_per_step": gather_bytes / n,
        "helper_bytes_per_step": {k: v / n for k, v in hb.items()},
        "collective_ms_per_step": 1e3 * sum(hs.values()) / n,
        "ddp_buckets_per_step": sum(r["ddp_buckets"] for r in records) / n,
        "ddp_bytes_per_step": sum(r["ddp_bytes"] for r in records) / n,
        "ddp_ms_per_step": 1e3 * sum(r["ddp_seconds"] for r in records) / n,
        "step_ms_median": 1e3 * sorted(r["step_seconds"] for r in records)[len(records) // 2] if records else None,
        "gather_steps": [r["step"] for r in records if r["counts"]["all_gather_grad"] + r["counts"]["all_gather"]],
    }


def run(extra: list[str]) -> dict[str, Any]:
    """`amorlip bench comm EXTRA...`: every variant trained in `--world-size` spawned gloo processes; prints the
    table and returns (and with --json writes) the results."""
    opts, overrides = _parse(extra)
    with scratch_dir("comm") as tmp:
        variants = build_variants(opts, overrides, opts.warmup + opts.steps + 1, tmp)
        ref = next(v for v in variants if v.is_reference)
        split_batch(ref.cfg.train.batch_size, opts.world_size)
        dataset_size = default_dataset_size(ref.cfg, opts.warmup + opts.steps + 1, opts.dataset_size)
        threads = opts.threads or 1
        if not opts.no_progress:
            print(f"bench comm: {len(variants)} variants x {opts.warmup + opts.steps + 1} steps in {opts.world_size} "
                  "gloo processes ...", flush=True)
        per_rank = _spawn(opts, variants, dataset_size, threads, tmp)

    results, rows = _results(variants, ref, per_rank, opts.world_size)
    headers = ["variant", "gather+grad", "gather", "all_reduce", "broadcast", "gathered KiB", "vs ref",
               "coll. ms", "DDP buckets", "DDP MiB", "DDP ms", "step ms"]
    table = format_table(headers, rows)
    cfg = ref.cfg
    print(f"\nbench comm: {cfg.model.name}, global batch {cfg.train.batch_size}, {opts.world_size} gloo processes x "
          f"{threads} threads; per step, mean over {opts.steps} steps after {opts.warmup}")
    print(table)
    print("gather+grad / gather / all_reduce / broadcast: the objective's collectives "
          "(amorlip.distributed.COLLECTIVES); "
          "gathered KiB: payload each rank contributes to feature gathers (a gather with gradient moves as much "
          "again in its backward, not counted); DDP: gradient all-reduce buckets, launch to completion.")
    if not all(r["ranks_agree"] for r in results):
        print("warning: the ranks disagree on collective counts (a hang risk): see the JSON")
    out = {"command": "comm", "model": cfg.model.name, "batch_size": cfg.train.batch_size,
           "world_size": opts.world_size, "threads": threads, "steps": opts.steps, "warmup": opts.warmup,
           "environment": environment(torch.device("cpu")), "variants": results, "table": table}
    write_json(opts.json, out)
    return out


def _parse(extra: list[str]) -> tuple[Any, list[tuple[str, str]]]:
    """The command's options (t_online defaulting to 1,8) and the config overrides (train.device cpu added)."""
    parser = base_parser(
        "comm",
        "Collectives per training step in a multi-process gloo run (spawned by this command): counts, payload "
        "and time of the objective's collectives, and DDP's gradient buckets.",
    )
    add_variant_options(parser, "clip,fastclip,amorlip")
    parser.add_argument("--steps", type=int, default=16, help="measured steps per variant (default 16)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (default 2)")
    parser.add_argument("--world-size", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--dataset-size", type=int, help="samples the stream pretends to have (default: the config's)")
    opts, overrides = parse_args(parser, extra)
    if opts.t_online is None:
        opts.t_online = "1,8"
    if opts.device == "cuda":
        raise ConfigError("bench comm runs gloo processes on the CPU; drop --device cuda")
    overrides.append(("train.device", "cpu"))
    if opts.world_size < 2 or opts.steps < 1 or opts.warmup < 0:
        raise ConfigError("--world-size must be >= 2, --steps >= 1, --warmup >= 0")
    return opts, overrides


def _spawn(opts: Any, variants: list, dataset_size: int, threads: int, tmp: str) -> list[list[list[dict]]]:
    """Run `_worker` in `--world-size` processes; each rank's per-variant step records (a worker's traceback
    becomes the error)."""
    import torch.multiprocessing as mp

    try:
        mp.start_processes(
            _worker,
            args=(opts.world_size, free_port(), [v.cfg.to_dict() for v in variants], dataset_size, opts.warmup,
                  opts.steps, threads, tmp),
            nprocs=opts.world_size, join=True, start_method=mp_context().get_start_method(),
        )
    except Exception as e:  # noqa: BLE001 - show the worker's own traceback
        errs = [p for p in sorted(os.listdir(tmp)) if p.endswith(".err")]
        detail = open(os.path.join(tmp, errs[0])).read() if errs else str(e)
        raise RuntimeError(f"bench comm worker failed:\n{detail}") from None
    return [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(opts.world_size)]


def _results(variants: list, ref: Any, per_rank: list, world_size: int) -> tuple[list[dict[str, Any]], list[list]]:
    """Per variant: rank 0's summary, its gathered bytes against the reference's and whether every rank counted
    the same collectives; and its table row."""
    results, rows = [], []
    ref_summary = summarize(per_rank[0][variants.index(ref)])
    for i, v in enumerate(variants):
        s = summarize(per_rank[0][i])
        consistent = all(summarize(per_rank[r][i])["totals"] == s["totals"] for r in range(world_size))
        ref_bytes = ref_summary["gather_bytes_per_step"]
        ratio = s["gather_bytes_per_step"] / ref_bytes if ref_bytes else None
        results.append({"label": v.label, "objective": v.cfg.objective, **s, "gather_bytes_vs_reference": ratio,
                        "ranks_agree": consistent,
                        "t_online": getattr(options_of(v.cfg), "t_online", None)})
        pc = s["per_step"]
        rows.append([
            v.label, f"{pc['all_gather_grad']:.3g}", f"{pc['all_gather']:.3g}", f"{pc['all_reduce']:.3g}",
            f"{pc['broadcast']:.3g}", f"{s['gather_bytes_per_step'] / 1024:.1f}",
            "ref" if v is ref else (f"{ratio:.3f}x" if ratio is not None else "-"),
            f"{s['collective_ms_per_step']:.2f}", f"{s['ddp_buckets_per_step']:.3g}",
            f"{s['ddp_bytes_per_step'] / 2**20:.2f}", f"{s['ddp_ms_per_step']:.1f}", f"{s['step_ms_median']:.1f}",
        ])
    return results, rows
