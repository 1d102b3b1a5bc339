"""`amorlip compare` sweeps, budgets, intervals, paired differences, parallel jobs and resume.

Most tests use fabricated results (tables, plots, verdicts) or plain `python -c` children (the job runner); one
trains a micro config with --jobs 1 and --jobs 2 and checks that both give the same numbers.
"""
import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from amorlip.cli import main
from amorlip.compare import (build_differences, build_table, compare_plan, finished_metrics, normalizer_curves,
                             parse_sweeps, rebuild_outputs, sweep_points, write_outputs)
from amorlip.config import ConfigError
from amorlip.jobs import Job, last_error_line, run_jobs
from amorlip.stats import mean_interval, paired_difference, t975, verdict

MICRO = ["--model.name", "micro-vit", "--data.synthetic-size", "64", "--data.val-size", "16", "--data.eval-size", "16",
         "--train.progress", "false", "--optim.warmup-steps", "1", "--eval.retrieval", "false"]


def plan(tmp_path, *words, objectives="clip", seeds="0", sweep=(), budget=None, reference=None, jobs="1"):
    args = argparse.Namespace(config=None, objectives=objectives, seeds=seeds, out=str(tmp_path / "cmp"),
                              sweep=list(sweep) or None, budget=budget or "samples", budget_given=budget is not None,
                              reference=reference, jobs=jobs)
    pairs = [(words[i].lstrip("-"), words[i + 1]) for i in range(0, len(words), 2)]
    return compare_plan(args, pairs)


# ----------------------------------------------------------------------------------------------------
# grid and budgets


def test_grid_expansion(tmp_path):
    sweeps = parse_sweeps(["train.batch_size=16,32,64", "data.synthetic-size=4000,30000"])
    points = sweep_points(sweeps)
    assert [s.key for s in sweeps] == ["train.batch_size", "data.synthetic_size"]
    assert points[:3] == [{"train.batch_size": 16, "data.synthetic_size": 4000},
                          {"train.batch_size": 16, "data.synthetic_size": 30000},
                          {"train.batch_size": 32, "data.synthetic_size": 4000}]
    assert len(points) == 6 and sweep_points([]) == [{}]
    p = plan(tmp_path, "--train.steps", "8", objectives="clip,amorlip", seeds="0,1",
             sweep=["train.batch_size=16,32", "data.synthetic_size=256,512"])
    assert len(p.runs) == 2 * 4 * 2 and len({r.name for r in p.runs}) == len(p.runs)
    run = p.runs[3]
    assert (run.entry, run.point, run.seed) == ("clip", {"train.batch_size": 16, "data.synthetic_size": 512}, 1)
    assert run.label == "clip bs=16 synthetic_size=512 s1"
    assert run.cfg.data.synthetic_size == 512 and run.cfg.train.batch_size == 16
    assert run.name.startswith("clip-s1-")  # entry-seed-hash of the settings, as without a sweep


def lengths(p):
    return {r.point["train.batch_size"]: (r.cfg.train.steps, r.cfg.train.epochs, r.cfg.train.eval_every,
                                          r.cfg.train.log_every, r.cfg.train.checkpoint_every, r.cfg.optim.warmup_steps)
            for r in p.runs}


