"""`amorlip compare`: train several objectives with the same model, data, batch, seeds and steps, evaluate
each, and write a markdown/CSV table and PNG plots (the small-scale counterpart of the paper's Table 1 and
Figure 3).

Entries are objective names, or preset names (their own settings, e.g. `tiny-fastclip`), with optional
overrides in brackets, so ablations run the same way:

    amorlip compare --config tiny-clip --objectives 'clip,clip[temperature.scheme=rescaled],amorlip[amor.divide_by=target]'
    amorlip compare --objectives 'tiny-clip,tiny-fastclip,tiny-amorlip' --train.steps 600

Command-line overrides apply to every entry; an entry's own overrides come next, then the sweep point's.
`--sweep KEY=V1,V2` (repeatable: several make a grid) runs every entry at every point; `--budget` says what a
batch-size sweep holds equal (samples seen, by default). Each (entry, sweep point, seed) is one run, named
`{entry}-s{seed}-{hash of its result-changing settings}`, so a run already finished with the same settings is
skipped and a half-finished one resumes from its checkpoint. `--jobs N` trains N runs at once, each in its own
process (amorlip.jobs). Tables show the mean and the 95% t interval over seeds, and with `--reference LABEL`
each entry's paired difference to that entry with a verdict (amorlip.stats).
"""
from __future__ import annotations

import argparse
import csv
import difflib
import io
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from amorlip.files import atomic_write_text
from amorlip.history import read_history
from amorlip.config import ConfigError, build_config, convert, default_config, parse_overrides
from amorlip.resume import config_hash, flatten
from amorlip.runlock import FolderLock, check_free
from amorlip.signals import Stopped
from amorlip.stats import Interval, mean_interval, paired_difference, verdict


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


def parse_jobs(text: Any) -> int:
    """`--jobs 4` -> 4: how many runs train at once (each in its own process when more than one)."""
    try:
        jobs = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"--jobs {text}: not an integer (pass how many runs train at once, e.g. --jobs 2)") from None
    if jobs < 1:
        raise ConfigError(f"--jobs {text}: at least one run must train at a time (pass --jobs 1 or more)")
    return jobs


# ----------------------------------------------------------------------------------------------------
# sweeps and budgets

BUDGETS = ("samples", "steps", "epochs")
LENGTH_KEYS = ("train.steps", "train.epochs")
# Settings counted in steps: under a samples or epochs budget they scale with the run length, so that a
# smaller batch evaluates, logs, checkpoints and warms up at the same samples seen as the base batch.
STEP_KEYS = ("train.eval_every", "train.log_every", "train.checkpoint_every", "train.stop_at",
             "optim.warmup_steps", "optim.lr_cooldown_steps")
# Keys compare sets itself: a sweep over them is refused with the option that does it.
OWNED_KEYS = {"objective": "list the objectives in --objectives", "train.seed": "use --seeds",
              "train.name": "compare names each run by its settings", "train.output_dir": "use --out",
              "train.resume": "compare resumes half-finished runs itself"}
SHORT_NAMES = {"train.batch_size": "bs"}


@dataclass
class Sweep:
    """One `--sweep KEY=V1,V2,...`: the dotted key, the values as typed, and as the config holds them."""

    key: str
    texts: list[str]
    values: list[Any]


def parse_sweep(text: str) -> Sweep:
    """`train.batch_size=16,32,64` -> Sweep (the key checked, every value converted to the key's type)."""
    key, eq, body = text.partition("=")
    key = key.strip().replace("-", "_")
    texts = split_entries(body) if eq else []
    if not eq or not key or not texts or any(not t for t in body.split(",")):
        raise ConfigError(f"--sweep {text!r}: write KEY=V1,V2,... with no empty value "
                          "(e.g. --sweep train.batch_size=16,32,64)")
    if key in OWNED_KEYS:
        raise ConfigError(f"--sweep {text}: {key} is set by compare ({OWNED_KEYS[key]})")
    known = list(flatten(default_config().to_dict()))
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"--sweep {text}: unknown key {key} ({hint}`amorlip train --help` lists the keys)")
    values = []
    for t in texts:
        try:
            values.append(convert(key, t))
        except ConfigError as e:
            raise ConfigError(f"--sweep {text}: {e}") from None
    shown = [json.dumps(v, default=str) for v in values]
    if len(set(shown)) != len(shown):
        raise ConfigError(f"--sweep {text} repeats a value (pass each value once)")
    return Sweep(key, texts, values)


def parse_sweeps(texts: Iterable[str] | None) -> list[Sweep]:
    sweeps = [parse_sweep(t) for t in texts or []]
    keys = [s.key for s in sweeps]
    for key in keys:
        if keys.count(key) > 1:
            raise ConfigError(f"--sweep {key} is given twice (list all its values in one --sweep {key}=V1,V2,...)")
    if "train.steps" in keys and "train.epochs" in keys:
        raise ConfigError("--sweep train.steps and --sweep train.epochs both set the run length (sweep one of them)")
    return sweeps


def sweep_points(sweeps: list[Sweep]) -> list[dict[str, Any]]:
    """Every combination of the swept values (the first key varies slowest); [{}] without a sweep."""
    return [point for point, _ in sweep_grid(sweeps)]


