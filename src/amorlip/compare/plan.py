"""The plan of a comparison: every (entry, sweep point, seed) run, its config built and validated before anything
trains, and its name.

`--sweep KEY=V1,V2` (several make a grid) runs every entry at every point; `--budget` says what a batch-size sweep
holds equal: samples seen (the default; the run length and the settings counted in steps scale with the batch),
steps, or epochs. A run is named `{entry}-s{seed}-{hash of its result-changing settings}` (`resume.config_hash`),
so an ablation or a changed default never reuses another's run.
"""
from __future__ import annotations

import argparse
import difflib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from amorlip.compare.entries import Entry, parse_entry, parse_jobs, parse_seeds, safe_name, split_entries
from amorlip.config import ConfigError, build_config, convert, default_config, preset_names
from amorlip.resume import config_hash, flatten


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
    """Every `--sweep`: each key swept once, and at most one of the keys that set the run length."""
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
    """A swept value as tables and labels show it (`%g` for floats, JSON for lists and dicts)."""
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
class PlannedRun:
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
    """What `compare` was asked for, and every run it makes."""

    entries: list[str]
    seeds: list[int]
    sweeps: list[Sweep]
    budget: str
    reference: str | None
    jobs: int
    out: Path
    runs: list[PlannedRun]
    base_lengths: dict[str, str]  # entry -> its run length before the budget conversion


def compare_plan(args: argparse.Namespace, common: list[tuple[str, Any]]) -> Plan:
    """Every run `compare` makes, each config built and validated (so a typo in the last entry or sweep value
    does not surface after an hour of training) and named entry-seed-hash of its result-changing settings (so an
    ablation, or a changed default, never reuses another's run)."""
    entries = _entries(args.objectives)
    labels = [e.label for e in entries]
    seeds = parse_seeds(str(getattr(args, "seeds", "0")))
    jobs = parse_jobs(getattr(args, "jobs", 1))
    sweeps = parse_sweeps(getattr(args, "sweep", None))
    budget = getattr(args, "budget", None) or "samples"
    if budget not in BUDGETS:
        raise ConfigError(f"--budget {budget} is not one of {', '.join(BUDGETS)} "
                          "(pass --budget samples, the default, for equal samples seen)")
    plan = Plan(labels, seeds, sweeps, budget, _reference(getattr(args, "reference", None), labels), jobs,
                Path(args.out), [], {})
    explicit = bool(getattr(args, "budget_given", False))
    names: dict[str, PlannedRun] = {}
    for entry in entries:
        base_name, entry_pairs = _entry_base(entry, args.config, common)
        base = build_config(base_name, entry_pairs)
        plan.base_lengths[entry.label] = (f"{base.train.steps} steps at batch {base.train.batch_size}"
                                          if base.train.steps else
                                          f"{base.train.epochs} epochs at batch {base.train.batch_size}")
        for run in _entry_runs(plan, entry, base_name, entry_pairs, base, explicit):
            _check_distinct(run, names)
            names[run.name] = run
            plan.runs.append(run)
    return plan


def compare_configs(args: argparse.Namespace, common: list[tuple[str, Any]]) -> list[PlannedRun]:
    """The runs of `compare_plan` (what `--print-config` shows)."""
    return compare_plan(args, common).runs


def run_name(label: str, seed: int, cfg: Any) -> str:
    """`{entry}-s{seed}-{config_hash}`; a long entry is cut to stay one folder name (NAME_MAX), the hash keeps
    names apart."""
    return f"{safe_name(label)[:200]}-s{seed}-{config_hash(cfg.to_dict())}"


def _entries(text: str) -> list[Entry]:
    """The entries of `--objectives`: at least one, each once."""
    entries = [parse_entry(e) for e in split_entries(text)]
    if not entries:
        raise ConfigError("--objectives is empty (name at least one objective, e.g. --objectives clip,amorlip)")
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--objectives {text} lists an entry twice (list each once)")
    return entries


def _reference(reference: str | None, labels: list[str]) -> str | None:
    """`--reference`: one of two or more entries, or None."""
    if reference is not None and reference not in labels:
        raise ConfigError(f"--reference {reference!r} is not an entry of --objectives ({', '.join(labels)}) "
                          f"(pass one of them, e.g. --reference {labels[0]})")
    if reference is not None and len(labels) < 2:
        raise ConfigError(f"--reference {reference}: there is no other entry to compare with "
                          "(list two or more entries in --objectives)")
    return reference


def _entry_base(entry: Entry, config: str | None, common: list[tuple[str, Any]]) -> tuple[str | None, list]:
    """The config an entry starts from and its overrides: `--config` with `objective=NAME` for an objective, the
    preset (or YAML file) itself for a preset; then the command line's overrides, then the entry's own."""
    from amorlip import objectives

    if entry.objective in objectives.REGISTRY:
        base_name, head = config, [("objective", entry.objective)]
    elif entry.objective in preset_names() or Path(entry.objective).is_file():
        base_name, head = entry.objective, []
    else:
        raise ConfigError(f"entry {entry.label!r}: {entry.objective!r} is neither an objective "
                          f"({', '.join(objectives.REGISTRY)}) nor a preset (`amorlip presets` lists them)")
    return base_name, [*head, *common, *entry.overrides]


def _entry_runs(plan: Plan, entry: Entry, base_name: str | None, entry_pairs: list, base: Any,
                explicit_budget: bool) -> Iterator[PlannedRun]:
    """The runs of one entry, sweep point after sweep point, seed after seed: the entry's overrides, then the
    point's and its budget's, then the seed, the runs folder and resume."""
    for point, point_pairs in sweep_grid(plan.sweeps):
        where = f"sweep point {point_label(point)}: " if point else ""
        try:
            length = budget_overrides(base, point, plan.budget, explicit=explicit_budget) if point else []
        except ConfigError as e:
            raise ConfigError(f"entry {entry.label!r}: {e}") from None
        for seed in plan.seeds:
            overrides = [*entry_pairs, *point_pairs, *length, ("train.seed", str(seed)),
                         ("train.output_dir", str(plan.out / "runs")), ("train.resume", "auto")]
            try:
                cfg = build_config(base_name, overrides)
            except ConfigError as e:
                raise ConfigError(f"entry {entry.label!r}, {where}{e}" if point else str(e)) from None
            if plan.jobs > 1 and cfg.train.threads == 0:
                cfg.train.threads = 1  # N runs at once: one thread each, unless the user said otherwise
            cfg.train.name = run_name(entry.label, seed, cfg)
            yield PlannedRun(entry.label, point, seed, cfg)


def _check_distinct(run: PlannedRun, names: dict[str, PlannedRun]) -> None:
    """Refuse two sweep points that train the same run (`names`: the runs planned so far, by name)."""
    if run.name not in names:
        return
    other, point = names[run.name], run.point
    keys = [k for k in point if other.point.get(k) != point[k]] or list(point)
    raise ConfigError(f"--sweep {', '.join(keys)}: the points {point_label(other.point)} and "
                      f"{point_label(point)} train the same run of {run.entry}, since "
                      f"{'the key does' if len(keys) == 1 else 'these keys do'} not change what is "
                      "trained (sweep a key that changes results; logging, checkpoint and evaluation "
                      "settings do not)")
