#!/usr/bin/env python
"""Fault drill: inject the faults a real run meets and print what happened, as a markdown table.

    .venv/bin/python scripts/fault_drill.py [--out DIR] [--objectives clip,amorlip,...] [--seed N] [--quick]
                                            [--cases NAME,...]

Cases (micro-vit model, CPU, one thread; `--cases` names a subset, `--cases list` lists them). "Exact" means the
whole checkpoint equals an uninterrupted run's (weights, optimizer moments and step counts, objective state, RNG
states, data counters, step and config, less the run's name and folder) and so do the metrics.jsonl rows (less
samples_per_s):
* kill9: kill -9 at a random step, then `--train.resume latest`: exact (per objective)
* write-kill: kill -9 inside a checkpoint write (its temporary file there, not yet renamed), N tries: the hits are
  counted, each leaves the previous checkpoint as the latest and resumes exactly
* signals: SIGTERM and SIGUSR1: a checkpoint at the last logged step, exit 128+signal, the resume is exact
* torn-metrics: kill -9, half a JSON line appended to metrics.jsonl: the resume drops it and is exact
* lr-change: a resume with `--optim.lr X --train.resume-allow-changes optim.lr`: the rows before it are the
  uninterrupted run's, the lr after it that run's times X / lr, and config.yaml and the checkpoint hold X
* corrupt-ckpt: the newest checkpoint with flipped bytes, or truncated: `--train.resume latest` falls back to the
  one before with one warning line and is exact; `--train.resume THAT_FILE` is refused with one line, exit 2
* stale: a resume with another lr and no say-so: refused, exit 2, one line, run folder untouched
* disk-full: a 30 MB tmpfs when run as root (else a file-size limit): one error line, exit 2, earlier checkpoint intact
* readonly: a read-only output folder (a read-only tmpfs when root, else chmod): exit 2, one line, nothing written
* concurrent: a second training into a run folder in use: exit 2, one line naming the first's pid; the first
  finishes with one metrics row per step
* val-data: one unreadable image in `--data.val-path`: exit 2 before training (no checkpoint, no metrics row)
* nan: divergence (lr 1e3, a checkpoint every step): exit 1, a checkpoint per logged step, none non-finite
* bad-csv, no-captions: all images corrupt / no caption in any shard: exit 2, every sample counted as skipped
* zero-shard: a good shard plus a zero-byte shard, 2 workers: exit 2 when the worker holding the empty shard is
  due its first batch, after exactly that many steps
* truncated-shard: the second of two shards cut to a third: exit 0, the lost samples and shard reads counted
  exactly (derived from the shard's readable members and the passes over the shards)
* ddp-signals: `amorlip launch`, 2 gloo workers: SIGUSR1 to every process (SLURM) -> 138, SIGTERM to the launcher
  (Kubernetes) -> 143; one checkpoint, at the last logged step; no traceback
* ddp-kill-worker: kill -9 one of 2 workers: the launcher exits 1 within a bounded time, the last checkpoint is
  whole, a 2-process resume finishes exactly
* ddp-world-size: a 2-process checkpoint resumed by 1 process: refused (exit 2, one line naming world_size);
  with `--train.resume-allow-changes world_size` it finishes
`--quick` (about a third of the time): kill9 for clip only, 2 tries inside a write, and of the 2-process cases only
ddp-signals (the others when named in `--cases`, then without the 2-process reference run).
Exit status 0 when every case came out as expected.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from drill_common import (BASE, LIMIT_S, LOGS, SHORT_NAMES, References, Table, comparable_rows, descendants,
                          error_line, file_size_limit, is_whole, last_logged, latest_step, launch_cmd, one_error_line,
                          readable_keys, run, run_cmd, run_differences, start, start_launch, step_files, temporaries,
                          tmpfs, verdict, wait_for_step, without_captions, worker_rank)
from amorlip import checkpoint as ckpt
from amorlip.history import metrics_path, parse_lines, read_history
from amorlip.resume import flatten


@dataclass
class Drill:
    out: Path
    refs: References
    t: Table
    rng: random.Random
    quick: bool
    objectives: list[str]


def base(objective: str = "clip") -> list[str]:
    return ["--objective", objective, *BASE]


def resume(d: Drill, name: str, *args: str):
    return run(d.out, *args, "--train.name", name, "--train.resume", "latest")


def exact(d: Drill, name: str, resumed, args: list[str], ignore: frozenset[str] = frozenset()) -> list[str]:
    """Where run `name`, resumed by `resumed`, differs from an uninterrupted run with `args` (run_differences)."""
    ref = d.refs.get(*args)
    if resumed.returncode or ref is None:
        return [f"resume exit {resumed.returncode}" if resumed.returncode else "the reference run failed"]
    return run_differences(d.out / name, ref, ignore)


# ----------------------------------------------------------------------------------------------------
# Interrupted runs continue exactly


def case_kill9(d: Drill) -> None:
    for objective in (["clip"] if d.quick else d.objectives):
        args, name = base(objective), f"{objective}-cut"
        at = d.rng.randrange(4, 22)
        proc = start(d.out, *args, "--train.name", name)
        reached = wait_for_step(d.out / name, at, proc)
        proc.kill()
        resumed_from = latest_step(d.out / name)
        r = resume(d, name, *args)
        diff = exact(d, name, r, args)
        d.t.add(f"kill -9 at step {at}, {objective}", "exit 0, exact",
                f"resumed from step {resumed_from}: exit {r.returncode}, {verdict(diff)}",
                reached and r.returncode == 0 and not diff)


def case_write_kill(d: Drill) -> None:
    """kill -9 after a checkpoint's temporary file appeared (polling every 0.5 ms), at delays spread over 0-100 ms
    (a micro-vit checkpoint takes about 100 ms to write here, fsync included); a hit: the temporary file is still
    there after the kill (the rename had not happened). The later kills may miss."""
    tries, hits, bad = (2 if d.quick else 4), 0, []
    delays = [0.1 * i / tries for i in range(tries)]
    for i, delay in enumerate(delays):
        name, target = f"wkill{i}", 3 * d.rng.randrange(2, 8)  # a checkpoint after the first: one to fall back on
        proc, folder = start(d.out, *base(), "--train.name", name), ckpt.checkpoint_dir(d.out / name)
        prefix = f".step_{target:08d}.pt."
        deadline = time.monotonic() + LIMIT_S
        while proc.alive() and time.monotonic() < deadline and not (
                folder.is_dir() and any(e.name.startswith(prefix) for e in os.scandir(folder))):
            time.sleep(0.0005)
        time.sleep(delay)
        proc.kill()
        if not any(p.name.startswith(prefix) for p in temporaries(d.out / name)):
            continue  # the write had finished: not inside it
        hits += 1
        before = latest_step(d.out / name)
        r = resume(d, name, *base())
        diff = exact(d, name, r, base())
        if before != target - 3 or r.returncode or diff or temporaries(d.out / name):
            bad.append(f"step {target}: latest {before}, resume exit {r.returncode}, {verdict(diff)}")
    d.t.add("kill -9 inside a checkpoint write",
            "each hit: previous checkpoint latest, temp removed, resume exact",
            f"inside the write in {hits} of {tries} tries (killed {', '.join(f'{x * 1000:.0f}' for x in delays)} ms "
            f"after the temp file appeared); " + ("; ".join(bad) or "every hit exact"),
            hits > 0 and not bad)


def case_signals(d: Drill) -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        name = f"sig-{sig.name}"
        proc = start(d.out, *base(), "--train.name", name)
        wait_for_step(d.out / name, 5, proc)
        proc.proc.send_signal(sig)
        rc, last, saved = proc.wait(), last_logged(d.out / name), latest_step(d.out / name)
        said = f"received {sig.name} at step {last}: checkpoint" in proc.text()
        r = resume(d, name, *base())
        diff = exact(d, name, r, base())
        ok = rc == 128 + sig and saved == last and said and "Traceback" not in proc.text() and not diff
        d.t.add(f"{sig.name} mid-run", f"exit {128 + sig}, checkpoint at the last logged step, resume exact",
                f"exit {rc}, saved step {saved} (last logged {last}), resume: {verdict(diff)}", ok)


def case_torn_metrics(d: Drill) -> None:
    name = "torn"
    proc = start(d.out, *base(), "--train.name", name)
    reached = wait_for_step(d.out / name, 7, proc)
    proc.kill()
    path = metrics_path(d.out / name)
    last = json.loads(path.read_text().splitlines()[-1])
    line = json.dumps({**last, "step": last["step"] + 1})
    with open(path, "a") as f:
        f.write(line[: len(line) // 2])  # a write cut short: no newline
    r = resume(d, name, *base())
    _, torn = parse_lines(path)
    diff = exact(d, name, r, base())
    dropped = "dropped a torn last line" in r.stdout
    d.t.add("torn metrics line after kill -9", "exit 0, torn line dropped (said so), exact",
            f"exit {r.returncode}, {'dropped' if dropped and torn is None else 'NOT dropped'}, {verdict(diff)}",
            reached and r.returncode == 0 and dropped and torn is None and not diff)


def case_lr_change(d: Drill) -> None:
    name, ref = "lr-change", d.refs.get(*base())
    first = run(d.out, *base(), "--train.name", name, "--train.stop_at", "9")
    old = float(flatten(ckpt.load_checkpoint(ckpt.latest_checkpoint(ref))["config"])["optim.lr"])
    new = old / 4
    r = resume(d, name, *base(), "--optim.lr", repr(new), "--train.resume-allow-changes", "optim.lr")
    rows, ref_rows = comparable_rows(d.out / name), {row["step"]: row for row in comparable_rows(ref)}
    before = [row for row in rows if row["step"] <= 9]
    after = [row for row in rows if row["step"] > 9]
    same_before = all(row == ref_rows[row["step"]] for row in before) and len(before) == 9
    ratios = {round(row[k] / ref_rows[row["step"]][k], 12) for row in after for k in ("lr", "lr_temperature")}
    stored = flatten(ckpt.load_checkpoint(ckpt.latest_checkpoint(d.out / name))["config"])["optim.lr"]
    in_yaml = f"lr: {new}" in (d.out / name / "config.yaml").read_text()
    ok = (first.returncode == 0 and r.returncode == 0 and same_before and len(after) == 15
          and ratios == {round(new / old, 12)} and stored == new and in_yaml)
    d.t.add(f"resume with --optim.lr {new:g} (was {old:g}) accepted", "exit 0, lr after the resume x0.25, X stored",
            f"exit {r.returncode}, {len(before)} rows as before, lr ratios after {sorted(ratios)}, "
            f"stored lr {stored} (config.yaml {'has' if in_yaml else 'LACKS'} it)", ok)


def case_corrupt_checkpoint(d: Drill) -> None:
    keep = ["--train.keep-checkpoints", "3"]
    made = run(d.out, *base(), *keep, "--train.name", "damaged", "--train.stop_at", "12")
    for how in ("flip", "truncate"):
        name = f"damaged-{how}"
        shutil.copytree(d.out / "damaged", d.out / name)
        newest = step_files(d.out / name)[-1]
        data, mid = bytearray(newest.read_bytes()), newest.stat().st_size // 2
        if how == "flip":  # in the middle of the weights: a CRC-32 mismatch
            data[mid: mid + 16] = bytes(b ^ 0xFF for b in data[mid: mid + 16])
        else:
            del data[mid:]
        newest.write_bytes(bytes(data))
        named = run(d.out, *base(), *keep, "--train.name", name, "--train.resume", str(newest))
        r = resume(d, name, *base(), *keep)
        warnings = [line for line in r.stdout.splitlines() if line.startswith("warning:") and "trying the one before"]
        diff = exact(d, name, r, base(), frozenset({"train.stop_at", "train.keep_checkpoints"}))
        ok = (made.returncode == 0 and named.returncode == 2 and one_error_line(named) and newest.name in named.stderr
              and len(warnings) == 1 and "at step 9" in r.stdout and r.returncode == 0 and not diff)
        d.t.add(f"newest checkpoint {'with 16 bytes flipped' if how == 'flip' else 'truncated to half'}",
                "PATH: exit 2, one line; latest: one warning, from step 9, exact",
                f"PATH: exit {named.returncode}, {error_line(named, 70, around='is ')}; latest: {len(warnings)} "
                f"warning, exit {r.returncode}, {verdict(diff)}", ok)


# ----------------------------------------------------------------------------------------------------
# Refused before any work: one error line


def case_stale(d: Drill) -> None:
    assert run(d.out, "--train.steps", "3", "--train.name", "stale").returncode == 0
    before = {p.name: p.read_bytes() for p in (d.out / "stale").rglob("*") if p.is_file()}
    r = run(d.out, "--train.steps", "3", "--train.name", "stale", "--optim.lr", "0.01", "--train.resume", "latest")
    after = {p.name: p.read_bytes() for p in (d.out / "stale").rglob("*") if p.is_file()}
    ok = r.returncode == 2 and one_error_line(r) and "optim.lr" in r.stderr and after == before
    d.t.add("resume with another lr", "exit 2, one line, folder untouched",
            f"exit {r.returncode}, folder {'untouched' if after == before else 'CHANGED'}: "
            f"{error_line(r, 90, around='other settings')}", ok)


def case_disk_full(d: Drill) -> None:
    with tmpfs("30m") as mount:
        # no tmpfs: a file size limit fails the write the same way (EFBIG instead of ENOSPC)
        kw = {} if mount else {"preexec_fn": file_size_limit(25 * 2**20)}
        # each micro-vit checkpoint is ~19 MB: the first fits in 30 MB, the second does not
        where = mount or d.out
        r = run(where, "--train.steps", "6", "--train.checkpoint-every", "2", "--train.keep-checkpoints", "5",
                "--train.name", "full", **kw)
        step, temps = latest_step(where / "full"), temporaries(where / "full")
        ok = r.returncode == 2 and one_error_line(r) and "free disk space" in r.stderr and step == 2 and not temps
        d.t.add(f"disk full ({'30 MB tmpfs' if mount else '25 MB file size limit'})",
                "exit 2, one line, checkpoint of step 2 intact, no temp file",
                f"exit {r.returncode}, latest step {step}, {len(temps)} temp files: {error_line(r, 80)}", ok)


def case_readonly(d: Drill) -> None:
    with tmpfs("1m", read_only=True) as mount:
        where = mount
        if where is None:
            if os.geteuid() == 0:
                d.t.add("read-only output folder", "exit 2, one line", "not run: cannot mount a tmpfs", True)
                return
            where = Path(tempfile.mkdtemp(dir=d.out))
            where.chmod(0o555)
        r = run(where, "--train.steps", "3", "--train.name", "ro")
        written = sorted(p.name for p in where.rglob("*"))
        ok = r.returncode == 2 and one_error_line(r) and "writable" in r.stderr and not written
        d.t.add(f"read-only output folder ({'read-only tmpfs' if mount else 'chmod 555'})",
                "exit 2, one line, nothing written",
                f"exit {r.returncode}, {len(written)} files written: {error_line(r, 80)}", ok)


def case_concurrent(d: Drill) -> None:
    args = ["--train.steps", "60", "--train.checkpoint-every", "3", "--train.name", "busy"]
    first = start(d.out, *args)
    wait_for_step(d.out / "busy", 2, first)
    second = run(d.out, *args)
    overlapped = first.alive()
    rc = first.wait()
    steps = [row["step"] for row in read_history(d.out / "busy")]
    ok = (second.returncode == 2 and one_error_line(second) and f"pid {first.pid}" in second.stderr and overlapped
          and rc == 0 and steps == list(range(1, 61)))
    d.t.add("second training into a run folder in use", "exit 2, one line naming the pid; first: 60 rows, once each",
            f"second: exit {second.returncode}: {error_line(second, 70)}; first: exit {rc}, {len(steps)} rows "
            f"({len(set(steps))} distinct)", ok)


def case_val_data(d: Drill) -> None:
    from amorlip.data.writers import write_synthetic_csv

    csv_path = write_synthetic_csv(d.out / "val", 32, 0)
    bad = sorted((d.out / "val").rglob("*.png"))[5]
    bad.write_bytes(b"not an image")
    r = run(d.out, "--train.steps", "4", "--train.name", "val", "--data.val-path", str(csv_path),
            "--eval.retrieval", "true")
    rows, ckpts = read_history(d.out / "val"), step_files(d.out / "val")
    ok = r.returncode == 2 and one_error_line(r) and bad.name in r.stderr and not rows and not ckpts
    d.t.add("one unreadable image in --data.val-path", "exit 2, one line naming it, 0 checkpoints, 0 rows",
            f"exit {r.returncode}, {len(ckpts)} checkpoints, {len(rows)} rows: {error_line(r, 80)}", ok)


def case_nan(d: Drill) -> None:
    r = run(d.out, "--train.steps", "40", "--optim.lr", "1e3", "--train.checkpoint-every", "1",
            "--train.keep-checkpoints", "100", "--train.name", "nan")
    files, rows = step_files(d.out / "nan"), read_history(d.out / "nan")
    states = (ckpt.load_checkpoint(f) for f in files)
    bad = sum(bool(ckpt.non_finite_tensors({k: s[k] for k in ("model", "optimizer", "objective")})) for s in states)
    # a checkpoint after every step that was logged (finite), none after the step that was not
    ok = r.returncode == 1 and bad == 0 and one_error_line(r) and len(files) == len(rows) > 0
    d.t.add("divergence (lr 1e3)", "exit 1, one line, a checkpoint per logged step, 0 non-finite",
            f"exit {r.returncode}, {len(rows)} steps logged, {len(files)} checkpoints, {bad} non-finite: "
            f"{error_line(r, 60)}", ok)


# ----------------------------------------------------------------------------------------------------
# Bad data: exact outcomes, derived from how the data was built


def case_bad_csv(d: Drill) -> None:
    from amorlip.data.writers import write_synthetic_csv

    n = 64
    csv_path = write_synthetic_csv(d.out / "csv", n, 0)
    for png in (d.out / "csv").rglob("*.png"):
        png.write_bytes(b"not an image")
    r = run(d.out, "--data.source", "csv", "--data.train-path", str(csv_path), "--train.steps", "20",
            "--train.name", "badcsv")
    # one epoch (64 samples) is read before the skip fraction is checked: every one of them was corrupt
    want = [f"{n} of the {n} samples read (100%) are unusable", f"skipped {n} of {n} samples ({n} corrupt)"]
    # the first batch (16 of them) was unusable: one warning first
    ok = (r.returncode == 2 and one_error_line(r, warnings=1) and all(w in r.stderr for w in want)
          and not read_history(d.out / "badcsv"))
    d.t.add(f"all {n} CSV images corrupt", f"exit 2, 1 warning + one line: {want[0]}, 0 rows",
            f"exit {r.returncode}: {error_line(r, 100)}", ok)


def case_no_captions(d: Drill) -> None:
    from amorlip.data.writers import write_synthetic_wds

    n = 64
    without_captions(write_synthetic_wds(d.out / "nocap", n, 0, 32))
    r = run(d.out, "--data.source", "wds", "--data.train-path", str(d.out / "nocap"), "--train.steps", "20",
            "--train.name", "nocap")
    want = [f"{n} of the {n} samples read (100%) are unusable", f"skipped {n} of {n} samples ({n} without caption)"]
    ok = (r.returncode == 2 and one_error_line(r, warnings=1) and all(w in r.stderr for w in want)
          and not read_history(d.out / "nocap"))
    d.t.add(f"{n} samples in 2 shards, no captions", f"exit 2, 1 warning + one line: {want[0]}, 0 rows",
            f"exit {r.returncode}: {error_line(r, 100)}", ok)


def case_zero_shard(d: Drill) -> None:
    """One good shard of 64 and a zero-byte shard (sizes.json: 0), 2 loader workers. The epoch's shuffled shard list
    gives each worker one shard; batch j comes from worker j mod 2, so the run trains exactly w steps (w: the worker
    holding the empty shard) and then stops with that worker's error."""
    from amorlip.data.samples import mix_seed
    from amorlip.data.wds import _TAG_SHARDS
    from amorlip.data.writers import write_synthetic_wds

    write_synthetic_wds(d.out / "zero", 64, 0, 64)
    empty = d.out / "zero" / "zz-empty.tar"
    empty.write_bytes(b"")
    sizes = json.loads((d.out / "zero" / "sizes.json").read_text())
    (d.out / "zero" / "sizes.json").write_text(json.dumps({**sizes, empty.name: 0}))
    urls = sorted(str(p) for p in (d.out / "zero").glob("*.tar"))
    random.Random(mix_seed(0, 0, _TAG_SHARDS)).shuffle(urls)  # the split of epoch 0 (seed 0)
    w = urls.index(str(empty))
    r = run(d.out, "--data.source", "wds", "--data.train-path", str(d.out / "zero"), "--data.workers", "2",
            "--train.steps", "20", "--train.name", "zero")
    rows = read_history(d.out / "zero")
    want = [f"worker {w} of 2: its shards ({empty})", f"{16 * w} samples read; 1 unreadable shard"]
    ok = r.returncode == 2 and one_error_line(r) and all(x in r.stderr for x in want) and len(rows) == w
    d.t.add("good shard + zero-byte shard, 2 workers",
            f"exit 2 after {w} steps, one line: worker {w}, 1 unreadable shard",
            f"exit {r.returncode} after {len(rows)} steps: {error_line(r, 100)}", ok)