def sweep_grid(sweeps: list[Sweep]) -> list[tuple[dict[str, Any], list[tuple[str, str]]]]:
    """Every sweep point, as {key: value} and as the (key, text) overrides that set it."""
    out = []
    for combo in itertools.product(*(range(len(s.values)) for s in sweeps)):
        chosen = list(zip(sweeps, combo))
        out.append(({s.key: s.values[i] for s, i in chosen}, [(s.key, s.texts[i]) for s, i in chosen]))
    return out


def short_names(keys: Iterable[str]) -> dict[str, str]:
    """Column and label names for swept keys: `bs` for train.batch_size, else the key's last part (the whole
    key where two would read the same)."""
    keys = list(keys)
    short = {k: SHORT_NAMES.get(k, k.split(".")[-1]) for k in keys}
    return {k: (s if list(short.values()).count(s) == 1 else k) for k, s in short.items()}


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if not isinstance(value, (list, dict)) else json.dumps(value)


def point_label(point: dict[str, Any]) -> str:
    """`{'train.batch_size': 32}` -> `bs=32`."""
    names = short_names(point)
    return " ".join(f"{names[k]}={format_value(v)}" for k, v in point.items())


def scaled(steps: int, factor: float) -> int:
    """A count of steps times `factor`, rounded half up, at least 1."""
    return max(1, math.floor(steps * factor + 0.5))


def budget_overrides(base: Any, point: dict[str, Any], budget: str, explicit: bool) -> list[tuple[str, str]]:
    """The run length (and the settings counted in steps) of one sweep point, from the entry's `base` config.

    samples: train.steps = round(base steps * base batch / batch) (at least 1); a base given in epochs keeps them.
    steps: the base's train.steps. epochs: the base's train.epochs. Under samples and epochs the STEP_KEYS given
    in steps scale by base batch / batch too (eval, logging, checkpoints, warm-up, cooldown at the same samples
    seen). A sweep over train.steps / train.epochs sets the length itself: no conversion.
    """
    swept_length = [k for k in LENGTH_KEYS if k in point]
    if swept_length:
        if explicit:
            raise ConfigError(f"--budget {budget} and --sweep {swept_length[0]} both set the run length "
                              f"(drop --budget, or sweep another key)")
        return []
    steps, epochs = base.train.steps, base.train.epochs
    if budget == "steps" and steps is None:
        raise ConfigError(f"--budget steps holds train.steps fixed, but the base config gives train.epochs={epochs} "
                          f"(pass --train.steps N, or --budget epochs)")
    if budget == "epochs" and epochs is None:
        raise ConfigError(f"--budget epochs holds train.epochs fixed, but the base config gives train.steps={steps} "
                          f"(pass --train.epochs N, or --budget samples)")
    batch = int(point.get("train.batch_size", base.train.batch_size))
    factor = 1.0 if budget == "steps" else base.train.batch_size / batch
    out: list[tuple[str, str]] = []
    if budget == "samples" and steps is not None and factor != 1.0:
        out.append(("train.steps", str(scaled(steps, factor))))
    if factor != 1.0:
        flat = flatten(base.to_dict())
        for key in STEP_KEYS:
            if key not in point and flat.get(key):
                out.append((key, str(scaled(int(flat[key]), factor))))
    return out


# ----------------------------------------------------------------------------------------------------
# the plan: every run, validated before anything trains


@dataclass
class Run:
    """One training run of the comparison: an entry at a sweep point with a seed, and its full config."""

    entry: str
    point: dict[str, Any]
    seed: int
    cfg: Any

    @property
    def label(self) -> str:
        """`clip bs=32 s1`."""
        return " ".join(filter(None, (self.entry, point_label(self.point), f"s{self.seed}")))

    @property
    def name(self) -> str:
        return self.cfg.train.name

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.output_dir) / self.cfg.train.name


@dataclass
class Plan:
    entries: list[str]
    seeds: list[int]
    sweeps: list[Sweep]
    budget: str
    reference: str | None
    jobs: int
    out: Path
    runs: list[Run]
    base_lengths: dict[str, str]  # entry -> its run length before the budget conversion


