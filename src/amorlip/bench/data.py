"""`amorlip bench data`: samples/s of the webdataset pipeline per DataLoader worker count, against the model's
training-step throughput, to show when the loader (not the model) is the bottleneck.

Shards: `amorlip.data.writers.write_synthetic_wds` (the embedded synthetic scenes as JPEG + caption + index),
written to a scratch folder (or `--shards DIR` to reuse some). Pipeline: `amorlip.data.wds.WdsStream`, the
trainer's own stream: tar reading, shuffle buffer, JPEG decode, the model's train transform under the
per-sample seeded RNG, tokenization, collation. Rate: samples of the batches after the first, over the time
after the first batch arrived (the first batch's wait, worker start-up included, is reported apart).
Model: the median full training step (`bench overhead`'s measurement, CLIP objective, pre-made batches) in
this process, as samples/s = batch / step time.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from amorlip.bench.common import (
    BenchStream,
    StepTimer,
    base_parser,
    bench_overrides,
    environment,
    load_warning,
    parse_args,
    resolve_device,
    run_training,
    scratch_dir,
    split_list,
    write_json,
)
from amorlip.config import ConfigError, build_config
from amorlip.report import format_table
from amorlip.objectives.registry import DEFAULT_OBJECTIVE


def loader_rate(urls: list[str], dataset_size: int, batch_size: int, workers: int, batches: int,
                transform: Any, tokenizer: Any, seed: int = 0) -> dict[str, float]:
    """Time `batches` batches of the webdataset stream with `workers` loader workers."""
    from amorlip.data.wds import WdsStream

    stream = WdsStream(urls, dataset_size, batch_size, seed, workers=workers, shuffle_buffer=min(1000, dataset_size))
    t0 = time.perf_counter()
    first = None
    samples = 0
    n = 0
    for batch in stream.iterate(0, 0, transform, tokenizer):
        now = time.perf_counter()
        n += 1
        if first is None:
            first = now - t0
            t_first = now
        else:
            samples += int(batch["image"].shape[0])
        if n >= batches:
            break
    if first is None or n < 2:
        raise ConfigError(f"the shards gave {n} batches; write more samples (--n) or lower --batch-size")
    elapsed = time.perf_counter() - t_first
    return {"workers": workers, "batches": n, "first_batch_s": first, "samples_per_s": samples / max(elapsed, 1e-9)}


def model_rate(cfg: Any, steps: int, warmup: int) -> dict[str, float]:
    """Median full training step (clip, pre-made batches) of `cfg`, in this process."""
    from amorlip.distributed import pick_device

    timer = StepTimer(pick_device(cfg.train.device))
    run_training(cfg, BenchStream(cfg.train.batch_size, cfg.train.batch_size * (warmup + steps + 2), hooks=timer,
                                  pin_memory=timer.cuda))
    times = [t for s, t in sorted(timer.times().items()) if warmup <= s < warmup + steps]
    med = statistics.median(times)
    return {"step_ms_median": 1e3 * med, "samples_per_s": cfg.train.batch_size / med}


def run(extra: list[str]) -> dict[str, Any]:
    """`amorlip bench data EXTRA...`: the loader's rate per worker count against the model's step rate; prints
    the table and returns (and with --json writes) the results."""
    opts, overrides = _parse(extra)
    device = resolve_device(opts.device)
    load_warning(opts.threads)
    workers = split_list(opts.workers, int)
    if not workers or min(workers) < 0 or opts.batches < 2:
        raise ConfigError("--workers needs counts >= 0 and --batches must be >= 2")

    with scratch_dir("data") as tmp:
        cfg = build_config(opts.config, [*overrides, ("objective", DEFAULT_OBJECTIVE),
                                         *bench_overrides(opts.model_steps + 3, tmp, "data-model")])
        from amorlip.models import create_model

        _, transform, _, tokenizer = create_model(cfg.model.name)
        batch = cfg.train.batch_size
        urls, n = _shards(opts, workers, tmp)
        if n < batch * 2:
            raise ConfigError(f"{n} samples is less than two batches of {batch}; raise --n or lower --batch-size")
        batches = min(opts.batches, n // batch)
        rows_data = []
        for w in workers:
            if len(urls) < max(1, w):
                raise ConfigError(f"{len(urls)} shards cannot feed {w} workers; lower --shard-size or --workers")
            if not opts.no_progress:
                print(f"loader: {w} workers ...", flush=True)
            rows_data.append(loader_rate(urls, n, batch, w, batches, transform, tokenizer))
        model = model_rate(cfg, opts.model_steps, 3) if opts.model_steps > 0 else None

    table = format_table(["workers", "loader samples/s", "first batch s", "vs model step", "training est."],
                         [_row(r, model) for r in rows_data])
    print(f"\nbench data: webdataset pipeline for {cfg.model.name} (batch {batch}), {len(urls)} shards, {n} samples; "
          f"{device}")
    print(table)
    if model:
        print(f"model: {model['samples_per_s']:.0f} samples/s (median full training step "
              f"{model['step_ms_median']:.1f} ms, clip, pre-made batches). The loader needs a rate above the model's, "
              "or it is the bottleneck; training est.: "
              "the samples/s training would get (0 workers: loading and step times add; else the slower of the two, "
              "if the loader workers have cores of their own).")
    out = {"command": "data", "model": cfg.model.name, "batch_size": batch, "samples": n, "shards": len(urls),
           "environment": environment(device), "loader": rows_data, "model_step": model, "table": table}
    write_json(opts.json, out)
    return out


def _parse(extra: list[str]) -> tuple[Any, list[tuple[str, str]]]:
    """The command's options and the config overrides."""
    parser = base_parser(
        "data",
        "Samples/s of the webdataset pipeline (read, decode, transform, tokenize) per worker count, against "
        "the model's training-step throughput.",
    )
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts (default 0,1,2)")
    parser.add_argument("--n", type=int, default=2048, help="samples to write into the shards (default 2048)")
    parser.add_argument("--shard-size", type=int,
                        help="samples per shard (default: enough shards for every worker count)")
    parser.add_argument("--shards", help="use the shards in this folder (with sizes.json) instead of writing new ones")
    parser.add_argument("--batches", type=int, default=12, help="batches timed per worker count (default 12)")
    parser.add_argument("--model-steps", type=int, default=10, help="model steps timed (default 10; 0 skips)")
    return parse_args(parser, extra)


