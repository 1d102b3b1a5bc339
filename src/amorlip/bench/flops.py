"""`amorlip bench flops`: FLOPs and time per training step, per RECLIP resolution phase (docs/reclip.md).

For each variant one training run is made of the config's phases, each given the same number of steps
(`--warmup` + `--steps`; the phases' sizes and order are the config's, only their lengths change), through
the unchanged trainer fed by a `BenchStream` (whose batches take each phase's image size and context length
from the transform and tokenizer the trainer hands it). In every phase:

* FLOPs of one full training step (forward, objective, backward, optimizer) with
  `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention; 2 FLOPs per multiply-add),
  counted on the last warm-up step of the phase;
* the model's own forward + backward FLOPs from `amorlip.reclip.flops_per_step` (a meta-device count that
  leaves out the loss and the optimizer), when that module is present;
* the median time of the phase's measured steps (CUDA events on a GPU).

Without a `resolution` section the model's native size is the only phase. The last lines scale the figures
to the config's whole schedule (its `train.steps` split by its own fractions) against native size throughout.
"""
from __future__ import annotations

import statistics
from typing import Any

import torch

from amorlip.bench.common import (
    BenchStream,
    StepHooks,
    StepTimer,
    add_variant_options,
    base_parser,
    build_variants,
    environment,
    load_warning,
    parse_args,
    progress,
    resolve_device,
    run_training,
    scratch_dir,
    write_json,
)
from amorlip.config import ConfigError, build_config
from amorlip.report import format_table
from amorlip.objectives.registry import DEFAULT_OBJECTIVE


def flop_counter() -> Any:
    """A `FlopCounterMode` that also counts the CPU flash-attention kernels (SDPA on the CPU), which torch's
    registry lacks (it has the CUDA ones): the same formulas as for those (2 FLOPs per multiply-add)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    custom: dict[Any, Any] = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry and hasattr(fc, "sdpa_flop_count"):
        custom[fwd] = lambda q, k, v, *args, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v)
    if bwd is not None and bwd not in fc.flop_registry and hasattr(fc, "sdpa_backward_flop_count"):
        custom[bwd] = lambda g, q, k, v, *args, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v)
    return fc.FlopCounterMode(display=False, custom_mapping=custom)


class _PhaseHooks(StepHooks):
    """Count FLOPs on the last warm-up step of each phase, time the measured steps."""

    def __init__(self, device: torch.device, per_phase: int, warmup: int, bar: Any) -> None:
        self.timer = StepTimer(device)
        self.per_phase, self.warmup, self.bar = per_phase, warmup, bar
        self.flops: dict[int, float] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}
        self._counter: Any = None

    def _where(self, step: int) -> tuple[int, int]:
        return divmod(step, self.per_phase)

    def before(self, step: int) -> None:
        phase, j = self._where(step)
        if j == self.warmup - 1:
            self._counter = flop_counter()
            self._counter.__enter__()
        self.timer.start()

    def after(self, step: int) -> None:
        self.timer.stop(step)
        phase, _ = self._where(step)
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops[phase] = float(self._counter.get_total_flops())
            self._counter = None
        self.bar.update(1)


def _native_sizes(model_name: str) -> tuple[int, int]:
    from amorlip.models import model_config

    mc = model_config(model_name)
    size = mc["vision_cfg"]["image_size"]
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return size, int(mc["text_cfg"].get("context_length", 77))


def _phase_specs(cfg: Any) -> list[tuple[float, int | None, int | None]]:
    """[(fraction, image_size, context_length)] of the config's resolution section (None = native)."""
    res = cfg.sections.get("resolution")
    if res is None or not getattr(res, "phases", None):
        return [(1.0, None, None)]
    from amorlip.reclip import parse_phase_specs

    return [(f, s, c) for f, s, c in parse_phase_specs(res.phases)]