def compare_plan(args: argparse.Namespace, common: list[tuple[str, Any]]) -> Plan:
    """Every run `compare` makes, each config built and validated (so a typo in the last entry or sweep value
    does not surface after an hour of training) and named entry-seed-hash of its result-changing settings (so an
    ablation, or a changed default, never reuses another's run)."""
    from amorlip import objectives
    from amorlip.config import preset_names

    entries = [parse_entry(e) for e in split_entries(args.objectives)]
    if not entries:
        raise ConfigError("--objectives is empty (name at least one objective, e.g. --objectives clip,amorlip)")
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--objectives {args.objectives} lists an entry twice (list each once)")
    seeds = parse_seeds(str(getattr(args, "seeds", "0")))
    jobs = parse_jobs(getattr(args, "jobs", 1))
    sweeps = parse_sweeps(getattr(args, "sweep", None))
    budget = getattr(args, "budget", None) or "samples"
    budget_given = bool(getattr(args, "budget_given", False))
    if budget not in BUDGETS:
        raise ConfigError(f"--budget {budget} is not one of {', '.join(BUDGETS)} "
                          "(pass --budget samples, the default, for equal samples seen)")
    reference = getattr(args, "reference", None)
    if reference is not None and reference not in labels:
        raise ConfigError(f"--reference {reference!r} is not an entry of --objectives ({', '.join(labels)}) "
                          f"(pass one of them, e.g. --reference {labels[0]})")
    if reference is not None and len(labels) < 2:
        raise ConfigError(f"--reference {reference}: there is no other entry to compare with "
                          "(list two or more entries in --objectives)")
    out = Path(args.out)
    grid = sweep_grid(sweeps)
    runs: list[Run] = []
    names: dict[str, Run] = {}
    base_lengths: dict[str, str] = {}
    for entry in entries:
        if entry.objective in objectives.REGISTRY:
            base_name, head = args.config, [("objective", entry.objective)]
        elif entry.objective in preset_names() or Path(entry.objective).is_file():
            base_name, head = entry.objective, []
        else:
            raise ConfigError(f"entry {entry.label!r}: {entry.objective!r} is neither an objective "
                              f"({', '.join(objectives.REGISTRY)}) nor a preset (`amorlip presets` lists them)")
        entry_pairs = [*head, *common, *entry.overrides]
        base = build_config(base_name, entry_pairs)
        base_lengths[entry.label] = (f"{base.train.steps} steps at batch {base.train.batch_size}" if base.train.steps
                                     else f"{base.train.epochs} epochs at batch {base.train.batch_size}")
        for point, point_pairs in grid:
            where = f"sweep point {point_label(point)}: " if point else ""
            try:
                length = budget_overrides(base, point, budget, explicit=budget_given) if point else []
            except ConfigError as e:
                raise ConfigError(f"entry {entry.label!r}: {e}") from None
            for seed in seeds:
                overrides = [*entry_pairs, *point_pairs, *length, ("train.seed", str(seed)),
                             ("train.output_dir", str(out / "runs")), ("train.resume", "auto")]
                try:
                    cfg = build_config(base_name, overrides)
                except ConfigError as e:
                    raise ConfigError(f"entry {entry.label!r}, {where}{e}" if point else str(e)) from None
                if jobs > 1 and cfg.train.threads == 0:
                    cfg.train.threads = 1  # N runs at once: one thread each, unless the user said otherwise
                # a long entry is cut to stay one folder name (NAME_MAX); the hash keeps names apart
                cfg.train.name = f"{safe_name(entry.label)[:200]}-s{seed}-{config_hash(cfg.to_dict())}"
                run = Run(entry.label, point, seed, cfg)
                if cfg.train.name in names:
                    other = names[cfg.train.name]
                    keys = [k for k in point if other.point.get(k) != point[k]] or list(point)
                    raise ConfigError(f"--sweep {', '.join(keys)}: the points {point_label(other.point)} and "
                                      f"{point_label(point)} train the same run of {entry.label}, since "
                                      f"{'the key does' if len(keys) == 1 else 'these keys do'} not change what is "
                                      "trained (sweep a key that changes results; logging, checkpoint and evaluation "
                                      "settings do not)")
                names[cfg.train.name] = run
                runs.append(run)
    return Plan(labels, seeds, sweeps, budget, reference, jobs, out, runs, base_lengths)


def compare_configs(args: argparse.Namespace, common: list[tuple[str, Any]]) -> list[Run]:
    """The runs of `compare_plan` (what `--print-config` shows)."""
    return compare_plan(args, common).runs


# ----------------------------------------------------------------------------------------------------
# finished runs: what a rerun skips

# Settings that do not change the weights but do change the metrics a run reports: a finished run made with
# other values is evaluated again (resumed from its final checkpoint) instead of being skipped.
EVAL_KEYS = ("data.val_size", "data.eval_size", "data.val_path", "train.eval_every")


def finished_metrics(run: Run) -> dict[str, float] | None:
    """The final metrics of `run` when its folder holds a finished run (summary.json) made with the same settings
    (config.yaml: the same result-changing settings, evaluated the same way); else None."""
    import yaml

    summary_path, config_path = run.run_dir / "summary.json", run.run_dir / "config.yaml"
    if not (summary_path.is_file() and config_path.is_file()):
        return None
    try:
        stored = yaml.safe_load(config_path.read_text())
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(stored, dict) or not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
        return None
    requested = run.cfg.to_dict()
    if config_hash(stored) != config_hash(requested):
        return None
    old, new = flatten(stored), flatten(requested)
    if any(k in old and old[k] != new[k] for k in new if k in EVAL_KEYS or k.startswith("eval.")):
        return None
    return summary["metrics"]


# ----------------------------------------------------------------------------------------------------
# tables: mean and 95% interval per entry and sweep point; paired differences to a reference


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Mean zero-shot top-1, each task's top-1, and mean retrieval R@1 (both directions)."""
    out = {k: v for k, v in metrics.items() if (k.endswith("/top1") or k == "zeroshot/mean_top1")
           and not k.startswith("normalizer/") and _number(v)}
    r1 = [v for k, v in metrics.items() if k.startswith("retrieval/") and k.endswith("R@1") and _number(v)]
    if r1:
        out["retrieval/mean_R@1"] = sum(r1) / len(r1)
    return out


