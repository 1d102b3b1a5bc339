"""`amorlip bench throughput`: samples/s of `amorlip train` against open_clip's own trainer
(`python -m open_clip_train.main`), same model, batch, precision, data and loader workers, one after the other.

Both sides run as fresh subprocesses, alternately (`--repeats` pairs, the order swapped every other pair),
with the CLIP objective, AdamW, gradient clipping at our `optim.grad_clip`, a log line every step, no
evaluation and no mid-run checkpoint. Each side's per-step time is the interval between consecutive
per-step log records, so it holds everything the loop does between two steps: waiting for the batch (data
loading when `--workers 0`), host-to-device copy, forward, loss, backward, clipping, optimizer, clamp and
logging. The first `--warmup` steps are dropped; rate = batch / mean interval.

* ours: `amorlip train`'s own `samples_per_s` (metrics.jsonl, one line per step: perf_counter intervals);
* open_clip: `open_clip_train.main.main(argv)` run from a small launcher that first registers our tiny model
  configs with `open_clip.add_model_config` (open_clip's entry point does not know them) and adds a logging
  handler that stamps `time.perf_counter()` at every "Train Epoch" record (its log timestamps have 1 s
  resolution). Nothing else in open_clip's code path changes.

Data (`--data`): `csv` (default, the fairest): the same CSV + PNG files written by
`amorlip.data.writers.write_synthetic_csv`, read by both (open_clip's CsvDataset / our CsvCaptions: PIL
decode, the model's train transform, tokenization). `synthetic`: each side's synthetic source -- open_clip's
is one blank image transformed each time with a fixed caption, ours renders a scene per sample -- so ours
does more data work there.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from amorlip.bench.common import (
    base_parser,
    environment,
    load_warning,
    parse_args,
    resolve_device,
    scratch_dir,
    write_json,
)
from amorlip.config import ConfigError, build_config
from amorlip.report import format_table
from amorlip.stats import quantiles
from amorlip.objectives.registry import DEFAULT_OBJECTIVE

PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}
"""Our model.precision -> open_clip's --precision (autocast in both)."""

OPEN_CLIP_LAUNCHER = r'''
import json, logging, sys, time, atexit
import open_clip
open_clip.add_model_config(sys.argv[1])
stamps = []
class _Stamp(logging.Handler):
    def emit(self, record):
        if str(record.msg).startswith("Train Epoch:"):
            stamps.append([time.perf_counter(), time.process_time()])
logging.getLogger().addHandler(_Stamp())
atexit.register(lambda: open(sys.argv[2], "w").write(json.dumps(stamps)))
from open_clip_train.main import main
main(sys.argv[3:])
'''

OURS_LAUNCHER = r'''
import json, sys, time, atexit
import amorlip.metrics_log
stamps = []
_log = amorlip.metrics_log.MetricsLogger.log
def log(self, step, values):
    _log(self, step, values)
    if "loss" in values:
        stamps.append([time.perf_counter(), time.process_time()])
amorlip.metrics_log.MetricsLogger.log = log
atexit.register(lambda: open(sys.argv[1], "w").write(json.dumps(stamps)))
from amorlip.cli import main
sys.exit(main(sys.argv[2:]))
'''
"""Our trainer, stamped the same way at each per-step log record (after the record is written)."""


def open_clip_available() -> str | None:
    """None when open_clip's trainer can be imported, else the reason (with the fix)."""
    try:
        import open_clip_train.main  # noqa: F401
    except ImportError as e:
        return (f"open_clip's trainer cannot be imported ({e}); it ships in the open_clip_torch wheel as "
                "`open_clip_train` and needs pandas: pip install 'amorlip[bench]' (or pip install pandas)")
    return None


def _run(cmd: list[str], cwd: str, env: dict[str, str], log: Path, label: str) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{label} exited with code {proc.returncode}; last lines of its output:\n{tail}")
    return wall


