#!/usr/bin/env python
"""Fault drill: inject the faults a real run meets and print what happened, as a markdown table.

    .venv/bin/python scripts/fault_drill.py [--out DIR] [--objectives clip,amorlip,...] [--seed N] [--quick]

Cases (each on the micro-vit model, CPU, one thread):
* kill -9 at a random step, then `--train.resume latest`: final weights equal an uninterrupted run's (per objective)
* kill -9 while a checkpoint is being written: the previous checkpoint stays the latest and the resume is exact
* SIGTERM and SIGUSR1: a checkpoint is saved, exit 128+signal, the resume is exact
* disk full: a small tmpfs when run as root (else a file-size limit): one error line, exit 2, earlier checkpoints intact
* a resume with another lr: refused, exit 2, run folder untouched
* divergence (lr 1e3): exit 1, no checkpoint with non-finite tensors
* bad data: an all-corrupt CSV, webdataset shards without captions, a good shard plus a zero-byte shard with 2
  workers, a truncated shard: no hang (each has a time limit), a clear error or a finished run with its skips counted
Exit status 0 when every case came out as expected.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from amorlip import checkpoint as ckpt
from amorlip.history import read_history

MICRO = ["--model.name", "micro-vit", "--data.synthetic-size", "256", "--train.batch-size", "16",
         "--optim.warmup-steps", "2", "--train.threads", "1", "--eval.zeroshot", "false", "--eval.retrieval", "false",
         "--train.log-every", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LIMIT_S = 900  # per run; generous, a loaded machine is slow


def cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "amorlip.cli", "train", "--train.output-dir", str(out), *MICRO, *args]


def run(out: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd(out, *args), env=ENV, capture_output=True, text=True, timeout=LIMIT_S, **kw)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, returncode=-999, stdout="", stderr=f"HUNG (> {LIMIT_S} s)")


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("amorlip train: error:")]
    if "Traceback" in proc.stderr:
        return "TRACEBACK: " + proc.stderr.strip().splitlines()[-1][:100]
    return lines[0][len("amorlip train: error: "):][:110] if lines else proc.stderr.strip()[-110:]


def latest_step(run_dir: Path) -> int | None:
    path = ckpt.latest_checkpoint(run_dir)
    return int(ckpt.load_checkpoint(path)["step"]) if path else None


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = ckpt.load_checkpoint(ckpt.latest_checkpoint(a)), ckpt.load_checkpoint(ckpt.latest_checkpoint(b))
    return sa["step"] == sb["step"] and all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def popen(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(cmd(out, *args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < LIMIT_S and proc.poll() is None:
        rows = read_history(run_dir)  # a line being written is left out
        if rows and max(r["step"] for r in rows) >= step:
            return True
        time.sleep(0.01)
    return False


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, bool]] = []

    def add(self, case: str, expected: str, got: str, ok: bool) -> None:
        self.rows.append((case, expected, got, ok))
        print(f"[{'ok' if ok else 'FAIL'}] {case}: {got}", flush=True)

    def markdown(self) -> str:
        lines = ["| case | expected | got | ok |", "|---|---|---|---|"]
        lines += [f"| {c} | {e} | {g.replace('|', '/')} | {'yes' if ok else 'NO'} |" for c, e, g, ok in self.rows]
        return "\n".join(lines)


def drill_kill9(out: Path, objective: str, steps: int, rng: random.Random, t: Table) -> None:
    args = ["--objective", objective, "--train.steps", str(steps), "--train.checkpoint-every", "3"]
    at = rng.randrange(4, steps - 2)
    proc = popen(out, *args, "--train.name", f"{objective}-cut")
    reached = wait_for_step(out / f"{objective}-cut", at, proc)
    proc.kill()
    proc.wait()
    resumed_from = latest_step(out / f"{objective}-cut")
    r1 = run(out, *args, "--train.name", f"{objective}-cut", "--train.resume", "latest")
    r2 = run(out, *args, "--train.name", f"{objective}-straight")
    ok = reached and r1.returncode == 0 and r2.returncode == 0 and same_weights(out / f"{objective}-cut",
                                                                               out / f"{objective}-straight")
    verdict = "identical" if ok else (f"FAILED (resume exit {r1.returncode}, reference exit {r2.returncode}: "
                                      f"{error_line(r1 if r1.returncode else r2)[:60]})"
                                      if r1.returncode or r2.returncode else "DIFFERENT")
    t.add(f"kill -9 at step {at}, {objective}", "resume bit-identical", f"resumed from step {resumed_from}: {verdict}", ok)


def drill_kill_during_write(out: Path, t: Table, tries: int = 5) -> None:
    """Kill -9 the moment a checkpoint's temporary file appears (polling; a few tries to hit the window)."""
    for i in range(tries):
        name = f"wkill{i}"
        ckdir = out / name / "checkpoints"
        proc = popen(out, "--train.steps", "60", "--train.checkpoint-every", "2", "--train.name", name)
        hit = False
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < LIMIT_S:
            if ckdir.is_dir() and any(p.name.endswith(".tmp") for p in ckdir.iterdir()) and latest_step(out / name):
                proc.kill()
                hit = True
                break
            time.sleep(0.0005)
        proc.kill()
        proc.wait()
        if not hit:
            continue
        left = [p.name for p in ckdir.iterdir() if p.name.endswith(".tmp")]
        before = latest_step(out / name)
        r = run(out, "--train.steps", "60", "--train.checkpoint-every", "2", "--train.name", name, "--train.resume", "latest")
        r2 = run(out, "--train.steps", "60", "--train.checkpoint-every", "2", "--train.name", "wstraight")
        cleaned = not any(p.name.endswith(".tmp") for p in ckdir.iterdir())
        ok = r.returncode == 0 and cleaned and same_weights(out / name, out / "wstraight")
        t.add("kill -9 during a checkpoint write", "latest intact, temp removed, resume exact",
              f"{len(left)} temp file(s) left, latest step {before} loaded, resumed "
              f"{'identical' if ok else 'DIFFERENT or failed'}, temp {'removed' if cleaned else 'LEFT'}", ok)
        return
    t.add("kill -9 during a checkpoint write", "latest intact", f"window not hit in {tries} tries", True)


