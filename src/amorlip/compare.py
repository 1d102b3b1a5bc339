"""`amorlip compare`: train several objectives with the same model, data, batch, seeds and steps, evaluate
each, and write a markdown/CSV table and PNG plots (the small-scale counterpart of the paper's Table 1 and
Figure 3).

Entries are objective names, or preset names (their own settings, e.g. `tiny-fastclip`), with optional
overrides in brackets, so ablations run the same way:

    amorlip compare --config tiny-clip --objectives 'clip,clip[temperature.scheme=rescaled],amorlip[amor.divide_by=target]'
    amorlip compare --objectives 'tiny-clip,tiny-fastclip,tiny-amorlip' --train.steps 600

Command-line overrides apply to every entry; an entry's own overrides come last.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amorlip.checkpoint import atomic_write_text
from amorlip.config import ConfigError, build_config, parse_overrides
from amorlip.resume import config_hash


@dataclass
class Entry:
    label: str
    objective: str
    overrides: list[tuple[str, str]]


def split_entries(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ConfigError(f"unbalanced brackets in --objectives {text!r}")
    if cur.strip():
        parts.append(cur.strip())
    return parts


def parse_entry(text: str) -> Entry:
    """`amorlip[amor.divide_by=target,amor.t_online=8]` -> Entry."""
    if "[" in text:
        if not text.endswith("]"):
            raise ConfigError(f"bad entry {text!r}: write name[key=value,key=value]")
        name, body = text[:-1].split("[", 1)
        overrides = []
        for item in filter(None, (p.strip() for p in body.split(","))):
            if "=" not in item:
                raise ConfigError(f"bad override {item!r} in entry {text!r}: write section.key=value")
            k, v = item.split("=", 1)
            overrides.append((k.strip(), v.strip()))
    else:
        name, overrides = text, []
    return Entry(label=text, objective=name.strip(), overrides=overrides)


def safe_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_")



def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Mean zero-shot top-1, each task's top-1, and mean retrieval R@1 (both directions)."""
    out = {k: v for k, v in metrics.items() if k.endswith("/top1") or k == "zeroshot/mean_top1"}
    r1 = [v for k, v in metrics.items() if k.startswith("retrieval/") and k.endswith("R@1")]
    if r1:
        out["retrieval/mean_R@1"] = sum(r1) / len(r1)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], 0.0
    return statistics.mean(values), statistics.stdev(values)