def normalizer_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The normaliser diagnostics among a run's final metrics (keys `normalizer/...`)."""
    return {k: v for k, v in metrics.items() if k.startswith("normalizer/") and _number(v)}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _order(columns: Iterable[str]) -> list[str]:
    return sorted(columns, key=lambda k: (k != "zeroshot/mean_top1", k != "retrieval/mean_R@1", k))


def _groups(record: dict[str, Any]) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(entry, sweep point, its runs with metrics), in entry and sweep order; points without runs left out."""
    sweep = record.get("sweep") or {}
    points = [dict(zip(sweep, combo)) for combo in itertools.product(*sweep.values())]
    runs = [r for r in record["runs"] if isinstance(r.get("metrics"), dict)]
    out = []
    for entry in record["entries"]:
        for point in points:
            mine = [r for r in runs if r["entry"] == entry and (r.get("sweep") or {}) == point]
            if mine:
                out.append((entry, point, mine))
    return out


def _cell(iv: Interval, percent: bool) -> str:
    if percent:
        return f"{100 * iv.mean:.2f}" + (f" ± {100 * iv.half:.2f}" if iv.half is not None else "")
    return f"{iv.mean:.4g}" + (f" ± {iv.half:.2g}" if iv.half is not None else "")


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def build_table(record: dict[str, Any], metrics_of: Callable[[dict], dict] = headline_metrics,
                percent: bool = True) -> tuple[str, str, list[str]]:
    """Markdown and CSV tables: a row per entry and sweep point, a column per metric: the mean over seeds and
    its 95% t interval (mean ± half-width; in % when `percent`; no interval from one seed). The CSV holds the raw
    values: `METRIC mean`, `METRIC ci95` (the half-width) and `METRIC sd`."""
    groups = _groups(record)
    columns = _order({k for _, _, runs in groups for r in runs for k in metrics_of(r["metrics"])})
    keys = list(record.get("sweep") or {})
    names = short_names(keys)
    md = ["| entry | " + "".join(f"{names[k]} | " for k in keys) + "seeds |" + "".join(f" {c} |" for c in columns),
          "|---|" + "---|" * len(keys) + "---|" + "---|" * len(columns)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["entry", *keys, "seeds"] + [f"{c} {what}" for c in columns for what in ("mean", "ci95", "sd")])
    for entry, point, runs in groups:
        cells, raw = [], []
        for c in columns:
            vals = [metrics_of(r["metrics"])[c] for r in runs if c in metrics_of(r["metrics"])]
            if not vals:
                cells.append("-")
                raw += ["", "", ""]
                continue
            iv = mean_interval(vals)
            cells.append(_cell(iv, percent))
            raw += [_num(iv.mean), _num(iv.half), _num(iv.sd)]
        shown = [format_value(point[k]) for k in keys]
        md.append(f"| {entry} | " + "".join(f"{v} | " for v in shown) + f"{len(runs)} |"
                  + "".join(f" {c} |" for c in cells))
        writer.writerow([entry, *shown, len(runs), *raw])
    return "\n".join(md) + "\n", buf.getvalue(), columns


def build_differences(record: dict[str, Any], reference: str, metrics_of: Callable[[dict], dict] = headline_metrics,
                      percent: bool = True) -> tuple[str, str, list[dict[str, Any]]]:
    """Paired differences `entry - reference` per entry, sweep point and metric, over the seeds both ran (same
    seed = same data order and initialisation): mean, 95% t interval and verdict (better / worse when the
    interval excludes 0, else "no difference measured"; higher is better for every headline metric)."""
    groups = _groups(record)
    keys = list(record.get("sweep") or {})
    names = short_names(keys)
    refs = {json.dumps(point, sort_keys=True): runs for entry, point, runs in groups if entry == reference}
    unit = " (points)" if percent else ""
    md = ["| entry | " + "".join(f"{names[k]} | " for k in keys) + f"metric | seeds | difference{unit} | "
          "95% interval | verdict |", "|---|" + "---|" * len(keys) + "---|---|---|---|---|"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["entry", "reference", *keys, "metric", "seeds", "difference", "ci95_low", "ci95_high", "verdict"])
    rows = []
    scale = 100.0 if percent else 1.0
    for entry, point, runs in groups:
        ref_runs = refs.get(json.dumps(point, sort_keys=True))
        if entry == reference or not ref_runs:
            continue
        mine = {r["seed"]: metrics_of(r["metrics"]) for r in runs}
        theirs = {r["seed"]: metrics_of(r["metrics"]) for r in ref_runs}
        for c in _order({k for m in mine.values() for k in m} & {k for m in theirs.values() for k in m}):
            diff = paired_difference({s: m[c] for s, m in mine.items() if c in m},
                                     {s: m[c] for s, m in theirs.items() if c in m})
            if diff is None:
                continue
            word = verdict(diff)
            rows.append({"entry": entry, "sweep": point, "metric": c, "seeds": diff.n, "difference": diff.mean,
                         "ci95_low": diff.low, "ci95_high": diff.high, "verdict": word})
            interval = "-" if diff.half is None else f"[{scale * diff.low:+.2f}, {scale * diff.high:+.2f}]"
            shown = [format_value(point[k]) for k in keys]
            md.append(f"| {entry} | " + "".join(f"{v} | " for v in shown) +
                      f"{c} | {diff.n} | {scale * diff.mean:+.2f} | {interval} | {word} |")
            writer.writerow([entry, reference, *shown, c, diff.n, _num(diff.mean), _num(diff.low), _num(diff.high),
                             word])
    return "\n".join(md) + "\n", buf.getvalue(), rows


# ----------------------------------------------------------------------------------------------------
# plots


def _band(values: list[float]) -> tuple[float, float, float]:
    """mean, and the 95% interval's ends (the mean itself for one value)."""
    iv = mean_interval(values)
    return iv.mean, (iv.low if iv.half is not None else iv.mean), (iv.high if iv.half is not None else iv.mean)


