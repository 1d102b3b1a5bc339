"""`amorlip compare` end to end: plan the runs, lock the --out folder, skip the runs finished earlier with the same
settings, train the others (one after another in this process, or `--jobs N` at once as children), then write the
tables and plots. torch is imported only once there is something to train."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from amorlip.compare.outputs import write_outputs
from amorlip.compare.plan import Plan, PlannedRun, compare_plan
from amorlip.compare.results import finished_metrics, run_record
from amorlip.config import ConfigError, parse_overrides
from amorlip.files import atomic_write_text
from amorlip.runlock import FolderLock, check_free
from amorlip.signals import Stopped

COMPARE_IN_USE_FIX = "wait for it to end, or stop it (Ctrl-C or kill -TERM PID saves its runs), or pass another --out"


def run_compare(args: argparse.Namespace, extra: list[str]) -> int:
    """The runs of the plan (skipping finished ones), then tables and plots. The --out folder is locked for the
    command's life and every run folder must be free (amorlip.runlock), so two compares never mix their runs;
    --tables-only trains nothing and locks nothing."""
    plan = compare_plan(args, parse_overrides(extra))  # bad input stops here, before torch is imported
    if getattr(args, "tables_only", False):
        return _tables_only(plan)
    with FolderLock(plan.out, "compare folder", COMPARE_IN_USE_FIX):
        for run in plan.runs:
            check_free(run.run_dir, f"the run folder of {run.label},", COMPARE_IN_USE_FIX)
        return _compare(plan)


def _tables_only(plan: Plan) -> int:
    """`--tables-only`: the tables and plots of the runs finished so far; the others are listed as not finished."""
    plan.out.mkdir(parents=True, exist_ok=True)
    finished = {run.name: m for run in plan.runs if (m := finished_metrics(run)) is not None}
    print(f"--tables-only: {len(finished)} of {len(plan.runs)} runs have finished; training none")
    records = []
    for run in plan.runs:
        metrics = finished.get(run.name)
        records.append(run_record(run, metrics, "skipped" if metrics is not None else "failed",
                                  "" if metrics is not None else "not finished yet"))
    _write(plan, records)
    return 0


def _compare(plan: Plan) -> int:
    """Skip, train, write; 1 when a run failed, 128 + the signal number when stopped."""
    from amorlip.jobs import JobsStopped

    plan.out.mkdir(parents=True, exist_ok=True)
    finished = {run.name: m for run in plan.runs if (m := finished_metrics(run)) is not None}
    todo = [run for run in plan.runs if run.name not in finished]
    _announce(plan, finished, todo)
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
    records = [_record(run, finished, failures) for run in plan.runs]
    _write(plan, records)
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        print(f"{len(failed)} of {len(records)} runs failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r['label']}: {r['error']}", file=sys.stderr)
        return 1
    return 0


def _announce(plan: Plan, finished: dict[str, Any], todo: list[PlannedRun]) -> None:
    """Say which runs are skipped (finished earlier), and how many train and resume."""
    from amorlip.checkpoint import latest_checkpoint

    if finished:
        print(f"skipping {len(finished)} of {len(plan.runs)} runs, finished earlier with the same settings:")
        for run in plan.runs:
            if run.name in finished:
                print(f"  {run.label}: {run.run_dir}")
    resuming = [run for run in todo if latest_checkpoint(run.run_dir) is not None]
    if todo:
        print(f"training {len(todo)} run(s)" + (f", {len(resuming)} resumed from their checkpoint" if resuming else "")
              + (f", {plan.jobs} at a time" if plan.jobs > 1 and len(todo) > 1 else ""), flush=True)


def _record(run: PlannedRun, finished: dict[str, Any], failures: dict[str, str]) -> dict[str, Any]:
    """A run's record after training: skipped (finished earlier), trained, or failed with its error line."""
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
    return run_record(run, metrics, status, error)


def _write(plan: Plan, records: list[dict[str, Any]]) -> None:
    """results.json of the runs' `records`, the tables and plots; shows the tables and lists the files."""
    first = plan.runs[0].cfg
    record = {"version": 2, "entries": plan.entries, "seeds": plan.seeds,
              "sweep": {s.key: s.values for s in plan.sweeps}, "budget": plan.budget, "reference": plan.reference,
              "base_length": "; ".join(dict.fromkeys(plan.base_lengths.values())), "model": first.model.name,
              "data": first.data.source, "runs": records}
    shown, written = write_outputs(record, plan.out)
    print("\n" + shown)
    print(f"wrote {', '.join(str(p) for p in written if p.suffix != '.png')} and "
          f"{sum(p.suffix == '.png' for p in written)} plots in {plan.out}")


# ----------------------------------------------------------------------------------------------------
# training the runs


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors a run reports with a message that names the fix (the others are bugs: their traceback shows)."""
    from amorlip.data.types import DataError
    from amorlip.errors import CheckpointError

    return (ConfigError, DataError, CheckpointError, FloatingPointError, FileNotFoundError)


def _train_sequential(plan: Plan, todo: list[PlannedRun]) -> dict[str, str]:
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


def _train_parallel(plan: Plan, todo: list[PlannedRun]) -> dict[str, str]:
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
