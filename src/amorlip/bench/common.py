"""What every `amorlip bench` command shares: options, variants, a stream of pre-made batches that times the
real training step, the block length that lets drift cancel, and JSON (the statistics are in amorlip.stats, the
tables in amorlip.report).

The central piece is `BenchStream`: a `TrainStream` whose batches are made once (random pixels at the size
the model's train transform produces, tokenized captions, distinct sample indices every step) and whose
iterator calls `hooks.before(step)` when it hands out a batch and `hooks.after(step)` when the training loop
asks for the next one. Passed to `amorlip.train.train(cfg, stream=...)`, it lets the benchmarks time, count
and profile the unchanged training loop: forward, objective (amortization when due), temperature scheme,
backward, clipping, optimizer, clamp and logging; everything but data loading, which `bench data` and
`bench throughput` cover.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from amorlip.batching import split_batch
from amorlip.config import Config, ConfigError, build_config, parse_overrides
from amorlip.objectives.registry import DEFAULT_OBJECTIVE, REGISTRY, period_steps
from amorlip.progress import counter as progress  # noqa: F401 - the benchmarks' bar (plain lines off a TTY)


# ----------------------------------------------------------------------------------------------------
# Options


def base_parser(what: str, description: str) -> argparse.ArgumentParser:
    """The options every bench command takes; anything else on the line is a `--section.key VALUE` override."""
    p = argparse.ArgumentParser(
        prog=f"amorlip bench {what}",
        description=description,
        epilog="Any other --section.key VALUE is a config override (see `amorlip train --help`).",
        allow_abbrev=False,
    )
    p.add_argument("--config", help="preset name or YAML file for the base configuration (default: built-in defaults)")
    # each also under its `amorlip train` spelling (--model.name, --train.batch-size, ...), dashes or underscores
    p.add_argument("--model", "--model.name", dest="model",
                   help="model config name (model.name), e.g. tiny-vit, micro-vit, RN50, ViT-B-32")
    p.add_argument("--batch-size", "--train.batch-size", "--train.batch_size", dest="batch_size", type=int,
                   help="global batch size (train.batch_size)")
    p.add_argument("--device", "--train.device", dest="device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when available (train.device)")
    p.add_argument("--precision", "--model.precision", dest="precision", choices=["fp32", "bf16", "fp16"],
                   help="model.precision (autocast on CUDA)")
    p.add_argument("--threads", "--train.threads", dest="threads", type=int,
                   help="torch CPU threads per process (train.threads; default: torch's)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def add_variant_options(p: argparse.ArgumentParser, default_objectives: str) -> None:
    p.add_argument(
        "--objectives", default=default_objectives,
        help="comma-separated objectives; an entry may carry overrides, e.g. 'clip,amorlip[amor.t_lambda=1]' "
             f"(default: {default_objectives})",
    )
    p.add_argument("--t-online", help="AmorLIP sweep: comma-separated amor.t_online values, e.g. 1,8")
    p.add_argument("--dim-factor", help="AmorLIP sweep: comma-separated amor.dim_factor values, e.g. 0.5,1.0")


def parse_args(parser: argparse.ArgumentParser, extra: list[str]) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    """Known options + the remaining words as config overrides (clear error for stray words)."""
    opts, rest = parser.parse_known_args(extra)
    overrides = parse_overrides(rest)
    if opts.model:
        overrides.append(("model.name", opts.model))
    if opts.batch_size:
        overrides.append(("train.batch_size", str(opts.batch_size)))
    if opts.precision:
        overrides.append(("model.precision", opts.precision))
    if opts.threads:
        overrides.append(("train.threads", str(opts.threads)))
    overrides.append(("train.device", opts.device))
    return opts, overrides


def split_list(text: str | None, cast: Callable[[str], Any] = str) -> list[Any]:
    if not text:
        return []
    try:
        return [cast(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as a comma-separated list of {cast.__name__}") from None


# ----------------------------------------------------------------------------------------------------
# Variants


@dataclass
class Variant:
    """One configuration to measure: a label for the table, and its full config."""

    label: str
    cfg: Config
    is_reference: bool = False


def bench_overrides(steps: int, out_dir: str, label: str) -> list[tuple[str, str]]:
    """Overrides that make `train` a measurement run: no evaluation, no progress bar, no mid-run checkpoint."""
    from amorlip.compare.entries import safe_name

    return [
        ("train.steps", str(steps)),
        ("train.epochs", "none"),
        ("train.stop_at", "none"),
        ("train.resume", "none"),
        ("train.progress", "false"),
        ("train.checkpoint_every", "0"),
        ("train.eval_every", "0"),
        ("train.tensorboard", "false"),
        ("eval.zeroshot", "false"),
        ("eval.retrieval", "false"),
        ("train.output_dir", out_dir),
        ("train.name", safe_name(label) or "run"),
    ]


def build_variants(
    opts: argparse.Namespace, overrides: list[tuple[str, str]], steps: int, out_dir: str
) -> list[Variant]:
    """Expand `--objectives` (with per-entry overrides) and the AmorLIP sweeps into configs.

    The reference row (absolute figures) is the first plain `clip` entry, else the first entry. An AmorLIP
    entry that sets neither swept key itself is expanded over the product of `--t-online` x `--dim-factor`.
    """
    from amorlip.compare.entries import parse_entry, split_entries

    sweep_values = {key: split_list(getattr(opts, key, None), type(getattr(e.options(), key)))
                    for e in REGISTRY.values() for key in e.sweeps}  # `--t-online 1,8`: ints, as amor.t_online
    variants: list[Variant] = []
    for text in split_entries(opts.objectives):
        entry = parse_entry(text)
        sweeps: list[tuple[str, list[tuple[str, str]]]] = [(entry.label, [])]
        registered = REGISTRY.get(entry.objective)
        own = {k.replace("-", "_") for k, _ in entry.overrides}
        for key, short in (registered.sweeps.items() if registered else ()):
            values, dotted = sweep_values[key], f"{registered.section}.{key}"
            if values and dotted not in own:
                sweeps = [(f"{lab} {short}={v:g}", ov + [(dotted, str(v))]) for lab, ov in sweeps for v in values]
        for label, sweep_ov in sweeps:
            ov = [("objective", entry.objective), *overrides, *entry.overrides, *sweep_ov,
                  *bench_overrides(steps, out_dir, f"{len(variants)}-{label}")]
            variants.append(Variant(label, build_config(opts.config, ov)))
    if not variants:
        raise ConfigError("--objectives is empty; name at least one objective, e.g. --objectives clip,amorlip")
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--objectives lists the same entry twice ({labels}); give each a distinct override")
    ref = next((v for v in variants if v.label == DEFAULT_OBJECTIVE), variants[0])
    ref.is_reference = True
    return variants


def block_length(cfgs: Sequence[Config], steps: int, include_logging: bool = True) -> int:
    """Steps per statistics block: the least common multiple of every periodic cost (AmorLIP's t_online and
    t_target, the logging interval) that fits in `steps`, so each block holds the same mix of cheap and
    expensive steps and a block's mean is the amortized per-step cost."""
    periods = [p for cfg in cfgs for p in period_steps(cfg)]
    if include_logging:
        periods += [int(cfg.train.log_every) for cfg in cfgs]
    block = 1
    for p in periods:
        if p >= 1 and math.lcm(block, p) <= max(1, steps):
            block = math.lcm(block, p)
    return block