def _series(runs: list[list[dict[str, Any]]], key: str, x_scale: float = 1.0,
            y_scale: float = 1.0) -> list[tuple[float, float, float, float]]:
    """(x, mean, low, high) per logged step of `key` over the seeds' histories `runs`: x = step * x_scale, the
    values times y_scale, low/high the 95% t interval's ends (the mean itself where one seed logged the step)."""
    by_step: dict[int, list[float]] = {}
    for h in runs:
        for row in h:
            if key in row and _number(row[key]):
                by_step.setdefault(row["step"], []).append(row[key])
    return [(s * x_scale, *_band([y_scale * v for v in by_step[s]])) for s in sorted(by_step)]


def _draw(ax: Any, series: list[tuple[float, float, float, float]], alpha_band: float = 0.15, **style: Any) -> None:
    """A mean line, with the interval as a band where any point has one."""
    xs = [p[0] for p in series]
    line, = ax.plot(xs, [p[1] for p in series], **style)
    if any(p[2] != p[3] for p in series):
        ax.fill_between(xs, [p[2] for p in series], [p[3] for p in series], alpha=alpha_band, color=line.get_color())


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(histories: dict[str, list[list[dict[str, Any]]]], out: Path,
                x_scale: dict[str, float] | None = None, xlabel: str = "step") -> list[Path]:
    """One PNG per curve metric (the objective loss, every top-1 and R@1): value vs step per label (mean over
    seeds; band = the 95% t interval when two or more seeds logged the step). `x_scale[label]` multiplies the
    steps (the batch size, for an x axis of samples seen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from amorlip.report import is_curve_metric

    metrics = sorted({k for runs in histories.values() for h in runs for row in h for k in row
                      if k.startswith("eval/") and is_curve_metric(k)})
    paths = []
    for metric in ["loss"] + metrics:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        key = "objective_loss" if metric == "loss" else metric
        for label, runs in histories.items():
            series = _series(runs, key, (x_scale or {}).get(label, 1.0), 1.0 if metric == "loss" else 100.0)
            if series:
                _draw(ax, series, label=label, marker=None if metric == "loss" else "o", ms=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("objective loss" if metric == "loss" else f"{metric[5:]} (%)")
        ax.set_title(metric + " (mean, 95% interval over seeds)")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out / f"{safe_name(metric)}.png"))
    return paths


NORMALIZER_PANELS = tuple((split, modality) for split in ("train", "heldout") for modality in ("image", "text"))
NORMALIZER_ESTIMATES = ("objective", "inbatch")


def normalizer_curves(histories: dict[str, list[list[dict[str, Any]]]], x_scale: dict[str, float] | None = None
                      ) -> dict[tuple[str, str, str, str], list[tuple[float, float, float, float]]]:
    """The normaliser diagnostics over training: (label, split, modality, estimate) -> (x, mean, low, high) of
    the MSE of the log partition estimate, for the splits train | heldout, the modalities image | text and the
    estimates objective (the method's own) | inbatch (the batch's, at the run's batch size). Labels whose runs
    logged none are left out, and so is the objective estimate of a method that has none (CLIP, SigLIP)."""
    curves = {}
    for label, runs in histories.items():
        for split, modality in NORMALIZER_PANELS:
            for estimate in NORMALIZER_ESTIMATES:
                series = _series(runs, f"eval/normalizer/{split}/{estimate}/{modality}_mse",
                                 (x_scale or {}).get(label, 1.0))
                if series:
                    curves[(label, split, modality, estimate)] = series
    return curves


def plot_normalizer_curves(histories: dict[str, list[list[dict[str, Any]]]], out: Path,
                           x_scale: dict[str, float] | None = None, xlabel: str = "step",
                           name: str = "normalizer_mse", title: str = "") -> list[Path]:
    """NAME.png: the curves of `normalizer_curves`, a panel per split and modality, a colour per label, solid for
    the method's own estimate and dashed for the in-batch one; nothing when no run logged them."""
    curves = normalizer_curves(histories, x_scale)
    if not curves:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), squeeze=False, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(k[0] for k in curves))
    legend: dict[str, Any] = {}
    for ax, (split, modality) in zip(axes.flat, NORMALIZER_PANELS):
        for i, label in enumerate(labels):
            for estimate, dashes in zip(NORMALIZER_ESTIMATES, ("-", "--")):
                series = curves.get((label, split, modality, estimate))
                if series:
                    _draw(ax, series, color=colours[i % len(colours)], linestyle=dashes, marker="o", ms=3,
                          label=f"{label} ({'own' if estimate == 'objective' else 'in-batch'})", alpha_band=0.07)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MSE of log Z estimate")
        ax.set_title(f"{split} pairs, {modality}", fontsize=10)
        handles, names = ax.get_legend_handles_labels()
        legend.update(zip(names, handles))
        if not handles:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    order = [f"{label} ({kind})" for label in labels for kind in ("own", "in-batch")]
    names = [n for n in order if n in legend]
    fig.legend([legend[n] for n in names], names, loc="outside lower center", ncols=3, fontsize=7)
    fig.suptitle(f"normaliser diagnostics over training{', ' + title if title else ''} (solid: the method's own "
                 "estimate, dashed: the in-batch one; mean, 95% interval over seeds)", fontsize=10)
    return [_save(fig, out / f"{name}.png")]