def case_truncated_shard(d: Drill) -> None:
    """Two shards of 64, the second cut to a third; one reader, 12 steps of 16 (an epoch is 8). Each pass over the
    shards yields 64 + k samples (k: the cut shard's samples before the cut, a last one possibly incomplete) and
    reads the cut shard once; epoch e needs ceil(16 * steps_e / (64 + k)) passes."""
    import math

    from amorlip.data.writers import write_synthetic_wds

    shards = write_synthetic_wds(d.out / "trunc", 128, 0, 64)
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 3])
    keys = readable_keys(shards[-1])
    k, no_caption = len(keys), sum("txt" not in e for e in keys.values())
    corrupt = sum("txt" in e and not e & {"jpg", "png"} for e in keys.values())
    reads = sum(math.ceil(16 * steps / (64 + k)) for steps in (8, 4))
    want = {"unreadable_shards": 1, "skipped_unreadable": 64 - k, "skipped_no_caption": no_caption,
            "skipped_corrupt": corrupt, "shard_errors": reads, "unreadable_visits": reads * (64 - k), "seen": 12 * 16}
    r = run(d.out, "--data.source", "wds", "--data.train-path", str(d.out / "trunc"), "--train.steps", "12",
            "--train.name", "trunc")
    summary = d.out / "trunc" / "summary.json"
    got = json.loads(summary.read_text())["data_skipped"] if summary.exists() else {}
    wrong = {key: got.get(key, 0) for key, value in want.items() if got.get(key, 0) != value}
    d.t.add(f"truncated shard ({k} of 64 samples before the cut)",
            "exit 0, " + ", ".join(f"{key} {value}" for key, value in want.items()),
            f"exit {r.returncode}" + (f", WRONG: {wrong}" if wrong else ", every count as expected") +
            (f": {error_line(r, 80)}" if r.returncode else ""),
            r.returncode == 0 and not wrong and "Traceback" not in r.stderr)