def drill_signal(out: Path, sig: signal.Signals, t: Table) -> None:
    name = f"sig-{sig.name}"
    args = ["--train.steps", "60"]
    proc = popen(out, *args, "--train.name", name)
    wait_for_step(out / name, 5, proc)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        err = "HUNG"
    saved = latest_step(out / name)
    r1 = run(out, *args, "--train.name", name, "--train.resume", "latest")
    r2 = run(out, *args, "--train.name", f"{name}-straight")
    ok = proc.returncode == 128 + sig and saved is not None and r1.returncode == 0 and same_weights(
        out / name, out / f"{name}-straight")
    t.add(f"{sig.name} mid-run", f"checkpoint, exit {128 + sig}, resume exact",
          f"exit {proc.returncode}, saved step {saved}, resume {'identical' if ok else 'DIFFERENT or failed'}", ok)


def drill_disk_full(out: Path, t: Table) -> None:
    mount = Path(tempfile.mkdtemp(prefix="amorlip-tmpfs-"))
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mount)],
                                                   capture_output=True).returncode == 0
    kw = {}
    if not mounted:  # a file size limit fails the write the same way (EFBIG instead of ENOSPC)
        import resource

        def limit() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (25 * 2**20, 25 * 2**20))

        kw["preexec_fn"] = limit
    try:
        # each micro-vit checkpoint is ~19 MB: the first fits in 30 MB, the second does not
        r = run(mount if mounted else out, "--train.steps", "6", "--train.checkpoint-every", "2",
                "--train.keep-checkpoints", "5", "--train.name", "full", **kw)
        run_dir = (mount if mounted else out) / "full"
        step = latest_step(run_dir)
        temps = [p for p in ckpt.checkpoint_dir(run_dir).glob(".*.tmp")]
        ok = r.returncode == 2 and "free disk space" in r.stderr and step == 2 and not temps and "Traceback" not in r.stderr
        t.add(f"disk full ({'30 MB tmpfs' if mounted else '25 MB file size limit'})",
              "one error line, exit 2, earlier checkpoint intact",
              f"exit {r.returncode}, latest step {step}, {len(temps)} temp files: {error_line(r)[:80]}", ok)
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], capture_output=True)
        shutil.rmtree(mount, ignore_errors=True)


def drill_stale(out: Path, t: Table) -> None:
    assert run(out, "--train.steps", "3", "--train.name", "stale").returncode == 0
    before = (out / "stale" / "config.yaml").read_text()
    r = run(out, "--train.steps", "3", "--train.name", "stale", "--optim.lr", "0.01", "--train.resume", "latest")
    ok = r.returncode == 2 and "optim.lr" in r.stderr and (out / "stale" / "config.yaml").read_text() == before
    t.add("resume with another lr", "refused, exit 2, folder untouched", f"exit {r.returncode}: {error_line(r)[:90]}", ok)