def test_budget_samples_steps_epochs(tmp_path):
    common = ["--train.batch_size", "64", "--train.eval_every", "100", "--train.log_every", "10",
              "--optim.warmup_steps", "50"]
    sweep = ["train.batch_size=16,48,64,128"]
    samples = lengths(plan(tmp_path, *common, "--train.steps", "600", sweep=sweep))  # the default budget
    assert samples == {16: (2400, None, 400, 40, 0, 200), 48: (800, None, 133, 13, 0, 67),
                       64: (600, None, 100, 10, 0, 50), 128: (300, None, 50, 5, 0, 25)}
    steps = lengths(plan(tmp_path, *common, "--train.steps", "600", sweep=sweep, budget="steps"))
    assert set(steps.values()) == {(600, None, 100, 10, 0, 50)}
    epochs = lengths(plan(tmp_path, *common, "--train.epochs", "2", sweep=sweep, budget="epochs"))
    assert epochs[16] == (None, 2, 400, 40, 0, 200) and epochs[128] == (None, 2, 50, 5, 0, 25)
    # at least one step; a sweep point's own value of a step setting is not scaled
    tiny = lengths(plan(tmp_path, "--train.steps", "2", "--train.batch_size", "16",
                        sweep=["train.batch_size=16,64,128"]))
    assert tiny[64][0] == 1 and tiny[128][0] == 1
    own = plan(tmp_path, "--train.steps", "40", "--train.batch_size", "16",
               sweep=["train.batch_size=8,16", "optim.warmup_steps=1,2"])
    assert {(r.cfg.train.batch_size, r.cfg.optim.warmup_steps, r.cfg.train.steps) for r in own.runs} == {
        (8, 1, 80), (8, 2, 80), (16, 1, 40), (16, 2, 40)}
    with pytest.raises(ConfigError, match="--budget epochs holds train.epochs fixed"):
        plan(tmp_path, "--train.steps", "600", sweep=sweep, budget="epochs")
    with pytest.raises(ConfigError, match="--budget steps holds train.steps fixed"):
        plan(tmp_path, "--train.epochs", "2", sweep=sweep, budget="steps")
    with pytest.raises(ConfigError, match="both set the run length"):
        plan(tmp_path, sweep=["train.steps=10,20"], budget="steps")
    assert [r.cfg.train.steps for r in plan(tmp_path, sweep=["train.steps=10,20"]).runs] == [10, 20]


def test_jobs_give_children_one_thread(tmp_path):
    assert {r.cfg.train.threads for r in plan(tmp_path, sweep=["train.batch_size=8,16"], jobs="2").runs} == {1}
    assert {r.cfg.train.threads for r in plan(tmp_path, "--train.threads", "3", jobs="2").runs} == {3}
    assert {r.cfg.train.threads for r in plan(tmp_path).runs} == {0}


# ----------------------------------------------------------------------------------------------------
# intervals and paired differences


def test_t_interval_on_known_numbers():
    iv = mean_interval([1, 2, 3])
    assert iv.n == 3 and iv.mean == 2 and iv.sd == 1
    assert iv.half == pytest.approx(4.302653 / math.sqrt(3)) and round(iv.half, 4) == 2.4841
    assert (iv.low, iv.high) == pytest.approx((2 - 2.4841, 2 + 2.4841), abs=1e-4)
    one = mean_interval([0.7])
    assert one.mean == 0.7 and one.half is None and one.low is None
    assert t975(1) == pytest.approx(12.7062, abs=1e-4) and t975(30) == pytest.approx(2.0423, abs=1e-4)
    assert t975(31) == pytest.approx(2.0395, abs=1e-4) and t975(1000) == pytest.approx(1.9623, abs=1e-4)


def test_paired_difference_and_verdict():
    ref = {0: 0.50, 1: 0.60, 2: 0.40}
    better = paired_difference({0: 0.55, 1: 0.66, 2: 0.44}, ref)  # +0.05, +0.06, +0.04 despite a 20-point seed spread
    assert better.n == 3 and better.mean == pytest.approx(0.05) and verdict(better) == "better"
    assert verdict(paired_difference({0: 0.45, 1: 0.54, 2: 0.36}, ref)) == "worse"
    assert verdict(paired_difference({0: 0.55, 1: 0.55, 2: 0.45}, ref)) == "no difference measured"
    one = paired_difference({2: 0.9, 7: 0.1}, ref)  # only seed 2 shared: no interval
    assert one.n == 1 and verdict(one) == "no difference measured"
    assert paired_difference({5: 0.1}, ref) is None and verdict(None) == "no difference measured"