def _axis(key: str, values: list[Any]) -> str:
    """How to draw swept values: log2 (batch sizes, powers of two), log (positive, a decade or more apart),
    linear (other numbers) or category (anything else)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "category"
    if all(v > 0 for v in values):
        if key.endswith("batch_size") or all(float(v).is_integer() and int(v) & (int(v) - 1) == 0 for v in values) \
                and len(values) > 2:
            return "log2"
        if max(values) / min(values) >= 10:
            return "log"
    return "linear"


def plot_sweeps(record: dict[str, Any], out: Path, columns: list[str]) -> list[Path]:
    """One PNG per headline metric against the first swept key: a line per entry (mean over seeds, band = 95%
    interval); with more swept keys, a panel per combination of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = record.get("sweep") or {}
    if not sweep:
        return []
    keys = list(sweep)
    x_key, x_values = keys[0], sweep[keys[0]]
    axis = _axis(x_key, x_values)
    panels = [dict(zip(keys[1:], combo)) for combo in itertools.product(*(sweep[k] for k in keys[1:]))]
    groups = _groups(record)
    paths = []
    for metric in columns:
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            for entry in record["entries"]:
                series = []
                for i, xv in enumerate(x_values):
                    point = {x_key: xv, **panel}
                    runs = next((r for e, p, r in groups if e == entry and p == point), [])
                    vals = [headline_metrics(r["metrics"])[metric] for r in runs
                            if metric in headline_metrics(r["metrics"])]
                    if vals:
                        series.append((i if axis == "category" else xv, *_band([100 * v for v in vals])))
                if series:
                    _draw(ax, series, marker="o", ms=4, label=entry)
            if axis == "category":
                ax.set_xticks(range(len(x_values)), [format_value(v) for v in x_values])
            elif axis in ("log2", "log"):
                ax.set_xscale("log", base=2 if axis == "log2" else 10)
                ax.set_xticks(x_values, [format_value(v) for v in x_values])
                ax.minorticks_off()
            ax.set_xlabel(x_key)
            ax.set_ylabel(f"{metric} (%)")
            ax.set_title(f"{metric}, {point_label(panel)}" if panel else metric, fontsize=10)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        budget = record.get("budget", "samples") + (f", {record['base_length']}" if record.get("base_length") else "")
        fig.suptitle(f"mean and 95% interval over seeds; budget {budget}", fontsize=9)
        paths.append(_save(fig, out / f"sweep_{safe_name(metric)}.png"))
    return paths


# ----------------------------------------------------------------------------------------------------
# outputs: everything is rebuilt from results.json


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def run_record(run: Run, metrics: dict[str, float] | None, status: str, error: str = "") -> dict[str, Any]:
    cfg = run.cfg
    return {"entry": run.entry, "sweep": run.point, "seed": run.seed, "label": run.label, "status": status,
            "error": error or None, "name": run.name, "run_dir": str(run.run_dir),
            "config_hash": config_hash(cfg.to_dict()), "batch_size": cfg.train.batch_size, "steps": cfg.train.steps,
            "epochs": cfg.train.epochs, "metrics": metrics}


def describe_setup(record: dict[str, Any]) -> str:
    """The table's first line: what was held equal."""
    first = record["runs"][0] if record["runs"] else {}
    parts = [f"model {record.get('model')}", f"data {record.get('data')}"]
    sweep = record.get("sweep") or {}
    if "train.batch_size" not in sweep:
        parts.append(f"batch {first.get('batch_size')}")
    if sweep:
        parts.append("sweep " + " x ".join(f"{k}={','.join(format_value(v) for v in vs)}" for k, vs in sweep.items()))
        parts.append(f"budget {record.get('budget')}" + (f" ({record['base_length']})" if record.get("base_length")
                                                          else ""))
    else:
        length = f"{first.get('steps')} steps" if first.get("steps") else f"{first.get('epochs')} epochs"
        parts.append(length)
    parts.append(f"seeds {','.join(map(str, record['seeds']))}")
    return ", ".join(parts) + "; mean ± 95% t interval over seeds"