def run(extra: list[str]) -> dict[str, Any]:
    """`amorlip bench flops EXTRA...`: every variant trained through the config's phases, each `--warmup` +
    `--steps` steps long; prints the table and returns (and with --json writes) the results."""
    opts, overrides = _parse(extra)
    device = resolve_device(opts.device)
    load_warning(opts.threads)
    if opts.warmup < 1 or opts.steps < 1:
        raise ConfigError("--warmup must be >= 1 (FLOPs are counted on the last warm-up step) and --steps >= 1")
    base = build_config(opts.config, overrides)
    specs = _phase_specs(base)
    native_size, native_ctx = _native_sizes(base.model.name)
    k = len(specs)
    per = opts.warmup + opts.steps
    # the same phases, each `per` steps long: fractions 1/k (the last takes the rounding rest)
    equal = [[1.0 / k, s if s is not None else native_size, *([c] if c is not None else [])] for _, s, c in specs]
    if k > 1:
        equal[-1][0] = 1.0 - sum(e[0] for e in equal[:-1])

    results = []
    with scratch_dir("flops") as tmp:
        extra_ov = [("resolution.phases", repr(equal))] if k > 1 else []
        variants = build_variants(opts, [*overrides, *extra_ov], k * per, tmp)
        bar = progress(k * per * len(variants), "flops", disable=opts.no_progress)
        from amorlip.models import create_model

        model = create_model(base.model.name)[0]
        for v in variants:
            results += _measure(v, specs, (native_size, native_ctx), opts, device, bar, model)
        bar.close()

    schedule = _schedule(base, specs, variants, results) if base.train.steps else None
    table = _table(results)
    print(f"\nbench flops: {base.model.name}, batch {base.train.batch_size}, {base.model.precision}, {device}; "
          f"{opts.steps} timed steps per phase after {opts.warmup}")
    print(table)
    print("GFLOP/step: one full training step counted by FlopCounterMode (forward, objective, backward, optimizer); "
          "model GFLOP: the encoders' forward+backward alone (amorlip.reclip.flops_per_step).")
    if schedule and k > 1:
        for label, s in schedule.items():
            print(f"{label}: the config's {base.train.steps} steps ({' + '.join(map(str, s['steps']))}) cost "
                  f"{s['flops_vs_native']:.2f}x the FLOPs and ~{s['time_vs_native']:.2f}x the time of native size "
                  "throughout")
    out = {"command": "flops", "model": base.model.name, "batch_size": base.train.batch_size, "steps": opts.steps,
           "warmup": opts.warmup, "environment": environment(device), "phases": results, "schedule": schedule,
           "table": table}
    write_json(opts.json, out)
    return out


def _parse(extra: list[str]) -> tuple[Any, list[tuple[str, str]]]:
    """The command's options and the config overrides."""
    parser = base_parser(
        "flops",
        "FLOPs (FlopCounterMode, forward+backward+optimizer) and time per training step, for each RECLIP "
        "resolution phase of the config (or the model's native size).",
    )
    add_variant_options(parser, DEFAULT_OBJECTIVE)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per phase (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per phase first, >= 1 (default 2)")
    return parse_args(parser, extra)


def _measure(v: Any, specs: list[tuple[float, int | None, int | None]], native: tuple[int, int], opts: Any,
             device: Any, bar: Any, model: Any) -> list[dict[str, Any]]:
    """Train variant `v` through the phases; per phase its counted FLOPs, the encoders' own FLOPs
    (reclip.flops_per_step on `model`) and the median step time."""
    from amorlip import reclip

    per = opts.warmup + opts.steps
    hooks = _PhaseHooks(device, per, opts.warmup, bar)
    stream = BenchStream(v.cfg.train.batch_size, v.cfg.train.batch_size * (len(specs) * per + 1), hooks=hooks,
                         pin_memory=device.type == "cuda")
    run_training(v.cfg, stream)
    times = hooks.timer.times()
    results = []
    for i, (_, size, ctx) in enumerate(specs):
        size, ctx = size or native[0], ctx or native[1]
        measured = [times[s] for s in range(i * per + opts.warmup, (i + 1) * per) if s in times]
        t = statistics.median(measured) if measured else float("nan")
        model_flops = reclip.flops_per_step(model, size, ctx, v.cfg.train.batch_size)
        flops = hooks.flops.get(i, float("nan"))
        results.append({"label": v.label, "phase": i + 1, "image_size": size, "context_length": ctx,
                        "flops_per_step": flops, "model_flops_per_step": model_flops,
                        "step_ms_median": 1e3 * t, "tflops_per_s": flops / t / 1e12 if t > 0 else None})
    return results


def _schedule(base: Any, specs: list[tuple[float, int | None, int | None]], variants: list,
              results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Whole-schedule estimate per variant, from the config's own step count and phase fractions."""
    k = len(specs)
    total = int(base.train.steps)
    counts = [round(total * sum(f for f, _, _ in specs[: i + 1])) for i in range(k)]
    counts = [c - (counts[i - 1] if i else 0) for i, c in enumerate(counts)]
    schedule = {}
    for v in variants:
        per_phase = [r for r in results if r["label"] == v.label]
        last = per_phase[-1]  # the native-size phase
        flops = sum(n * r["flops_per_step"] for n, r in zip(counts, per_phase))
        secs = sum(n * r["step_ms_median"] / 1e3 for n, r in zip(counts, per_phase))
        schedule[v.label] = {
            "steps": counts, "flops": flops, "seconds": secs,
            "flops_vs_native": flops / (total * last["flops_per_step"]),
            "time_vs_native": secs / (total * last["step_ms_median"] / 1e3),
        }
    return schedule


def _table(results: list[dict[str, Any]]) -> str:
    """One row per variant and phase."""
    rows = []
    for r in results:
        rows.append([r["label"], str(r["phase"]), str(r["image_size"]), str(r["context_length"]),
                     f"{r['flops_per_step'] / 1e9:.3f}",
                     "-" if r["model_flops_per_step"] is None else f"{r['model_flops_per_step'] / 1e9:.3f}",
                     f"{r['step_ms_median']:.1f}",
                     "-" if r["tflops_per_s"] is None else f"{1e3 * r['tflops_per_s']:.1f}"])
    return format_table(["variant", "phase", "image px", "tokens", "GFLOP/step", "model GFLOP", "ms/step",
                          "GFLOP/s"], rows)