def fabricated(normalizers=False, two_keys=False):
    """A results.json record: clip, better (+2 points every seed), noisy (+-), at bs 16 and 32 (x 2 sizes)."""
    runs = []
    sizes = [256, 512] if two_keys else [None]
    for entry, shift in (("clip", [0, 0, 0]), ("better", [0.02, 0.02, 0.02]), ("noisy", [0.05, -0.06, 0.01])):
        for bs in (16, 32):
            for size in sizes:
                for seed, base in enumerate([0.1, 0.2, 0.3]):
                    metrics = {"zeroshot/mean_top1": base + shift[seed] + bs / 1000, "zeroshot/a/top1": base,
                               "zeroshot/a/top5": 0.9, "retrieval/v/image_to_text_R@1": 0.1,
                               "retrieval/v/text_to_image_R@1": 0.3}
                    if normalizers:
                        metrics["normalizer/heldout/objective/image_mse"] = 0.01 * (seed + 1)
                        metrics["normalizer/train/inbatch/text_bias"] = -0.5
                    sweep = {"train.batch_size": bs, **({"data.synthetic_size": size} if size else {})}
                    runs.append({"entry": entry, "sweep": sweep, "seed": seed, "label": f"{entry} bs={bs} s{seed}",
                                 "status": "trained", "run_dir": "/nonexistent", "batch_size": bs, "steps": 10,
                                 "metrics": metrics})
    sweep = {"train.batch_size": [16, 32], **({"data.synthetic_size": sizes} if two_keys else {})}
    return {"entries": ["clip", "better", "noisy"], "seeds": [0, 1, 2], "sweep": sweep, "budget": "samples",
            "reference": "clip", "model": "micro-vit", "data": "synthetic", "runs": runs}


def test_table_mean_and_interval_per_entry_and_point():
    md, csv_text, columns = build_table(fabricated())
    assert columns == ["zeroshot/mean_top1", "retrieval/mean_R@1", "zeroshot/a/top1"]
    # clip at bs 16: 0.116, 0.216, 0.316 -> 21.60 ± 4.303 * 10 / sqrt(3) = 24.84
    assert "| clip | 16 | 3 | 21.60 ± 24.84 | 20.00 ± 0.00 | 20.00 ± 24.84 |" in md
    assert "| noisy | 32 |" in md and md.count("\n") == 2 + 6
    rows = [line.split(",") for line in csv_text.splitlines()]
    assert rows[0][:6] == ["entry", "train.batch_size", "seeds", "zeroshot/mean_top1 mean", "zeroshot/mean_top1 ci95",
                           "zeroshot/mean_top1 sd"]
    assert rows[1][:6] == ["clip", "16", "3", "0.216", "0.248414", "0.1"]


def test_differences_verdicts_on_fabricated_results():
    md, csv_text, rows = build_differences(fabricated(), "clip")
    by = {(r["entry"], r["sweep"]["train.batch_size"], r["metric"]): r for r in rows}
    assert by[("better", 16, "zeroshot/mean_top1")]["verdict"] == "better"
    assert by[("better", 16, "zeroshot/mean_top1")]["difference"] == pytest.approx(0.02)
    assert by[("noisy", 32, "zeroshot/mean_top1")]["verdict"] == "no difference measured"
    assert by[("better", 16, "zeroshot/a/top1")]["verdict"] == "no difference measured"  # identical: interval [0, 0]
    assert not any(r["entry"] == "clip" for r in rows)
    assert "| better | 16 | zeroshot/mean_top1 | 3 | +2.00 | [+2.00, +2.00] | better |" in md
    assert csv_text.splitlines()[0].split(",")[-4:] == ["difference", "ci95_low", "ci95_high", "verdict"]


def test_outputs_written_and_rebuilt_from_results_json(tmp_path):
    shown, written = write_outputs(fabricated(normalizers=True), tmp_path / "a")
    names = {p.name for p in written}
    assert {"table.md", "table.csv", "differences.csv", "results.json", "normalizers.md", "normalizers.csv",
            "sweep_zeroshot_mean_top1.png", "sweep_retrieval_mean_R_1.png"} <= names
    assert "Paired differences to clip" in shown and "| better | 16 | zeroshot/mean_top1 |" in shown
    norm = (tmp_path / "a" / "normalizers.md").read_text()
    assert "normalizer/heldout/objective/image_mse" in norm and "| clip | 16 | 3 | 0.02 ± 0.025 | -0.5 ± 0 |" in norm
    assert "normalizer/" not in (tmp_path / "a" / "table.md").read_text()
    rebuilt, _ = rebuild_outputs(tmp_path / "a" / "results.json", tmp_path / "b")
    assert rebuilt == shown and (tmp_path / "b" / "table.csv").read_text() == (tmp_path / "a" / "table.csv").read_text()
    # no normaliser keys: no normaliser table; a grid of two keys: one panel per value of the second
    _, written = write_outputs(fabricated(two_keys=True), tmp_path / "c")
    assert "normalizers.md" not in {p.name for p in written}
    assert (tmp_path / "c" / "sweep_zeroshot_mean_top1.png").is_file()
    assert "| clip | 16 | 512 | 3 |" in (tmp_path / "c" / "table.md").read_text()


