"""`amorlip bench loss`: each objective alone (no encoders) at a large batch B and width d, against the floor
every one of them pays: the B x B similarity matrix `s X Y^T`.

* time: forward + backward of the objective on fixed unit-norm features (leaves with grad), divided by the
  time of the floor, `logits = s X Y^T; logits.backward(G)` (one B x B x d matmul forward, two backward).
  Measured interleaved (floor, clip, siglip, ..., the order reversed every other round), in blocks of the
  objectives' periods (AmorLIP's t_online) so that periodic work is amortized, median over blocks.
* memory: the peak of tensor bytes allocated during one forward + backward (beyond the inputs and the
  objective's persistent state), divided by the bytes of one B x B matrix in fp32. CUDA: max_memory_allocated;
  CPU: the profiler's allocator events. Measured on a step that runs AmorLIP's Stage I and on one that does
  not; the larger is reported. Persistent state (u buffers, amortization nets, prototypes) is listed apart.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from amorlip.bench.common import (
    add_variant_options,
    base_parser,
    build_variants,
    cpu_tensor_peak,
    environment,
    load_warning,
    parse_args,
    progress,
    resolve_device,
    scratch_dir,
    write_json,
)
from amorlip.config import ConfigError
from amorlip.report import format_table
from amorlip.stats import paired_stats
from amorlip.objectives.registry import REGISTRY, period_steps

TIME_FLAG = 4.0
"""Report an objective whose forward + backward costs more than this many floors."""
MEMORY_FLAG = 8.0
"""Report an objective whose transient memory exceeds this many B x B fp32 matrices."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LossCase:
    """One objective with its inputs; `step(i)` runs forward + backward on step i's indices."""

    def __init__(self, label: str, cfg: Any, batch: int, dim: int, dataset_size: int, device: torch.device,
                 seed: int = 0) -> None:
        from amorlip import objectives
        from amorlip.objectives.base import ObjectiveContext

        cls = objectives.get(cfg.objective)
        ctx = ObjectiveContext(dataset_size=dataset_size, steps_per_epoch=dataset_size // batch,
                               total_steps=10**6, total_epochs=max(1, 10**6 // max(1, dataset_size // batch)),
                               embed_dim=dim, local_batch_size=batch, world_size=1, rank=0, device=device)
        torch.manual_seed(seed)
        self.label, self.batch, self.device, self.dataset_size = label, batch, device, dataset_size
        self.objective = cls(cfg.sections.get(cls.section) if cls.section else None, ctx).to(device)
        self.objective.train()
        g = torch.Generator().manual_seed(seed)
        self.x = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device).requires_grad_(True)
        self.y = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device).requires_grad_(True)
        overrides = getattr(cls, "model_overrides", {})
        self.logit_scale = torch.tensor(float(overrides.get("init_logit_scale", math.log(1 / 0.07))), device=device,
                                        requires_grad=True)
        bias = overrides.get("init_logit_bias")
        self.bias = None if bias is None else torch.tensor(float(bias), device=device, requires_grad=True)
        self.state_bytes = sum(t.numel() * t.element_size() for t in self.objective.state_dict().values()
                               if isinstance(t, torch.Tensor))
        self.periods = period_steps(cfg)

    def zero_grad(self) -> None:
        for t in (self.x, self.y, self.logit_scale, self.bias):
            if t is not None:
                t.grad = None

    def step(self, i: int) -> None:
        start = (i * self.batch) % max(1, self.dataset_size - self.batch + 1)
        idx = torch.arange(start, start + self.batch, device=self.device)
        out = self.objective(self.x, self.y, self.logit_scale.exp(), self.bias, idx, step=i, epoch=0)
        loss = out.loss if out.extra_loss is None else out.loss + out.extra_loss
        loss.backward()


class FloorCase:
    """`logits = s X Y^T; logits.backward(G)`: the similarity matrix and its gradient."""

    label = "floor: s X Y^T"

    def __init__(self, batch: int, dim: int, device: torch.device, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device).requires_grad_(True)
        self.y = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device).requires_grad_(True)
        self.logit_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
        self.upstream = torch.randn(batch, batch, generator=g).to(device) / batch
        self.state_bytes, self.periods = 0, []

    def zero_grad(self) -> None:
        for t in (self.x, self.y, self.logit_scale):
            t.grad = None

    def step(self, i: int) -> None:
        logits = self.logit_scale.exp() * self.x @ self.y.T
        logits.backward(self.upstream)


def transient_peak(case: Any, steps: list[int], device: torch.device) -> int:
    """Peak bytes allocated by `case.step(i)` beyond what was allocated before it, max over `steps`."""
    peak = 0
    for i in steps:
        case.zero_grad()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            case.step(i)
            _sync(device)
            peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
        else:
            peak = max(peak, cpu_tensor_peak(lambda: case.step(i)))
        case.zero_grad()
    return peak