def steady_rate(intervals: list[float], warmup: int, batch: int,
                cpu_intervals: list[float] | None = None) -> dict[str, float]:
    """Rate over the step intervals after the first `warmup`: batch / mean interval (and the median's); with
    `cpu_intervals` (the process's CPU time per step) also samples per CPU second."""
    kept = intervals[warmup:]
    if not kept:
        raise ConfigError(f"no step left after --warmup {warmup}; run more --steps")
    mean = statistics.fmean(kept)
    med = statistics.median(kept)
    out = {"samples_per_s": batch / mean, "step_ms_mean": 1e3 * mean, "step_ms_median": 1e3 * med,
           "steps_measured": len(kept)}
    if cpu_intervals is not None:
        cpu = statistics.fmean(cpu_intervals[warmup:])
        out.update(cpu_ms_per_step=1e3 * cpu, samples_per_cpu_s=batch / cpu if cpu > 0 else float("nan"))
    return out


def _intervals(stamps: list[list[float]]) -> tuple[list[float], list[float]]:
    """(wall, CPU) seconds between consecutive [perf_counter, process_time] stamps."""
    return ([b[0] - a[0] for a, b in zip(stamps, stamps[1:])], [b[1] - a[1] for a, b in zip(stamps, stamps[1:])])


def ratio_spread(ratios: list[float]) -> dict[str, float]:
    """Min, quartiles and max of the per-pair ratios (the quartiles interpolated; one pair: all equal)."""
    q1, _, q3 = quantiles(ratios)
    return {"min": min(ratios), "q1": q1, "median": statistics.median(ratios), "q3": q3, "max": max(ratios)}


def run(extra: list[str]) -> dict[str, Any]:
    """`amorlip bench throughput EXTRA...`: `--repeats` pairs of runs, ours and open_clip's; prints the table and
    returns (and with --json writes) the results."""
    opts, overrides = _parse(extra)
    device = resolve_device(opts.device)
    if opts.steps <= opts.warmup + 1 or opts.repeats < 1:
        raise ConfigError("--steps must exceed --warmup + 1, and --repeats must be >= 1")
    cfg = build_config(opts.config, [*overrides, ("objective", DEFAULT_OBJECTIVE)])
    batch, model = cfg.train.batch_size, cfg.model.name
    workers = opts.workers if opts.workers is not None else int(cfg.data.workers)
    threads = opts.threads or cfg.train.threads
    env = dict(os.environ)
    if threads > 0:  # the same intra-op threads on both sides (open_clip has no option for it)
        env["OMP_NUM_THREADS"] = str(threads)
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    pairs: list[dict[str, Any]] = []
    with scratch_dir("throughput") as tmp:
        data_args_ours, data_args_oc, cwd = _data_args(opts, cfg, tmp)
        for r in range(opts.repeats):
            commands = _commands(r, opts, overrides, cfg, device, workers, data_args_ours, data_args_oc, tmp)
            pairs.append(_measure_pair(r, opts, batch, commands, cwd, env, tmp))

    ratio = statistics.median(p["ratio"] for p in pairs)
    cpu_ratio = statistics.median(p["cpu_ratio"] for p in pairs)
    table = _table(pairs, ratio, cpu_ratio)
    print(f"\nbench throughput: {model}, batch {batch}, {cfg.model.precision}, {device}, data={opts.data}, "
          f"workers={workers}, threads={threads or 'default'}; {opts.steps} steps per run, first {opts.warmup} dropped, {opts.repeats} pair(s)")
    print(table)
    spread = ratio_spread([p["ratio"] for p in pairs])
    cpu_spread = ratio_spread([p["cpu_ratio"] for p in pairs])
    if len(pairs) > 1:
        _print_spreads(pairs, ratio, cpu_ratio, spread, cpu_spread)
    print("samples/s: batch / mean interval between consecutive per-step log records (everything the loop does); "
          "CPU: the process's CPU time over the same intervals (less sensitive to other load on the machine; "
          "with --workers > 0 it leaves out the loader processes); process s: the whole subprocess, start-up included.")
    out = {"command": "throughput", "model": model, "batch_size": batch, "precision": cfg.model.precision,
           "data": opts.data, "workers": workers, "threads": threads, "steps": opts.steps, "warmup": opts.warmup,
           "environment": environment(device), "pairs": pairs, "ratio": ratio, "ratio_spread": spread,
           "cpu_ratio": cpu_ratio, "cpu_ratio_spread": cpu_spread,
           "table": table}
    write_json(opts.json, out)
    return out