@pytest.mark.slow
def test_normalizer_curves_over_training(tmp_path):
    """The MSE curves of the normaliser diagnostics: mean and interval per step over seeds, x in samples seen;
    the method's own estimate only where it has one; normalizer_mse.png written only when a run logged them."""
    record = fabricated()
    for i, r in enumerate(record["runs"]):
        run_dir = tmp_path / "runs" / f"r{i}"
        run_dir.mkdir(parents=True)
        rows = [{"step": 5, "objective_loss": 1.0}]
        for step in (10, 20):
            row = {"step": step, "eval/zeroshot/a/top1": 0.5,
                   "eval/normalizer/heldout/inbatch/image_mse": 0.1 + 0.2 * (r["seed"] == 1) + 0.01 * step,
                   "eval/normalizer/train/inbatch/text_mse": 0.4}
            if r["entry"] != "clip":  # clip has no estimate of its own
                row["eval/normalizer/heldout/objective/image_mse"] = 0.05 * (r["seed"] + 1)
            rows.append(row)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        r["run_dir"] = str(run_dir)
    histories = {}
    for r in record["runs"]:
        if r["seed"] < 2:  # two seeds: held-out in-batch image MSE 0.1 + 0.01 step and 0.3 + 0.01 step
            histories.setdefault(f"{r['entry']} bs={r['batch_size']}", []).append(
                [json.loads(line) for line in Path(r["run_dir"], "metrics.jsonl").read_text().splitlines()])
    curves = normalizer_curves(histories, {"clip bs=16": 16.0})
    half = t975(1) * math.sqrt(0.02) / math.sqrt(2)  # step 10: (0.2, 0.4), sd sqrt(0.02)
    (x, mean, low, high), second = curves[("clip bs=16", "heldout", "image", "inbatch")]
    assert (x, second[0]) == (160.0, 320.0)
    assert mean == pytest.approx(0.3) and low == pytest.approx(0.3 - half) and high == pytest.approx(0.3 + half)
    assert second[1] == pytest.approx(0.4)
    assert curves[("clip bs=16", "train", "text", "inbatch")] == [(160.0, 0.4, 0.4, 0.4), (320.0, 0.4, 0.4, 0.4)]
    assert ("clip bs=16", "heldout", "image", "objective") not in curves
    assert curves[("better bs=32", "heldout", "image", "objective")][0][:2] == (10.0, pytest.approx(0.075))
    assert not any(k[1:3] == ("train", "image") for k in curves)  # never logged
    _, written = write_outputs(record, tmp_path / "out")  # one plot per sweep point, a line per entry
    plots = {p.name for p in written if p.name.startswith("normalizer_mse")}
    assert plots == {"normalizer_mse_bs_16.png", "normalizer_mse_bs_32.png"}
    assert (tmp_path / "out" / "normalizer_mse_bs_16.png").stat().st_size > 0
    for r in record["runs"]:  # the same runs without diagnostics: no such plot
        path = Path(r["run_dir"], "metrics.jsonl")
        path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if "normalizer" not in line))
    _, written = write_outputs(record, tmp_path / "plain")
    assert not any(p.name.startswith("normalizer_mse") for p in written) and "loss.png" in {p.name for p in written}


# ----------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


@pytest.mark.parametrize("words,names", [
    (["--sweep", "train.batch_size"], ["--sweep", "KEY=V1,V2"]),
    (["--sweep", "train.batch_size=16,,32"], ["--sweep", "no empty value"]),
    (["--sweep", "train.batchsize=16,32"], ["unknown key train.batchsize", "train.batch_size"]),
    (["--sweep", "train.batch_size=16,x"], ["train.batch_size", "'x'"]),
    (["--sweep", "train.batch_size=8", "--sweep", "train.batch_size=16"], ["given twice"]),
    (["--sweep", "train.log_every=1,2"], ["--sweep train.log_every", "same run"]),
    (["--sweep", "train.seed=1,2"], ["--seeds"]),
    (["--reference", "siglip"], ["--reference 'siglip'", "clip, amorlip"]),
    (["--jobs", "0"], ["--jobs 0", "--jobs 1 or more"]),
    (["--jobs", "two"], ["--jobs two", "not an integer"]),
    (["--budget", "flops"], ["--budget flops", "samples, steps, epochs"]),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, words, names):
    out = tmp_path / "cmp"
    rc = main(["compare", "--objectives", "clip,amorlip", "--out", str(out), "--train.steps", "2", *words])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amorlip compare: error: ") and lines[0].endswith(")"), err
    for name in names:
        assert name in lines[0], (name, err)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------