# ----------------------------------------------------------------------------------------------------
# The stream of pre-made batches


class StepHooks:
    """Called by `BenchStream` around every training step."""

    def before(self, step: int) -> None:
        """The loop is about to receive the batch of `step`."""

    def after(self, step: int) -> None:
        """The loop finished `step` (forward, backward, optimizer, logging) and asks for the next batch."""


class StepTimer(StepHooks):
    """Wall time of every step and, on CUDA, the time between CUDA events recorded at its two ends.

    The device is synchronised at both ends, so a step's time holds all of its GPU work and none of the
    next step's.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.wall: dict[int, float] = {}
        self.gpu: dict[int, float] = {}
        self._t0 = 0.0
        self._ev0: Any = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._ev0 = torch.cuda.Event(enable_timing=True)
            self._ev0.record()
        self._t0 = time.perf_counter()

    def stop(self, step: int) -> None:
        if self.cuda:
            ev1 = torch.cuda.Event(enable_timing=True)
            ev1.record()
            ev1.synchronize()
            self.gpu[step] = self._ev0.elapsed_time(ev1) / 1e3
        self.wall[step] = time.perf_counter() - self._t0

    def before(self, step: int) -> None:
        self.start()

    def after(self, step: int) -> None:
        self.stop(step)

    def times(self) -> dict[int, float]:
        """Seconds per step: CUDA-event times on the GPU, wall times on the CPU."""
        return self.gpu if self.cuda else self.wall


def blank_image_size(transform: Callable) -> tuple[int, ...]:
    """Shape of the tensor `transform` makes from an image (what the model is fed)."""
    from PIL import Image

    return tuple(transform(Image.new("RGB", (64, 64), (127, 127, 127))).shape)


class BenchStream:
    """`TrainStream` of pre-made batches (see the module docstring). Epoch `e`, batch `j` carries the sample
    indices `[j B + r b, j B + (r+1) b)` (B global, b local batch, r the rank), distinct within an epoch."""

    def __init__(self, batch_size: int, dataset_size: int, rank: int = 0, world_size: int = 1,
                 hooks: StepHooks | None = None, pin_memory: bool = False, seed: int = 0) -> None:
        from amorlip.data.types import DataStats

        self.batch_size, self.local_batch_size = batch_size, split_batch(batch_size, world_size)
        self.dataset_size = int(dataset_size)
        self.steps_per_epoch = self.dataset_size // batch_size
        self.rank, self.world_size = rank, world_size
        self.hooks = hooks or StepHooks()
        self.pin_memory, self.seed = pin_memory, seed
        self.stats = DataStats()
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def make_batch(self, transform: Callable, tokenizer: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(transform), id(tokenizer))
        if key not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1000 + self.rank)
            b = self.local_batch_size
            images = torch.randn((b, *blank_image_size(transform)), generator=g)
            words = ["red", "blue", "green", "small", "large", "circle", "square", "star", "left", "right"]
            captions = [f"a photo of a {words[i % 10]} {words[(i // 10) % 10]} {words[(i // 100) % 10]} number {i}"
                        for i in range(b)]
            texts = torch.as_tensor(tokenizer(captions)).long()
            if self.pin_memory:
                images, texts = images.pin_memory(), texts.pin_memory()
            self._cache[key] = (images, texts)
        return self._cache[key]

    def iterate(self, epoch: int, skip_batches: int, transform: Callable, tokenizer: Callable) -> Iterator[dict]:
        """Batches of `epoch` from `skip_batches` on, shaped by `transform` and `tokenizer` (a RECLIP phase's
        image size and context length come through them)."""
        images, texts = self.make_batch(transform, tokenizer)
        b = self.local_batch_size
        for j in range(skip_batches, self.steps_per_epoch):
            step = epoch * self.steps_per_epoch + j
            start = j * self.batch_size + self.rank * b
            index = torch.arange(start, start + b, dtype=torch.int64)
            self.hooks.before(step)
            try:
                yield {"image": images, "text": texts, "index": index}
            finally:
                # Also when the loop breaks out after this step (last step, RECLIP phase boundary): CPython
                # closes the abandoned generator at once, which runs this with the step complete.
                self.hooks.after(step)


def default_dataset_size(cfg: Config, total_steps: int, requested: int | None) -> int:
    """Samples the stream pretends to have (sizes SogCLR/FastCLIP's per-sample buffers): `requested`, else
    the config's data size; at least one batch."""
    size = requested or cfg.data.dataset_size or cfg.data.synthetic_size
    return max(int(size), cfg.train.batch_size)


def run_training(cfg: Config, stream: BenchStream) -> None:
    """`amorlip.train.train(cfg, stream=stream)` with its printing silenced (the run summary is noise here)."""
    from amorlip.train import train

    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg, stream=stream)