def write_outputs(record: dict[str, Any], out: Path) -> tuple[str, list[Path]]:
    """table.md/.csv, differences.csv (with a reference), normalizers.md/.csv (when the runs report normaliser
    diagnostics), results.json and the plots; returns the markdown shown and the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    header = describe_setup(record) + "\n\n"
    md, csv_text, columns = build_table(record)
    if not _groups(record):
        md = "(no run finished)\n"
    failed = [r for r in record["runs"] if r.get("status") == "failed"]
    if failed:
        waiting = [r for r in failed if r.get("error") == "not finished yet"]
        if len(waiting) < len(failed):
            md += "\nnot in the table (failed): " + ", ".join(r["label"] for r in failed if r not in waiting) + "\n"
        if waiting:
            md += "\nnot in the table (not finished yet): " + ", ".join(r["label"] for r in waiting) + "\n"
    shown = header + md
    reference = record.get("reference")
    if reference:
        diff_md, diff_csv, _ = build_differences(record, reference)
        shown += (f"\nPaired differences to {reference} (entry - {reference}, same seeds), 95% t interval:\n\n"
                  + diff_md)
        atomic_write_text(diff_csv, out / "differences.csv")
        written.append(out / "differences.csv")
    atomic_write_text(shown, out / "table.md")
    atomic_write_text(csv_text, out / "table.csv")
    written += [out / "table.md", out / "table.csv"]
    norm_md, norm_csv, norm_columns = build_table(record, normalizer_metrics, percent=False)
    if norm_columns:
        atomic_write_text(header + "Normaliser diagnostics (mean ± 95% t interval over seeds)\n\n" + norm_md,
                          out / "normalizers.md")
        atomic_write_text(norm_csv, out / "normalizers.csv")
        written += [out / "normalizers.md", out / "normalizers.csv"]
    atomic_write_text(json.dumps(_clean(record), indent=2), out / "results.json")
    written.append(out / "results.json")

    sweep = record.get("sweep") or {}
    by_point: dict[str, dict[str, list[list[dict[str, Any]]]]] = {}  # sweep point -> entry -> histories
    batch: dict[str, dict[str, float]] = {}  # sweep point -> entry -> batch size (x scale: samples seen)
    finished = [{"entry": r["entry"], "point": point_label(r.get("sweep") or {}), "seed": r["seed"],
                 "batch_size": float(r.get("batch_size") or 1), "history": read_history(Path(r["run_dir"]))}
                for r in record["runs"] if isinstance(r.get("metrics"), dict)]  # each run's log, read once
    for r in finished:
        by_point.setdefault(r["point"], {}).setdefault(r["entry"], []).append(r["history"])
        batch.setdefault(r["point"], {})[r["entry"]] = r["batch_size"]
    if any(any(h) for entries in by_point.values() for hs in entries.values() for h in hs):
        xlabel = "samples seen" if sweep else "step"

        def label(entry: str, point: str) -> str:
            return " ".join(filter(None, (entry, point)))

        histories = {label(e, p): hs for p, entries in by_point.items() for e, hs in entries.items()}
        x_scale = {label(e, p): b for p, entries in batch.items() for e, b in entries.items()}
        written += plot_curves(histories, out, x_scale if sweep else None, xlabel)
        for point, entries in by_point.items():  # one normaliser plot per sweep point: a line per entry
            written += plot_normalizer_curves(entries, out, batch[point] if sweep else None, xlabel,
                                              "normalizer_mse" + (f"_{safe_name(point)}" if point else ""), point)
    written += plot_sweeps(record, out, columns)
    from amorlip.crossing import write_crossing

    written += write_crossing(finished, record.get("reference"), out, safe_name)
    return shown, written


def rebuild_outputs(results_json: Path, out: Path | None = None) -> tuple[str, list[Path]]:
    """The tables and plots again, from a results.json alone (and the run folders' metrics.jsonl for curves)."""
    results_json = Path(results_json)
    return write_outputs(json.loads(results_json.read_text()), out or results_json.parent)


# ----------------------------------------------------------------------------------------------------
# running


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors a run reports with a message that names the fix (the others are bugs: their traceback shows)."""
    from amorlip.data.types import DataError
    from amorlip.errors import CheckpointError

    return (ConfigError, DataError, CheckpointError, FloatingPointError, FileNotFoundError)


def _train_sequential(plan: Plan, todo: list[Run]) -> dict[str, str]:
    """Train `todo` one after another in this process; returns run name -> error line of the runs that failed."""
    from amorlip.train import main_worker

    failures = {}
    for i, run in enumerate(todo, 1):
        cfg = run.cfg
        length = f"{cfg.train.steps} steps" if cfg.train.steps else f"{cfg.train.epochs} epochs"
        print(f"[compare {i}/{len(todo)}] {run.label}: {length} at batch {cfg.train.batch_size}", flush=True)
        try:
            main_worker(cfg)
        except _expected_errors() as e:
            failures[run.name] = f"amorlip train: error: {e}"
            print(f"[compare {i}/{len(todo)}] {run.label} failed: {e}", file=sys.stderr, flush=True)
    return failures


def _train_parallel(plan: Plan, todo: list[Run]) -> dict[str, str]:
    """Train `todo`, `plan.jobs` at once, each in its own `python -m amorlip.cli train --config RUN.yaml`
    process (config and full output in OUT/jobs/); returns run name -> error line of the runs that failed."""
    import amorlip
    from amorlip.config import describe
    from amorlip.jobs import Job, run_jobs

    src = str(Path(amorlip.__file__).resolve().parent.parent)  # the children import this very package
    pythonpath = os.pathsep.join(filter(None, (src, os.environ.get("PYTHONPATH"))))
    jobs = []
    for run in todo:
        config_path = plan.out / "jobs" / f"{run.name}.yaml"
        atomic_write_text(describe(run.cfg), config_path)
        env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}
        threads = str(run.cfg.train.threads or 1)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            if var not in os.environ:
                env[var] = threads
        jobs.append(Job(run.label, [sys.executable, "-m", "amorlip.cli", "train", "--config", str(config_path)],
                        plan.out / "jobs" / f"{run.name}.log", env))
    outcomes = run_jobs(jobs, plan.jobs)
    return {run.name: f"{o.describe_exit()}: {o.error_line}" for run, o in zip(todo, outcomes) if not o.ok}


COMPARE_IN_USE_FIX = "wait for it to end, or stop it (Ctrl-C or kill -TERM PID saves its runs), or pass another --out"


def run_compare(args: argparse.Namespace, extra: list[str]) -> int:
    """The runs of the plan (skipping finished ones), then tables and plots. The --out folder is locked for the
    command's life and every run folder must be free (amorlip.runlock), so two compares never mix their runs;
    --tables-only trains nothing and locks nothing."""
    plan = compare_plan(args, parse_overrides(extra))  # bad input stops here, before torch is imported
    if getattr(args, "tables_only", False):
        return _compare(args, plan)
    with FolderLock(plan.out, "compare folder", COMPARE_IN_USE_FIX):
        for run in plan.runs:
            check_free(run.run_dir, f"the run folder of {run.label},", COMPARE_IN_USE_FIX)
        return _compare(args, plan)


def _compare(args: argparse.Namespace, plan: Plan) -> int:
    from amorlip.checkpoint import latest_checkpoint
    from amorlip.jobs import JobsStopped

    plan.out.mkdir(parents=True, exist_ok=True)
    finished = {run.name: m for run in plan.runs if (m := finished_metrics(run)) is not None}
    todo = [run for run in plan.runs if run.name not in finished]
    tables_only = bool(getattr(args, "tables_only", False))
    if tables_only:
        print(f"--tables-only: {len(finished)} of {len(plan.runs)} runs have finished; training none")
        finished_only, todo = dict(finished), []
        finished = {}  # nothing is "skipped" below: list only what has finished
    if finished:
        print(f"skipping {len(finished)} of {len(plan.runs)} runs, finished earlier with the same settings:")
        for run in plan.runs:
            if run.name in finished:
                print(f"  {run.label}: {run.run_dir}")
    resuming = [run for run in todo if latest_checkpoint(run.run_dir) is not None]
    if todo:
        print(f"training {len(todo)} run(s)" + (f", {len(resuming)} resumed from their checkpoint" if resuming else "")
              + (f", {plan.jobs} at a time" if plan.jobs > 1 and len(todo) > 1 else ""), flush=True)
    try:
        if plan.jobs > 1 and len(todo) > 1:
            failures = _train_parallel(plan, todo)
        else:
            failures = _train_sequential(plan, todo)
    except (JobsStopped, Stopped, KeyboardInterrupt) as e:  # Stopped: a run trained here saved and stopped
        signum = getattr(e, "signum", 2)
        print("stopped: rerun the same command to continue (finished runs are skipped, stopped ones resume from "
              "their last checkpoint)", file=sys.stderr)
        return 128 + int(signum)

    records = []
    for run in plan.runs:
        if tables_only:
            metrics = finished_only.get(run.name)
            records.append(run_record(run, metrics, "skipped" if metrics is not None else "failed",
                                      "" if metrics is not None else "not finished yet"))
            continue
        metrics = finished.get(run.name)
        status = "skipped" if metrics is not None else "trained"
        error = failures.get(run.name, "")
        if metrics is None and not error:
            metrics = finished_metrics(run)
            if metrics is None:
                error = f"not finished: {run.run_dir} holds no summary.json of a finished run with these settings"
                if run.cfg.train.stop_at is not None:
                    error += (f" (train.stop_at={run.cfg.train.stop_at} stopped it early; rerun without "
                              "--train.stop-at to finish it)")
        if error:
            metrics, status = None, "failed"
        records.append(run_record(run, metrics, status, error))
    first = plan.runs[0].cfg
    record = {"version": 2, "entries": plan.entries, "seeds": plan.seeds,
              "sweep": {s.key: s.values for s in plan.sweeps}, "budget": plan.budget, "reference": plan.reference,
              "base_length": "; ".join(dict.fromkeys(plan.base_lengths.values())), "model": first.model.name,
              "data": first.data.source, "runs": records}
    shown, written = write_outputs(record, plan.out)
    print("\n" + shown)
    print(f"wrote {', '.join(str(p) for p in written if p.suffix != '.png')} and "
          f"{sum(p.suffix == '.png' for p in written)} plots in {plan.out}")
    failed = [r for r in records if r["status"] == "failed"]
    if tables_only:
        return 0
    if failed:
        print(f"{len(failed)} of {len(records)} runs failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r['label']}: {r['error']}", file=sys.stderr)
        return 1
    return 0