# the job runner (plain python children: no torch import, fast)


def child(code):
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_jobs_report_a_failure_and_finish_the_others(tmp_path, capsys):
    ok = child("print('step 1/2 (50.0%) epoch 0 | loss 1.0'); print('summary line'); print('step 2/2 (100.0%)')")
    bad = child("""
        import sys
        print('step 1/4 (25.0%) epoch 0')
        print('amorlip train: error: loss is nan at step 1; lower --optim.lr (or check the data)', file=sys.stderr)
        print('trailing noise')
        sys.exit(1)""")
    jobs = [Job("good s0", ok, tmp_path / "good.log"), Job("bad bs=8 s1", bad, tmp_path / "bad.log"),
            Job("good s2", ok, tmp_path / "good2.log")]
    outcomes = run_jobs(jobs, 2, tty=False)
    out = capsys.readouterr().out
    assert [o.returncode for o in outcomes] == [0, 1, 0]
    assert outcomes[1].error_line == "amorlip train: error: loss is nan at step 1; lower --optim.lr (or check the data)"
    assert "[job 1/3 good s0] step 2/2 (100.0%)" in out and "summary line" not in out  # the full output is in the log
    # the time taken varies with the machine's load: any h:mm:ss / m:ss
    assert re.search(r"\[job 2/3 bad bs=8 s1\] failed \(exit 1 after (\d+:)?\d+:\d\d\): amorlip train: error: "
                     r"loss is nan at step 1; lower --optim.lr \(or check the data\) \(full output: ", out)
    assert "[job 3/3 good s2] finished" in out
    assert "summary line" in (tmp_path / "good.log").read_text()
    assert last_error_line(["Traceback (most recent call last):", "  File x", "ValueError: boom", ""]) == \
        "ValueError: boom"


def test_jobs_terminal_keeps_one_line_per_job(tmp_path):
    import io

    stream = io.StringIO()
    run_jobs([Job("a", child("print('step 1/1 (100.0%)')"), tmp_path / "a.log")], 1, stream=stream, tty=True)
    text = stream.getvalue()
    assert "[job 1/1 a] step 1/1 (100.0%)" in text and "\x1b[1F\x1b[J" in text and "finished" in text