def quiet_worker() -> None:
    """For spawned workers: no stdout chatter, no 'no pretrained weights' warnings."""
    import logging
    import warnings

    sys.stdout = open(os.devnull, "w")
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


WORKER_PRELOAD = ["amorlip.train", "amorlip.bench.overhead", "amorlip.bench.comm"]


def mp_context():
    """Start method for worker processes: a forkserver that has imported torch, open_clip and the trainer once
    (`WORKER_PRELOAD`), so each worker forks ready in a fraction of a second instead of importing them again
    (seconds each); 'spawn' where forkserver does not exist. The server never runs torch ops or touches CUDA,
    so forking from it is safe."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_PRELOAD)
    return ctx


def resolve_device(pref: str) -> torch.device:
    from amorlip.distributed import pick_device

    try:
        return pick_device(pref)
    except ValueError as e:
        raise ConfigError(str(e).replace("train.device", "--device")) from None


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f"amorlip-bench-{prefix}-")


def peak_allocated_from_trace(path: str, device_type: int = 0) -> int:
    """Peak of the profiler's 'Total Allocated' over the allocator events of `device_type` (0 = CPU) in a
    Chrome trace written by `torch.profiler` with `profile_memory=True`: the most tensor bytes alive at once
    among those allocated while the profiler ran. The CPU counter keeps, across profiler sessions, the bytes
    of tensors an earlier session allocated and that were freed while no profiler ran; the level before this
    trace's first event is subtracted, so the figure is this session's own."""
    with open(path) as f:
        events = json.load(f).get("traceEvents", [])
    peak, base = 0, None
    for e in events:
        if e.get("name") == "[memory]":
            args = e.get("args", {})
            if int(args.get("Device Type", -1)) == device_type:
                total = int(args.get("Total Allocated", 0))
                if base is None:  # the counter persists across profiler sessions: start from this one's level
                    base = total - int(args.get("Bytes", 0))
                peak = max(peak, total - base)
    return peak


def cpu_tensor_peak(fn: Callable[[], Any]) -> int:
    """Peak of live CPU tensor bytes allocated while `fn()` runs (allocations made before it are not counted,
    nor are their frees): the CPU counterpart of CUDA's max_memory_allocated, from the profiler's allocator
    events (`profile_memory=True`)."""
    from torch.profiler import ProfilerActivity, profile

    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # the profiler logs its start/stop on stderr
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        return peak_allocated_from_trace(path)


# ----------------------------------------------------------------------------------------------------
# Output


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if not path:
        return
    from amorlip.files import atomic_write_text

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(data, indent=2, default=_json_default), out)
    print(f"wrote {out}")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (torch.device, Path)):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    import platform

    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def load_warning(threads: int | None) -> None:
    """Say so when other jobs load the CPU: multi-threaded ops then stall on descheduled threads, so times
    get several times longer and far noisier (one thread per process is steadier)."""
    if not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores and (threads or 0) != 1:
        print(f"note: load average {load:.1f} on {cores} cores (other jobs are running); timings will be noisy. "
              "On a shared CPU, --threads 1 gives steadier per-step times.", file=sys.stderr)


def mb(nbytes: float | None) -> str:
    return "-" if nbytes is None or (isinstance(nbytes, float) and math.isnan(nbytes)) else f"{nbytes / 2**20:.1f}"


def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}%"