# ----------------------------------------------------------------------------------------------------
# torchrun: `amorlip launch` with 2 gloo CPU workers


def case_ddp_signals(d: Drill) -> None:
    for sig, target in ((signal.SIGUSR1, "every process (SLURM)"), (signal.SIGTERM, "the launcher (Kubernetes)")):
        name = f"ddp-{sig.name}"
        proc = start_launch(d.out, 2, "--train.steps", "60", "--train.name", name)
        wait_for_step(d.out / name, 3, proc)
        for pid in [proc.pid] + (descendants(proc.pid) if sig == signal.SIGUSR1 else []):
            os.kill(pid, sig)
        rc, text = proc.wait(), proc.text()
        files, last = step_files(d.out / name), last_logged(d.out / name)
        steps = [int(ckpt.load_checkpoint(f)["step"]) for f in files]
        ok = (rc == 128 + sig and steps == [last] and "Traceback" not in text
              and f"received {sig.name} at step {last}: checkpoint" in text)
        d.t.add(f"2 workers, {sig.name} to {target}", f"exit {128 + sig}, 1 checkpoint at the last logged step, "
                "no traceback", f"exit {rc}, checkpoints at steps {steps} (last logged {last}), "
                f"{'a TRACEBACK' if 'Traceback' in text else 'no traceback'}", ok)