RUNNER = """
import sys, signal, time
from pathlib import Path
from amorlip.jobs import Job, JobsStopped, run_jobs
code = '''
import signal, sys, time
def stop(signum, frame):
    print('saved a checkpoint', flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print('step 1/100', flush=True)
time.sleep(60)
'''
out = Path(sys.argv[1])
jobs = [Job(f"j{i}", [sys.executable, "-c", code], out / f"j{i}.log") for i in range(3)]
try:
    run_jobs(jobs, 2, tty=False)
except JobsStopped as e:
    print("stopped", [o.returncode for o in e.outcomes], flush=True)
    sys.exit(128 + e.signum)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_children(tmp_path, signum):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        seen = []
        deadline = time.monotonic() + 60
        while sum("step 1/100" in line for line in seen) < 2 and time.monotonic() < deadline:
            seen.append(proc.stdout.readline())
        proc.send_signal(signum)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, rest
    assert "stopped [143, 143, None]" in rest  # the two running saved and exited; the third never started
    for i in (0, 1):
        assert "saved a checkpoint" in (tmp_path / f"j{i}.log").read_text()


# ----------------------------------------------------------------------------------------------------
# resume: finished runs skipped, half-finished resumed; --jobs 2 gives what --jobs 1 gives


def test_finished_run_is_recognised_by_its_settings(tmp_path):
    run = plan(tmp_path, "--train.steps", "3").runs[0]
    assert finished_metrics(run) is None
    run.run_dir.mkdir(parents=True)
    stored = run.cfg.to_dict()
    (run.run_dir / "summary.json").write_text(json.dumps({"metrics": {"zeroshot/mean_top1": 0.5}}))

    def with_stored(section, key, value):
        changed = json.loads(json.dumps(stored))
        changed[section][key] = value
        (run.run_dir / "config.yaml").write_text(yaml.safe_dump(changed))
        return finished_metrics(run)

    assert with_stored("train", "log_every", 1) == {"zeroshot/mean_top1": 0.5}  # neutral: the same run
    assert with_stored("optim", "lr", 0.5) is None  # other settings: not this run
    assert with_stored("eval", "zeroshot", False) is None  # evaluated otherwise: evaluate again
    assert with_stored("data", "val_size", 3) is None


def history_losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["objective_loss"]) for r in rows if "objective_loss" in r]


@pytest.mark.slow
def test_jobs_2_equal_jobs_1_and_rerun_skips_or_resumes(tmp_path, capsys):
    def compare(out, jobs):
        return main(["compare", "--objectives", "clip", "--sweep", "train.batch_size=8,16", "--out", str(out),
                     "--jobs", str(jobs), *MICRO, "--train.batch-size", "16", "--train.steps", "2",
                     "--train.log-every", "1", "--train.threads", "1"])

    def results(out):
        data = json.loads((out / "results.json").read_text())
        return {(r["entry"], r["sweep"]["train.batch_size"], r["seed"]): r for r in data["runs"]}

    def alarm(signum, frame):
        raise TimeoutError("compare --jobs 2 took more than 400 s")

    assert compare(tmp_path / "seq", 1) == 0
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(400)  # a hung child fails the test (run_jobs kills the children on the way out)
    try:
        assert compare(tmp_path / "par", 2) == 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out = capsys.readouterr().out
    assert "[job 1/2 clip bs=8 s0] step 4/4" in out and "[job 2/2 clip bs=16 s0] finished" in out
    seq, par = results(tmp_path / "seq"), results(tmp_path / "par")
    assert seq.keys() == par.keys() == {("clip", 8, 0), ("clip", 16, 0)}
    for key in seq:
        assert seq[key]["name"] == par[key]["name"]  # the same settings (threads is neutral)
        assert seq[key]["metrics"] == par[key]["metrics"] and seq[key]["metrics"]
        assert history_losses(seq[key]["run_dir"]) == history_losses(par[key]["run_dir"])
    assert seq[("clip", 8, 0)]["steps"] == 4

    # rerun: both finished, so both skipped; then one made half-finished (no summary): only it runs again
    assert compare(tmp_path / "par", 2) == 0
    out = capsys.readouterr().out
    assert "skipping 2 of 2 runs" in out and "[job" not in out
    (Path(par[("clip", 16, 0)]["run_dir"]) / "summary.json").unlink()
    assert compare(tmp_path / "par", 1) == 0
    out = capsys.readouterr().out
    assert "skipping 1 of 2 runs" in out and "clip bs=8 s0" in out
    assert "training 1 run(s), 1 resumed from their checkpoint" in out and "[compare 1/1] clip bs=16 s0" in out
    assert results(tmp_path / "par")[("clip", 16, 0)]["metrics"] == par[("clip", 16, 0)]["metrics"]


@pytest.mark.slow
def test_tables_only_reports_finished_runs_and_trains_nothing(tmp_path, capsys):
    """--tables-only: the table from the runs finished so far; the others are listed, none is trained."""
    out = tmp_path / "cmp"
    common = ["compare", "--seeds", "0", "--out", str(out), "--train.steps", "2", *MICRO]
    assert main([*common, "--objectives", "clip"]) == 0
    runs_before = sorted(p.name for p in (out / "runs").iterdir())
    capsys.readouterr()
    assert main([*common, "--objectives", "clip,siglip", "--tables-only"]) == 0
    printed = capsys.readouterr().out
    assert "1 of 2 runs have finished; training none" in printed
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs_before  # nothing trained or started
    table = (out / "table.md").read_text()
    assert "| clip | 1 |" in table and "not in the table (not finished yet): siglip" in table
    record = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["skipped", "failed"]
