"""Faults a user causes or meets while training, each injected for real: divergence, a changed setting on resume,
pre-emption (SIGTERM / SIGUSR1, also under torchrun), a full disk, a kill during a checkpoint write, an old
log in the run folder, file modes, progress on a non-TTY. Every subprocess has a timeout, so a regression fails
instead of hanging."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amorlip import checkpoint as ckpt
from state_utils import assert_same_state
from faults_common import ENV, TIMEOUT, TINY, limit_file_size, one_error_line, run, train_cmd, wait_for_step

def state_of(path: Path) -> dict:
    return ckpt.load_checkpoint(path)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


# --- 2: a diverged run never saves non-finite weights, and names a finite checkpoint --------------------------


@pytest.mark.slow
def test_divergence_never_saves_non_finite_weights(tmp_path):
    proc = run(tmp_path, "--train.steps", "40", "--optim.lr", "1e3", "--train.checkpoint-every", "1",
               "--train.keep-checkpoints", "100", "--train.name", "nan")
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = one_error_line(proc)
    assert "lower --optim.lr" in line
    files = sorted((tmp_path / "nan" / "checkpoints").glob("step_*.pt"))
    # it diverges after a few finite steps (seeded), each of which left a checkpoint (checkpoint_every 1): the
    # checkpoints are steps 1..n, n >= 2, and the error names the step taken from step n (the state step_n holds)
    steps = [int(f.stem.split("_")[1]) for f in files]
    assert len(steps) >= 2 and steps == list(range(1, len(steps) + 1)), steps
    assert f"loss is nan at step {len(steps)};" in line, line
    for f in files:  # every checkpoint written is finite
        assert not ckpt.non_finite_tensors({k: state_of(f)[k] for k in ("model", "optimizer", "objective")}), f
    # the newest checkpoint (saved just before the failing step) is finite but its next step was not: the message
    # names the one before it, whose next step was finite (tests/test_faults_checkpoint.py resumes it)
    assert str(files[-2]) in line, "the message names the newest checkpoint whose next step was finite"


def test_non_finite_state_is_found():
    good = {"model": {"w": torch.ones(3)}, "optimizer": {"state": {0: {"exp_avg": torch.zeros(2), "step": 3}}}}
    assert ckpt.non_finite_tensors(good) == []
    bad = {"model": {"w": torch.tensor([1.0, float("nan")])},
           "optimizer": {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}, "objective": [torch.ones(1)]}
    assert ckpt.non_finite_tensors(bad) == ["model.w", "optimizer.state.0.exp_avg"]


# --- 3: a resume never silently mixes settings ------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = run(out, "--train.steps", "4", "--train.name", "base", "--train.checkpoint-every", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(finished_run, tmp_path):
    run_dir = finished_run / "base"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    proc = run(finished_run, "--train.steps", "4", "--train.name", "base", "--train.checkpoint-every", "2",
               "--optim.lr", "0.01", "--train.batch-size", "32", "--train.resume", "latest")
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "optim.lr 0.001 -> 0.01" in line and "train.batch_size 16 -> 32" in line
    assert "--train.resume-allow-changes optim.lr,train.batch_size" in line
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after == before, "a refused resume must not touch the run folder (config.yaml, metrics)"


@pytest.mark.slow
def test_resume_with_another_objective_is_a_clear_error(finished_run):
    proc = run(finished_run, "--train.steps", "4", "--train.name", "base", "--objective", "siglip",
               "--train.resume", "latest", "--train.resume-allow-changes", "all")
    assert proc.returncode == 2
    assert "another objective" in one_error_line(proc)


@pytest.mark.slow
def test_accepted_change_and_neutral_keys(tmp_path):
    assert run(tmp_path, "--train.steps", "4", "--train.name", "r").returncode == 0
    # neutral keys (logging, cadence, evaluation, threads) may always change
    proc = run(tmp_path, "--train.steps", "4", "--train.name", "r", "--train.resume", "latest", "--train.log-every", "3",
               "--train.checkpoint-every", "1", "--eval.batch-size", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run(tmp_path, "--train.steps", "6", "--train.name", "r", "--train.resume", "latest",
               "--train.resume-allow-changes", "train.steps")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train.steps 4 -> 6" in proc.stdout
    assert state_of(ckpt.latest_checkpoint(tmp_path / "r"))["step"] == 6


@pytest.mark.slow
def test_resume_with_another_process_count_is_refused(tmp_path):
    assert run(tmp_path, "--train.steps", "2", "--train.name", "w").returncode == 0
    path = ckpt.latest_checkpoint(tmp_path / "w")
    state = state_of(path)
    state["world_size"] = 2  # as a 2-process run writes it
    torch.save(state, path)
    proc = run(tmp_path, "--train.steps", "2", "--train.name", "w", "--train.resume", "latest")
    assert proc.returncode == 2 and "world_size 2 -> 1" in one_error_line(proc)
    proc = run(tmp_path, "--train.steps", "2", "--train.name", "w", "--train.resume", "latest",
               "--train.resume-allow-changes", "world_size")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_config_hash_ignores_neutral_keys():
    from amorlip.config import build_config
    from amorlip.resume import config_hash

    a = build_config(None, [("train.log_every", "3"), ("train.name", "x"), ("eval.batch_size", "8")]).to_dict()
    b = build_config(None, []).to_dict()
    c = build_config(None, [("optim.lr", "0.01")]).to_dict()
    assert config_hash(a) == config_hash(b) != config_hash(c)


# --- 4: pre-emption saves a checkpoint; the resumed run equals an uninterrupted one ------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1])  # SIGTERM: the process-group and torchrun tests below
def test_stop_signal_saves_and_resume_is_exact(tmp_path, sig):
    common = ["--train.steps", "80", "--train.log-every", "1"]
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(train_cmd(tmp_path, *common, "--train.name", "cut"), env=ENV, stdout=log,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(tmp_path / "cut", 3, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        log.close()
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"received {signal.Signals(sig).name}" in err and "--train.resume latest" in err
    saved = state_of(ckpt.latest_checkpoint(tmp_path / "cut"))
    assert 3 <= saved["step"] < 80
    assert run(tmp_path, *common, "--train.name", "cut", "--train.resume", "latest").returncode == 0
    assert run(tmp_path, *common, "--train.name", "straight").returncode == 0
    assert_same_weights(state_of(ckpt.latest_checkpoint(tmp_path / "cut")),
                        state_of(ckpt.latest_checkpoint(tmp_path / "straight")))


@pytest.mark.slow
def test_sigterm_under_torchrun_saves(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "amorlip.cli",
           "train", "--train.output-dir", str(tmp_path), *TINY, "--train.steps", "400", "--train.log-every", "1",
           "--train.name", "ddp", "--train.device", "cpu"]
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(tmp_path / "ddp", 3, proc)
        proc.send_signal(signal.SIGTERM)  # to the launcher, as a scheduler does; it forwards it to the workers
        proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()
        log.close()
    text = (tmp_path / "log.txt").read_text()
    assert "received SIGTERM" in text, text[-3000:]
    saved = state_of(ckpt.latest_checkpoint(tmp_path / "ddp"))
    assert saved["world_size"] == 2 and 3 <= saved["step"] < 400
    assert len(saved["rng"]) == 2


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers(tmp_path):
    """A scheduler signals every process of the job, data-loader workers included: they leave the signal to the
    main process, which still gets its batches, saves and exits 143."""
    proc = subprocess.Popen(train_cmd(tmp_path, "--train.steps", "200", "--train.log-every", "1", "--data.workers", "2",
                                      "--train.name", "g"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_step(tmp_path / "g", 3, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert 3 <= state_of(ckpt.latest_checkpoint(tmp_path / "g"))["step"] < 200


@pytest.mark.slow
def test_skipped_samples_are_reported_while_training(tmp_path):
    from amorlip.data.writers import write_synthetic_csv

    csv_path = write_synthetic_csv(tmp_path / "csv", 64, 0)
    sorted((tmp_path / "csv").rglob("*.png"))[3].write_bytes(b"garbage")
    proc = run(tmp_path, "--data.source", "csv", "--data.train-path", str(csv_path), "--train.steps", "8",
               "--train.log-every", "2", "--train.name", "s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("data: skipped")]
    assert lines and ".png" in lines[0], proc.stdout[-2000:]  # names the offending file
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["data_skipped"]["skipped_corrupt"] == 1  # one distinct sample, however often it was read
    assert summary["data_skipped"]["corrupt_visits"] >= 2  # 8 steps of 16 = 2 epochs of 64


@pytest.mark.slow
def test_two_process_resume_keeps_every_ranks_counts(tmp_path):
    """Two gloo processes, AmorLIP (its lambda nets and their optimizer in the state), CSV data with 4 corrupt
    images (a skipped sample shrinks one rank's batch: the ranks trim to a common size): 12 steps straight, and 5 + a resume to 12. Each rank restores its own counters, so the skip counts
    equal the uninterrupted run's; the weights, optimizer, objective and RNG states are the same bit for bit; the
    log holds each step once."""
    from amorlip.data.writers import write_synthetic_csv

    csv_path = write_synthetic_csv(tmp_path / "csv", 64, 0)
    for i in (1, 7, 30, 45):
        sorted((tmp_path / "csv").rglob("*.png"))[i].write_bytes(b"garbage")

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "amorlip.cli", "train", "--train.output-dir", str(tmp_path), *TINY, "--train.steps", "12",
               "--data.source", "csv", "--data.train-path", str(csv_path), "--train.device", "cpu", *args]
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun("--train.name", "straight")
    torchrun("--train.name", "cut", "--train.stop-at", "5")
    torchrun("--train.name", "cut", "--train.resume", "latest")
    a, b = (json.loads((tmp_path / n / "summary.json").read_text())["data_skipped"] for n in ("straight", "cut"))
    assert a == b and a["skipped_corrupt"] == 4, (a, b)
    a, b = (ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / n)) for n in ("straight", "cut"))
    assert a["step"] == b["step"] == 12 and a["world_size"] == b["world_size"] == 2
    for key in ("model", "optimizer", "objective", "rng"):
        assert_same_state(a[key], b[key], key)
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [r["step"] for r in (
        json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_time_based_checkpoints(tmp_path):
    proc = run(tmp_path, "--train.steps", "12", "--train.name", "t", "--train.checkpoint-minutes", "0.0001",
               "--train.keep-checkpoints", "100")
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "t" / "checkpoints").glob("step_*.pt"))
    assert len(steps) >= 6 and steps[-1] == 12, steps


def test_default_cadence_saves_by_the_clock_not_by_steps(monkeypatch):
    """With the default settings a checkpoint is written once 30 minutes have passed since the last one, at
    whatever step that is, and not before; never at the final step (the finish writes that one)."""
    from types import SimpleNamespace

    from amorlip import train
    from amorlip.config import build_config
    from amorlip.signals import StopRequest

    saved = []
    def save(run):  # what _save does to the clock
        saved.append(run.step)
        run.last_save_time = train.time.monotonic()

    monkeypatch.setattr(train, "_save", save)
    run = SimpleNamespace(cfg=build_config(None, []), device=torch.device("cpu"), last_save_time=1000.0,
                          total_steps=10_000, step=0)
    for step, minutes in ((1, 29), (7, 29.9), (8, 30), (9, 31), (50, 59.9), (51, 60.5), (10_000, 200)):
        now = 1000.0 + 60 * minutes
        run.step = step
        monkeypatch.setattr(train.time, "monotonic", lambda now=now: now)
        train._checkpoint_if_due(run, StopRequest())
    assert saved == [8, 51]


# --- 5: a full disk (or file size limit) is one clear line; earlier checkpoints stay; no temporaries ----------


@pytest.mark.slow
def test_full_disk_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path):
    assert run(tmp_path, "--train.steps", "2", "--train.name", "d").returncode == 0
    first = ckpt.latest_checkpoint(tmp_path / "d")
    first_bytes = first.read_bytes()
    proc = run(tmp_path, "--train.steps", "4", "--train.name", "d", "--train.resume", "latest",
               "--train.resume-allow-changes", "train.steps", preexec_fn=limit_file_size(2 * 2**20))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc)
    assert "could not write" in line and "free disk space" in line
    ckdir = ckpt.checkpoint_dir(tmp_path / "d")
    assert ckpt.latest_checkpoint(tmp_path / "d") == first and first.read_bytes() == first_bytes
    assert not list(ckdir.glob(".*.tmp")), "temporary file left behind"
    assert state_of(first)["step"] == 2


@pytest.mark.slow
def test_temporaries_of_a_killed_write_are_removed(tmp_path):
    assert run(tmp_path, "--train.steps", "2", "--train.name", "k").returncode == 0
    ckdir = ckpt.checkpoint_dir(tmp_path / "k")
    stale = ckdir / ".step_00000004.pt.x1y2z3.tmp"
    stale.write_bytes(b"\0" * 1000)
    proc = run(tmp_path, "--train.steps", "4", "--train.name", "k", "--train.resume", "latest",
               "--train.resume-allow-changes", "train.steps")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not stale.exists() and "interrupted checkpoint write" in proc.stdout


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_latest_intact(tmp_path):
    """kill -9 while torch.save writes (a slowed-down writer makes the window wide): the previous checkpoint
    stays the latest and loads; the next run cleans up the temporary file and resumes."""
    slow = tmp_path / "slow_save.py"
    slow.write_text(
        "import sys, time, torch\n"
        "from amorlip.cli import main\n"
        "_save = torch.save\n"
        "calls = []\n"
        "def slow(obj, f, *a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        f.write(b'partial' * 1000); f.flush(); print('WRITING', flush=True); time.sleep(60)\n"
        "    return _save(obj, f, *a, **k)\n"
        "torch.save = slow\n"
        "sys.exit(main(sys.argv[1:]))\n")
    args = ["train", "--train.output-dir", str(tmp_path), *TINY, "--train.steps", "4", "--train.checkpoint-every", "2",
            "--train.name", "w"]
    proc = subprocess.Popen([sys.executable, str(slow), *args], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # noqa: B007 - read until the second write is under way
            if "WRITING" in line:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    ckdir = ckpt.checkpoint_dir(tmp_path / "w")
    assert list(ckdir.glob(".*.tmp")), "the interrupted write should have left its temporary file"
    assert ckpt.latest_checkpoint(tmp_path / "w").name == "step_00000002.pt"
    proc = run(tmp_path, "--train.steps", "4", "--train.checkpoint-every", "2", "--train.name", "w",
               "--train.resume", "latest")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(ckdir.glob(".*.tmp"))
    assert state_of(ckpt.latest_checkpoint(tmp_path / "w"))["step"] == 4


# --- 8: a fresh run starts a fresh log; a finished run evaluated again logs its evaluation once ------------


@pytest.mark.slow
def test_fresh_run_starts_a_fresh_log(tmp_path):
    run_dir = tmp_path / "f"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 99, "loss": 123.0}) + "\n")  # a failed run's
    assert run(tmp_path, "--train.steps", "3", "--train.name", "f", "--train.log-every", "1").returncode == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


@pytest.mark.slow
def test_rerunning_a_finished_run_does_not_duplicate_its_evaluation(tmp_path):
    args = ["--train.steps", "2", "--train.name", "e", "--eval.retrieval", "true", "--data.val-size", "32",
            "--train.resume", "auto"]
    for _ in range(2):
        proc = run(tmp_path, *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert sum(any(k.startswith("eval/") for k in r) for r in rows) == 1


# --- 9: files follow the umask ------------------------------------------------------------------------------


@pytest.mark.slow
def test_files_follow_the_umask(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import os, sys; os.umask(0o027); from amorlip.cli import main; sys.exit(main(sys.argv[1:]))",
         "train", "--train.output-dir", str(tmp_path), *TINY, "--train.steps", "2", "--train.name", "m"],
        env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "m"
    files = [run_dir / n for n in ("config.yaml", "summary.json", "metrics.jsonl")]
    files += list(ckpt.checkpoint_dir(run_dir).iterdir())
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, (f, oct(f.stat().st_mode))
    old = os.umask(0o022)
    try:
        out, config = ckpt.export_open_clip(run_dir, tmp_path / "exported")
    finally:
        os.umask(old)
    for f in (out, config):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# --- 10: progress on a non-TTY is plain lines ------------------------------------------------------------------


@pytest.mark.slow
def test_progress_on_a_non_tty_is_plain_lines(tmp_path):
    proc = run(tmp_path, "--train.steps", "6", "--train.name", "p", "--train.log-every", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"run folder: {tmp_path / 'p'}"
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["2/6", "4/6", "6/6"]
    assert all("loss" in s and "lr" in s and "samples/s" in s and "ETA" in s for s in steps)