def case_ddp_kill_worker(d: Drill, bound_s: float = 120.0) -> None:
    """kill -9 of rank 1: torchrun sees the worker die, stops the other one and exits 1 (its status for a failed
    worker); within `bound_s`, not the gloo timeout (30 minutes)."""
    args, name = ["--train.steps", "12", "--train.checkpoint-every", "3"], "ddp-kill"
    proc = start_launch(d.out, 2, *args, "--train.name", name)
    reached = wait_for_step(d.out / name, 7, proc)
    worker = next((pid for pid in descendants(proc.pid) if worker_rank(pid) == 1), None)
    t0 = time.monotonic()
    if worker is not None:
        os.kill(worker, signal.SIGKILL)
    rc, took = proc.wait(limit_s=bound_s), time.monotonic() - t0
    whole = is_whole(ckpt.latest_checkpoint(d.out / name))
    step = latest_step(d.out / name) if whole else None
    r = run_cmd(launch_cmd(d.out, 2, *args, "--train.name", name, "--train.resume", "latest"))
    diff = []
    if not d.quick:  # against an uninterrupted 2-process run
        ref = run_cmd(launch_cmd(d.out, 2, *args, "--train.name", "ddp-straight"))
        diff = (run_differences(d.out / name, d.out / "ddp-straight") if r.returncode == 0 == ref.returncode
                else ["a run failed"])
    ok = (reached and worker is not None and rc == 1 and took < bound_s and whole and step and step % 3 == 0
          and r.returncode == 0 and last_logged(d.out / name) == 12 and not diff)
    d.t.add("2 workers, kill -9 of one", f"launcher exit 1 within {bound_s:.0f} s, latest whole, resume exit 0"
            + ("" if d.quick else ", exact"), f"exit {rc} after {took:.0f} s, latest step {step} "
            f"{'whole' if whole else 'DAMAGED'}, resume exit {r.returncode}"
            + ("" if d.quick else f", {verdict(diff)}"), ok)