def drill_nan(out: Path, t: Table) -> None:
    r = run(out, "--train.steps", "40", "--optim.lr", "1e3", "--train.checkpoint-every", "1",
            "--train.keep-checkpoints", "100", "--train.name", "nan")
    files = sorted((out / "nan" / "checkpoints").glob("step_*.pt"))
    bad = sum(bool(ckpt.non_finite_tensors({k: ckpt.load_checkpoint(f)[k] for k in ("model", "optimizer", "objective")}))
              for f in files)
    ok = r.returncode == 1 and bad == 0
    t.add("divergence (lr 1e3)", "exit 1, no non-finite checkpoint",
          f"exit {r.returncode}, {len(files)} checkpoints, {bad} non-finite: {error_line(r)[:70]}", ok)


def drill_data(out: Path, t: Table) -> None:
    from amorlip.data.writers import write_synthetic_csv, write_synthetic_wds

    csv_path = write_synthetic_csv(out / "csv", 64, 0)
    for png in (out / "csv").rglob("*.png"):
        png.write_bytes(b"not an image")
    r = run(out, "--data.source", "csv", "--data.train-path", str(csv_path), "--train.steps", "20", "--train.name", "badcsv")
    t.add("all-corrupt CSV", "error naming files, exit 2, no hang", f"exit {r.returncode}: {error_line(r)[:90]}",
          r.returncode == 2 and "Traceback" not in r.stderr)

    shards = write_synthetic_wds(out / "nocap", 64, 0, 32)
    import tarfile

    for shard in shards:  # rewrite without the .txt members
        members = []
        with tarfile.open(shard) as tf:
            members = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if not m.name.endswith(".txt")]
        with tarfile.open(shard, "w") as tf:
            for m, data in members:
                import io

                tf.addfile(m, io.BytesIO(data))
    r = run(out, "--data.source", "wds", "--data.train-path", str(out / "nocap"), "--train.steps", "20",
            "--train.name", "nocap")
    t.add("shards without captions", "error, exit 2, no hang", f"exit {r.returncode}: {error_line(r)[:90]}",
          r.returncode == 2 and "Traceback" not in r.stderr)

    good = write_synthetic_wds(out / "zero", 64, 0, 64)
    (out / "zero" / "zz-empty.tar").write_bytes(b"")
    sizes = json.loads((out / "zero" / "sizes.json").read_text()) if (out / "zero" / "sizes.json").exists() else {}
    sizes["zz-empty.tar"] = 0
    (out / "zero" / "sizes.json").write_text(json.dumps(sizes))
    r = run(out, "--data.source", "wds", "--data.train-path", str(out / "zero"), "--data.workers", "2",
            "--train.steps", "20", "--train.name", "zero")
    t.add(f"good shard + zero-byte shard, 2 workers ({len(good)} good)", "finishes or clear error, no hang",
          f"exit {r.returncode}: {error_line(r)[:90] if r.returncode else 'finished'}",
          r.returncode in (0, 2) and "Traceback" not in r.stderr)

    shards = write_synthetic_wds(out / "trunc", 128, 0, 64)
    data = Path(shards[-1]).read_bytes()
    Path(shards[-1]).write_bytes(data[: len(data) // 3])
    r = run(out, "--data.source", "wds", "--data.train-path", str(out / "trunc"), "--train.steps", "12",
            "--train.name", "trunc")
    summary = out / "trunc" / "summary.json"
    skipped = json.loads(summary.read_text()).get("data_skipped") if summary.exists() else None
    t.add("truncated shard", "no hang; skips counted (or clear error)",
          f"exit {r.returncode}: {skipped if r.returncode == 0 else error_line(r)[:90]}",
          r.returncode in (0, 2) and "Traceback" not in r.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument("--objectives", default="clip,siglip,sogclr,fastclip,amorlip,neuclip")
    ap.add_argument("--seed", type=int, default=0, help="picks the random kill steps")
    ap.add_argument("--quick", action="store_true", help="kill -9 drill for clip only")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="amorlip-drill-"))
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    t = Table()
    t0 = time.monotonic()
    for objective in (["clip"] if args.quick else args.objectives.split(",")):
        drill_kill9(out, objective, 24, rng, t)
    drill_kill_during_write(out, t)
    drill_signal(out, signal.SIGTERM, t)
    drill_signal(out, signal.SIGUSR1, t)
    drill_disk_full(out, t)
    drill_stale(out, t)
    drill_nan(out, t)
    drill_data(out, t)
    print(f"\n{t.markdown()}\n\n{sum(r[3] for r in t.rows)} of {len(t.rows)} cases as expected "
          f"({time.monotonic() - t0:.0f} s)")
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return 0 if all(r[3] for r in t.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