def _parse(extra: list[str]) -> tuple[Any, list[tuple[str, str]]]:
    """The command's options and the config overrides; refuses to run without open_clip_train."""
    parser = base_parser(
        "throughput",
        "Samples/s of `amorlip train` against open_clip's trainer (open_clip_train.main) on the same model, "
        "batch, precision and data, run one after the other.",
    )
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="first step intervals dropped (default 10)")
    parser.add_argument("--data", default="csv", choices=["csv", "synthetic"],
                        help="csv: identical files for both (default); synthetic: each side's own synthetic source")
    parser.add_argument("--workers", type=int, help="data loader workers on both sides (default: data.workers)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="pairs of runs, order alternating; the ratio is their median (default 5)")
    opts, overrides = parse_args(parser, extra)
    reason = open_clip_available()
    load_warning(opts.threads)
    if reason:
        raise ConfigError(reason)
    return opts, overrides


def _data_args(opts: Any, cfg: Any, tmp: str) -> tuple[list[str], list[str], str]:
    """(our data options, open_clip's, the working directory of both runs); `--data csv` writes the files."""
    if opts.data != "csv":
        return (["--data.source", "synthetic"],
                ["--dataset-type", "synthetic", "--train-num-samples", str(cfg.train.batch_size * opts.steps)], tmp)
    from amorlip.data.writers import write_synthetic_csv

    n = cfg.train.batch_size * opts.steps
    t0 = time.perf_counter()
    csv_path = write_synthetic_csv(Path(tmp) / "csv", n, seed=cfg.train.seed)
    if not opts.no_progress:
        print(f"wrote {n} CSV + PNG samples in {time.perf_counter() - t0:.1f} s", flush=True)
    data_args_ours = ["--data.source", "csv", "--data.train-path", str(csv_path)]
    data_args_oc = ["--dataset-type", "csv", "--train-data", str(csv_path), "--csv-separator", ",",
                    "--csv-img-key", cfg.data.csv_img_key, "--csv-caption-key", cfg.data.csv_caption_key]
    return data_args_ours, data_args_oc, str(csv_path.parent)  # open_clip opens the relative image paths from there


def _commands(r: int, opts: Any, overrides: list[tuple[str, str]], cfg: Any, device: Any, workers: int,
              data_args_ours: list[str], data_args_oc: list[str], tmp: str) -> dict[str, tuple[list[str], Path]]:
    """Pair `r`'s two command lines, each with the file its launcher writes the step stamps to."""
    from amorlip.models import MODEL_CONFIG_DIR

    run_dir = Path(tmp) / f"ours{r}"
    ours_stamps = Path(tmp) / f"ours{r}.json"
    ours_cmd = [
        sys.executable, "-c", OURS_LAUNCHER, str(ours_stamps), "train",
        *(["--config", opts.config] if opts.config else []),
        *[f"--{k}={v}" for k, v in overrides], "--objective", DEFAULT_OBJECTIVE, *data_args_ours,
        "--train.steps", str(opts.steps), "--train.epochs", "none", "--train.log-every", "1",
        "--train.progress", "false", "--train.checkpoint-every", "0", "--train.eval-every", "0",
        "--eval.zeroshot", "false", "--eval.retrieval", "false", "--data.workers", str(workers),
        "--train.output-dir", str(run_dir), "--train.name", "run", "--train.stop-at", "none",
    ]
    stamps = Path(tmp) / f"oc{r}.json"
    oc_cmd = [
        sys.executable, "-c", OPEN_CLIP_LAUNCHER, str(MODEL_CONFIG_DIR), str(stamps),
        "--model", cfg.model.name, "--batch-size", str(cfg.train.batch_size), "--epochs", "1", *data_args_oc,
        "--workers", str(workers), "--precision", PRECISION[cfg.model.precision],
        "--device", device.type, "--lr", str(cfg.optim.lr), "--wd", str(cfg.optim.weight_decay),
        "--beta1", str(cfg.optim.beta1), "--beta2", str(cfg.optim.beta2), "--eps", str(cfg.optim.eps),
        "--warmup", str(cfg.optim.warmup_steps), "--seed", str(cfg.train.seed),
        *(["--grad-clip-norm", str(cfg.optim.grad_clip)] if cfg.optim.grad_clip > 0 else []),
        "--log-every-n-steps", "1", "--save-frequency", "0", "--val-frequency", "0",
        "--logs", str(Path(tmp) / f"oc-logs{r}"), "--name", "run", "--report-to", "",
    ]
    return {"ours": (ours_cmd, ours_stamps), "open_clip": (oc_cmd, stamps)}


def _measure_pair(r: int, opts: Any, batch: int, commands: dict[str, tuple[list[str], Path]], cwd: str,
                  env: dict[str, str], tmp: str) -> dict[str, Any]:
    """Run pair `r` (ours first on even pairs, open_clip first on odd ones) and compare their steady rates."""
    order = [("ours", commands["ours"][0]), ("open_clip", commands["open_clip"][0])]
    if r % 2:
        order.reverse()
    walls = {}
    for side, cmd in order:
        if not opts.no_progress:
            print(f"[{r + 1}/{opts.repeats}] {side}: {opts.steps} steps ...", flush=True)
        walls[side] = _run(cmd, cwd, env, Path(tmp) / f"{side}{r}.log", side)
    # both stamped at each per-step log record; the first stamp is after step 1, as open_clip logs step 0
    ours_wall, ours_cpu = _intervals(json.loads(commands["ours"][1].read_text()))
    oc_wall, oc_cpu = _intervals(json.loads(commands["open_clip"][1].read_text()))
    ours = steady_rate(ours_wall, max(0, opts.warmup - 1), batch, ours_cpu)
    oc = steady_rate(oc_wall, max(0, opts.warmup - 1), batch, oc_cpu)
    return {"ours": {**ours, "process_wall_s": walls["ours"]},
            "open_clip": {**oc, "process_wall_s": walls["open_clip"]},
            "ratio": ours["samples_per_s"] / oc["samples_per_s"],
            "cpu_ratio": ours["samples_per_cpu_s"] / oc["samples_per_cpu_s"]}


def _table(pairs: list[dict[str, Any]], ratio: float, cpu_ratio: float) -> str:
    """Each side's medians over the pairs, with the ratios."""
    rows = []
    for side in ("ours", "open_clip"):
        med = {k: statistics.median(p[side][k] for p in pairs)
               for k in ("samples_per_s", "step_ms_mean", "samples_per_cpu_s", "cpu_ms_per_step", "process_wall_s")}
        ours = side == "ours"
        rows.append(["amorlip train" if ours else "open_clip_train.main", f"{med['samples_per_s']:.1f}",
                     f"{med['step_ms_mean']:.1f}", f"{med['cpu_ms_per_step']:.1f}", f"{med['process_wall_s']:.1f}",
                     f"{ratio:.3f}x" if ours else "ref", f"{cpu_ratio:.3f}x" if ours else "ref"])
    return format_table(["trainer", "samples/s", "ms/step", "CPU ms/step", "process s", "ratio", "CPU ratio"], rows)


def _print_spreads(pairs: list[dict[str, Any]], ratio: float, cpu_ratio: float, spread: dict[str, float],
                   cpu_spread: dict[str, float]) -> None:
    """The per-pair wall and CPU ratios with their median, range and interquartile range."""
    for name, key, sp, med in (("wall", "ratio", spread, ratio), ("CPU", "cpu_ratio", cpu_spread, cpu_ratio)):
        print(f"per-pair {name} ratios: " + ", ".join(f"{p[key]:.3f}" for p in pairs)
              + f"; median {med:.3f}, range {sp['min']:.3f}-{sp['max']:.3f}, "
              f"interquartile {sp['q1']:.3f}-{sp['q3']:.3f}"
              + ("  (the interquartile range holds 1.0: no difference measured at this noise)"
                 if sp["q1"] <= 1.0 <= sp["q3"] else ""))