def run(extra: list[str]) -> dict[str, Any]:
    """`amorlip bench loss EXTRA...`: every objective against the similarity-matmul floor, interleaved; prints
    the table and returns (and with --json writes) the results."""
    opts, overrides = _parse(extra)
    device = resolve_device(opts.device)
    load_warning(opts.threads)
    batch = opts.batch_size or (4096 if device.type == "cuda" else 1024)
    dim = opts.dim or (512 if device.type == "cuda" else 256)
    if batch < 2 or dim < 1 or opts.steps < 1 or opts.warmup < 0:
        raise ConfigError("--batch-size must be >= 2, --dim >= 1, --steps >= 1, --warmup >= 0")
    dataset_size = opts.dataset_size or 10 * batch
    if opts.threads:
        torch.set_num_threads(opts.threads)

    with scratch_dir("loss") as tmp:
        variants = build_variants(opts, [o for o in overrides if not o[0].startswith("train.batch")], 1, tmp)
    cases: list[Any] = [FloorCase(batch, dim, device)]
    cases += [LossCase(v.label, v.cfg, batch, dim, dataset_size, device) for v in variants]
    periods = [p for c in cases for p in c.periods if p <= opts.steps]
    block = 1
    for p in periods:
        block = math.lcm(block, p) if math.lcm(block, p) <= opts.steps else block
    steps = block * max(1, opts.steps // block)

    times = _time_cases(cases, opts.warmup, steps, device, opts.no_progress)
    stats = paired_stats(times, cases[0].label, block)
    first = block * math.ceil((opts.warmup + steps) / block)
    mem_steps = [first, first + 1]  # a step that runs every periodic cost (Stage I), and one after it
    matrix = batch * batch * 4
    rows, results, notes = [], [], []
    for c in cases:
        peak = transient_peak(c, mem_steps, device)
        s = stats[c.label]
        ratio_t = s.ratio
        ratio_m = peak / matrix
        results.append({"label": c.label, "ms_median": 1e3 * s.median, "x_floor_time": ratio_t,
                        "time_noise_pct": s.noise_pct, "peak_bytes": peak, "x_matrix_memory": ratio_m,
                        "state_bytes": c.state_bytes})
        rows.append([c.label, f"{1e3 * s.median:.2f}", f"{ratio_t:.2f}x", f"±{s.noise_pct:.1f}%",
                     f"{peak / 2**20:.1f}", f"{ratio_m:.2f}x", f"{c.state_bytes / 2**20:.2f}"])
        if c is not cases[0] and (ratio_t > TIME_FLAG or ratio_m > MEMORY_FLAG):
            notes.append(f"{c.label}: {ratio_t:.1f}x the floor's time, {ratio_m:.1f} B x B matrices")
    table = format_table(["objective", "fwd+bwd ms", "x floor", "noise", "peak MB", "x B*B*4", "state MB"], rows)
    print(f"\nbench loss: B={batch}, d={dim}, fp32, {device}; {steps} measured steps after {opts.warmup}, "
          f"blocks of {block}, interleaved")
    print(table)
    print(f"x floor: median over blocks of the paired time ratio to the floor; x B*B*4: transient peak over one "
          f"{batch}x{batch} fp32 matrix ({matrix / 2**20:.1f} MB); state: the objective's persistent buffers.")
    for n in notes:
        print(f"note: {n}")
    out = {"command": "loss", "batch_size": batch, "dim": dim, "steps": steps, "warmup": opts.warmup, "block": block,
           "matrix_bytes": matrix, "dataset_size": dataset_size, "environment": environment(device),
           "objectives": results, "notes": notes, "table": table}
    write_json(opts.json, out)
    return out


def _parse(extra: list[str]) -> tuple[Any, list[tuple[str, str]]]:
    """The command's options and the config overrides."""
    parser = base_parser(
        "loss",
        "Each objective alone (no encoders): forward+backward time relative to the B x B similarity matmul, "
        "and transient memory relative to one B x B fp32 matrix.",
    )
    add_variant_options(parser, ",".join(REGISTRY))
    parser.add_argument("--dim", type=int, help="feature width d (default: 512 on CUDA, 256 on CPU)")
    parser.add_argument("--steps", type=int, default=16, help="measured steps per objective (default 16)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (default 3)")
    parser.add_argument("--dataset-size", type=int, help="size of per-sample buffers (default: 10 B)")
    return parse_args(parser, extra)


def _time_cases(cases: list[Any], warmup: int, steps: int, device: torch.device,
                no_progress: bool) -> dict[str, list[float]]:
    """Seconds of each case's steps after `warmup`, the cases interleaved (in reverse order every other step):
    CUDA events on the GPU, perf_counter on the CPU."""
    times: dict[str, list[float]] = {c.label: [] for c in cases}
    bar = progress((warmup + steps) * len(cases), "loss", disable=no_progress)
    for r in range(warmup + steps):
        for c in cases if r % 2 == 0 else reversed(cases):
            c.zero_grad()
            _sync(device)
            if device.type == "cuda":
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                c.step(r)
                e1.record()
                e1.synchronize()
                t = e0.elapsed_time(e1) / 1e3
            else:
                t0 = time.perf_counter()
                c.step(r)
                t = time.perf_counter() - t0
            if r >= warmup:
                times[c.label].append(t)
            bar.update(1)
    bar.close()
    return times