def _shards(opts: Any, workers: list[int], tmp: str) -> tuple[list[str], int]:
    """(shard urls, samples): `--shards DIR`'s, or `--n` synthetic samples written to `tmp`."""
    if opts.shards:
        from amorlip.data.wds_shards import dataset_size_from_sizes_json, expand_shards

        urls = expand_shards(opts.shards)
        return urls, dataset_size_from_sizes_json(urls)
    from amorlip.data.writers import write_synthetic_wds

    n = opts.n
    shard_size = opts.shard_size or max(1, n // max(4, 2 * max(workers)))
    t0 = time.perf_counter()
    urls = [str(p) for p in write_synthetic_wds(Path(tmp) / "shards", n, seed=0, shard_size=shard_size)]
    if not opts.no_progress:
        print(f"wrote {len(urls)} shards of {shard_size} samples in {time.perf_counter() - t0:.1f} s")
    return urls, n


def _row(r: dict[str, Any], model: dict[str, float] | None) -> list[str]:
    """A worker count's table row; with the model's rate, also its ratio and training estimate (added to `r`)."""
    verdict, est = "-", "-"
    if model:
        ratio = r["samples_per_s"] / model["samples_per_s"]
        r["vs_model"] = ratio
        verdict = f"{ratio:.2f}x " + ("(loader-bound)" if ratio < 1.0 else "(model-bound)")
        # 0 workers: loading runs in the training loop, so the two times add; else they overlap (the slower wins)
        if r["workers"] == 0:
            r["train_samples_per_s_est"] = 1.0 / (1.0 / r["samples_per_s"] + 1.0 / model["samples_per_s"])
        else:
            r["train_samples_per_s_est"] = min(r["samples_per_s"], model["samples_per_s"])
        est = f"{r['train_samples_per_s_est']:.0f}"
    return [str(r["workers"]), f"{r['samples_per_s']:.0f}", f"{r['first_batch_s']:.2f}", verdict, est]