def case_ddp_world_size(d: Drill) -> None:
    args, name = ["--train.steps", "12", "--train.device", "cpu"], "ddp-ws"
    made = run_cmd(launch_cmd(d.out, 2, *args[:2], "--train.name", name, "--train.stop_at", "3"))
    refused = resume(d, name, *args)
    accepted = resume(d, name, *args, "--train.resume-allow-changes", "world_size")
    steps = [row["step"] for row in read_history(d.out / name)]
    ok = (made.returncode == 0 and refused.returncode == 2 and one_error_line(refused)
          and "world_size 2 -> 1" in refused.stderr and accepted.returncode == 0 and steps == list(range(1, 13)))
    d.t.add("2-process checkpoint resumed by 1 process", "exit 2, one line naming world_size; "
            "allowed: exit 0, 12 rows", f"exit {refused.returncode}: {error_line(refused, 70, around='world_size')}; "
            f"allowed: exit {accepted.returncode}, {len(steps)} rows", ok)


# ----------------------------------------------------------------------------------------------------

CASES = {
    "kill9": case_kill9, "write-kill": case_write_kill, "signals": case_signals, "torn-metrics": case_torn_metrics,
    "lr-change": case_lr_change, "corrupt-ckpt": case_corrupt_checkpoint, "stale": case_stale,
    "disk-full": case_disk_full, "readonly": case_readonly, "concurrent": case_concurrent, "val-data": case_val_data,
    "nan": case_nan, "bad-csv": case_bad_csv, "no-captions": case_no_captions, "zero-shard": case_zero_shard,
    "truncated-shard": case_truncated_shard, "ddp-signals": case_ddp_signals, "ddp-kill-worker": case_ddp_kill_worker,
    "ddp-world-size": case_ddp_world_size,
}
QUICK_LEAVES_OUT = ("ddp-kill-worker", "ddp-world-size")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument("--objectives", default="clip,siglip,sogclr,fastclip,amorlip,neuclip")
    ap.add_argument("--seed", type=int, default=0, help="picks the random kill steps")
    ap.add_argument("--quick", action="store_true", help="kill9 for clip only, 2 tries inside a write, "
                    f"no {' or '.join(QUICK_LEAVES_OUT)} (unless named in --cases)")
    ap.add_argument("--cases", default=None, help="a comma-separated subset ('list' prints the names)")
    args = ap.parse_args()
    if args.cases is None:
        names = [n for n in CASES if not (args.quick and n in QUICK_LEAVES_OUT)]
    else:
        names = [c.strip() for c in args.cases.split(",") if c.strip()]
    if names == ["list"] or any(n not in CASES for n in names):
        unknown = [n for n in names if n not in CASES and n != "list"]
        print((f"unknown case(s) {', '.join(unknown)}; " if unknown else "") + "cases: " + ", ".join(CASES))
        return 2 if unknown else 0
    out = Path(args.out or tempfile.mkdtemp(prefix="amorlip-drill-"))
    out.mkdir(parents=True, exist_ok=True)
    LOGS[:] = [out / "logs"]  # every run's command line and output
    SHORT_NAMES[str(out)] = "OUT"
    d = Drill(out=out, refs=References(out), t=Table(), rng=random.Random(args.seed), quick=args.quick,
              objectives=args.objectives.split(","))
    t0 = time.monotonic()
    for name in names:
        try:
            CASES[name](d)
        except Exception as e:  # noqa: BLE001 - a broken case is a failed row, the others still run
            d.t.add(name, "(the case runs)", f"CRASHED: {type(e).__name__}: {e}"[:200], False)
    rows = d.t.rows
    print(f"\n{d.t.markdown()}\n\n{sum(r[3] for r in rows)} of {len(rows)} cases as expected "
          f"({time.monotonic() - t0:.0f} s)")
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