def build_table(results: dict[str, list[dict[str, float]]]) -> tuple[str, str, list[str]]:
    """Markdown and CSV tables: rows = entries, columns = headline metrics (mean ± sd over seeds, in %)."""
    columns: list[str] = []
    for runs in results.values():
        for run in runs:
            for k in headline_metrics(run):
                if k not in columns:
                    columns.append(k)
    columns.sort(key=lambda k: (k != "zeroshot/mean_top1", k != "retrieval/mean_R@1", k))
    md = ["| entry | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["entry", "seeds"] + [f"{c} mean" for c in columns] + [f"{c} sd" for c in columns])
    for label, runs in results.items():
        cells, means, sds = [], [], []
        for c in columns:
            vals = [headline_metrics(r)[c] for r in runs if c in headline_metrics(r)]
            if not vals:
                cells.append("-")
                means.append("")
                sds.append("")
                continue
            m, s = mean_std(vals)
            cells.append(f"{100 * m:.2f}" + (f" ± {100 * s:.2f}" if len(vals) > 1 else ""))
            means.append(f"{m:.6f}")
            sds.append(f"{s:.6f}")
        md.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
        writer.writerow([label, len(runs)] + means + sds)
    return "\n".join(md) + "\n", buf.getvalue(), columns


def plot_curves(histories: dict[str, list[list[dict[str, Any]]]], out: Path) -> list[Path]:
    """One PNG per headline metric: value vs step per entry (mean over seeds, band = min..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from amorlip.report import is_curve_metric

    metrics = sorted({k for runs in histories.values() for h in runs for row in h for k in row
                      if k.startswith("eval/") and is_curve_metric(k)})
    paths = []
    for metric in ["loss"] + metrics:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, runs in histories.items():
            by_step: dict[int, list[float]] = {}
            for h in runs:
                key = "objective_loss" if metric == "loss" else metric
                for row in h:
                    if key in row:
                        by_step.setdefault(row["step"], []).append(row[key])
            if not by_step:
                continue
            steps = sorted(by_step)
            scale = 1.0 if metric == "loss" else 100.0
            mean = [scale * statistics.mean(by_step[s]) for s in steps]
            ax.plot(steps, mean, label=label, marker=None if metric == "loss" else "o", ms=3)
            if len(runs) > 1:
                ax.fill_between(steps, [scale * min(by_step[s]) for s in steps], [scale * max(by_step[s]) for s in steps],
                                alpha=0.15)
        ax.set_xlabel("step")
        ax.set_ylabel("objective loss" if metric == "loss" else f"{metric[5:]} (%)")
        ax.set_title(metric)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{safe_name(metric)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2` -> [0, 1, 2]; a one-line ConfigError for anything else."""
    seeds = []
    for s in text.split(","):
        if not s.strip():
            continue
        try:
            seeds.append(int(s))
        except ValueError:
            raise ConfigError(f"--seeds {text}: {s.strip()!r} is not an integer "
                              "(pass comma-separated integers, e.g. --seeds 0,1,2)") from None
    if not seeds:
        raise ConfigError(f"--seeds {text!r} names no seed (pass comma-separated integers, e.g. --seeds 0,1,2)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text} repeats a seed (pass each seed once, e.g. --seeds 0,1,2)")
    return seeds


def compare_configs(args: argparse.Namespace, common: list[tuple[str, Any]]) -> dict[tuple[str, int], Any]:
    """Every run `compare` makes, (entry label, seed) -> config, each validated (so a typo in the last entry does
    not surface after an hour of training) and named entry-seed-hash of its result-changing settings (so an
    ablation, or a changed default, never reuses another's run)."""
    from amorlip import objectives
    from amorlip.config import preset_names

    entries = [parse_entry(e) for e in split_entries(args.objectives)]
    if not entries:
        raise ConfigError("--objectives is empty")
    seeds = parse_seeds(args.seeds)
    out = Path(args.out)
    configs = {}
    for entry in entries:
        if entry.objective in objectives.REGISTRY:
            base, head = args.config, [("objective", entry.objective)]
        elif entry.objective in preset_names() or Path(entry.objective).is_file():
            base, head = entry.objective, []
        else:
            raise ConfigError(f"entry {entry.label!r}: {entry.objective!r} is neither an objective "
                              f"({', '.join(objectives.REGISTRY)}) nor a preset (`amorlip presets` lists them)")
        for seed in seeds:
            overrides = [*head, *common, *entry.overrides, ("train.seed", str(seed)),
                         ("train.output_dir", str(out / "runs")), ("train.resume", "auto")]
            cfg = build_config(base, overrides)
            cfg.train.name = f"{safe_name(entry.label)}-s{seed}-{config_hash(cfg.to_dict())}"
            configs[(entry.label, seed)] = cfg
    return configs


def run_compare(args: argparse.Namespace, extra: list[str]) -> int:
    from amorlip.train import main_worker, read_history

    configs = compare_configs(args, parse_overrides(extra))
    entries = list(dict.fromkeys(label for label, _ in configs))
    seeds = list(dict.fromkeys(seed for _, seed in configs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, float]]] = {label: [] for label in entries}
    histories: dict[str, list[list[dict[str, Any]]]] = {label: [] for label in entries}
    total = len(configs)
    for i, ((label, seed), cfg) in enumerate(configs.items(), 1):
        print(f"[compare {i}/{total}] {label} seed {seed}: {cfg.train.steps or cfg.train.epochs} "
              f"{'steps' if cfg.train.steps else 'epochs'} at batch {cfg.train.batch_size}", flush=True)
        result = main_worker(cfg)
        results[label].append(result.metrics)
        histories[label].append(read_history(result.run_dir))
    md, csv_text, _ = build_table(results)
    header = (f"model {configs[next(iter(configs))].model.name}, data {configs[next(iter(configs))].data.source}, "
              f"batch {configs[next(iter(configs))].train.batch_size}, seeds {','.join(map(str, seeds))}\n\n")
    atomic_write_text(header + md, out / "table.md")
    atomic_write_text(csv_text, out / "table.csv")
    atomic_write_text(json.dumps({"entries": entries, "seeds": seeds, "results": results},
                                 indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x),
                      out / "results.json")
    plots = plot_curves(histories, out)
    print("\n" + header + md)
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {len(plots)} plots in {out}")
    return 0
