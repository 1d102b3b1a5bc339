"""The study scripts of docs/findings.md: the GPU recipe runs end to end (here on the CPU, at a micro size, through
its environment knobs), and the CPU study's script rejects an unknown part before any work."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from markers import needs_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@needs_fashion_mnist
def test_gpu_recipe_runs_end_to_end_at_a_micro_size_on_cpu_within_its_budget(tmp_path):
    """The GPU study's script at a micro size on the CPU: first with a budget too short to finish (its runs are
    stopped and nothing is lost), then again: the stopped runs resume, and all finish with equal samples."""
    out = tmp_path / "study"
    extra = ("--data.dataset-size 64 --train.steps 4 --train.eval-every 2 --data.val-size 16 --data.eval-size 32 "
             "--eval.normalizer-size 16 --train.batch-size 16")
    env = {**os.environ, "DEVICE": "cpu", "PRECISION": "fp32", "OBJECTIVES": "fmnist60k-clip,fmnist60k-amorlip",
           "SEEDS": "0", "BATCHES": "8,16", "WORKERS": "0", "EXTRA": extra, "AMORLIP": f"{sys.executable} -m amorlip.cli",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT / "src"), os.environ.get("PYTHONPATH"))))}
    script = ["bash", str(ROOT / "scripts" / "study_gpu.sh"), "2", str(out)]
    cut = subprocess.run(script, env={**env, "BUDGET_S": "3"}, cwd=tmp_path, capture_output=True, text=True,
                         timeout=400)
    assert cut.returncode in (0, 3), cut.stdout[-3000:] + cut.stderr[-3000:]
    assert "the budget of 3 s ran out during seed 0" in cut.stdout
    assert "used " in cut.stdout and "of a budget of 3 s" in cut.stdout
    done = subprocess.run(script, env={**env, "BUDGET_S": "400"}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ran out" not in done.stdout and "of a budget of 400 s" in done.stdout
    record = json.loads((out / "results.json").read_text())
    runs = record["runs"]
    assert sorted((r["entry"], r["batch_size"], r["steps"]) for r in runs) == [
        ("fmnist60k-amorlip", 8, 8), ("fmnist60k-amorlip", 16, 4), ("fmnist60k-clip", 8, 8),
        ("fmnist60k-clip", 16, 4)]  # equal samples
    assert all(r["status"] == "skipped" for r in runs), [r["status"] for r in runs]  # tables-only: all finished
    amor = next(r for r in runs if r["entry"] == "fmnist60k-amorlip")
    assert "normalizer/heldout/objective/image_mse" in amor["metrics"]
    assert "normalizer/heldout/objective_online/image_r2" in amor["metrics"]
    for name in ("table.md", "differences.csv", "normalizers.md", "normalizer_mse_bs_8.png",
                 "sweep_zeroshot_mean_top1.png"):
        assert (out / name).is_file(), name


def test_cpu_study_script_rejects_an_unknown_part(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "scripts" / "study_fmnist.sh"), "1", "main", "mian"], cwd=tmp_path,
                          env={**os.environ, "AMORLIP": "false", "OUT": str(tmp_path / "o")},
                          capture_output=True, text=True, timeout=50)
    assert done.returncode == 2 and "unknown part mian" in done.stderr
    assert not (tmp_path / "o").exists()


def _compare_stub(tmp_path):
    stub = tmp_path / "amorlip-stub"
    stub.write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        # a stand-in for `amorlip compare`: records the runs present when called, 'finishes' one run per seed
        out=; seeds=; tables=
        while [ $# -gt 0 ]; do case $1 in --out) out=$2; shift;; --seeds) seeds=$2; shift;; --tables-only) tables=1;; esac; shift; done
        echo "call seeds=$seeds tables=${tables:-0} present=$(ls "$out/runs" 2>/dev/null | tr '\\n' ' ')" >> "$LOG"
        [ -n "$tables" ] && exit 0
        mkdir -p "$out/runs/clip-s$seeds/checkpoints" "$out/runs/cut-s$seeds"
        for f in config.yaml summary.json metrics.jsonl checkpoints/step_1.pt; do echo "$seeds" > "$out/runs/clip-s$seeds/$f"; done
        echo partial > "$out/runs/cut-s$seeds/metrics.jsonl"
        """))
    stub.chmod(0o755)
    return stub


def _kept_study(tmp_path, part):
    """A function running `study_fmnist.sh 1 PART` with KEEP=tmp/results, SEEDS=0,1 and the compare stub into
    OUT; returns it, KEEP and the stub's call log."""
    stub, keep, log = _compare_stub(tmp_path), tmp_path / "results", tmp_path / "calls.log"

    def study(out):
        env = {**os.environ, "AMORLIP": str(stub), "OUT": str(out), "KEEP": str(keep), "SEEDS": "0,1", "LOG": str(log)}
        done = subprocess.run(["bash", str(ROOT / "scripts" / "study_fmnist.sh"), "1", part], env=env,
                              capture_output=True, text=True, timeout=50)
        assert done.returncode == 0, done.stdout + done.stderr
    return study, keep, log


def test_regime_study_keeps_finished_runs_for_the_next_session(tmp_path):
    """KEEP=DIR: after each seed the finished runs' small files (no checkpoints, no unfinished runs) are copied
    to DIR; a later study on a fresh machine restores them before its first compare, which then skips them."""
    study, keep, log = _kept_study(tmp_path, "regime")

    study(tmp_path / "first")
    assert sorted(str(p.relative_to(keep)) for p in keep.rglob("*") if p.is_file()) == [
        f"runs/clip-s{seed}/{f}" for seed in (0, 1) for f in ("config.yaml", "metrics.jsonl", "summary.json")]
    study(tmp_path / "second")  # a fresh output folder, as on a new machine
    calls = log.read_text().splitlines()
    assert calls[3] == "call seeds=0 tables=0 present=clip-s0 clip-s1 ", calls
    assert (tmp_path / "second" / "regime" / "runs" / "clip-s1" / "summary.json").read_text() == "1\n"


def test_long_study_runs_all_seeds_in_one_compare_and_keeps_them(tmp_path):
    """The long part: one compare over every seed (2 runs at once across seeds), then the tables; KEEP as for
    the regime part, so a second study on a fresh machine starts with the finished runs restored."""
    study, keep, log = _kept_study(tmp_path, "long")
    study(tmp_path / "first")
    assert sorted(str(p.relative_to(keep)) for p in keep.rglob("*") if p.is_file()) == [
        f"runs/clip-s0,1/{f}" for f in ("config.yaml", "metrics.jsonl", "summary.json")]
    study(tmp_path / "second")
    assert log.read_text().splitlines() == [
        "call seeds=0,1 tables=0 present=", "call seeds=0,1 tables=1 present=clip-s0,1 cut-s0,1 ",
        "call seeds=0,1 tables=0 present=clip-s0,1 ", "call seeds=0,1 tables=1 present=clip-s0,1 cut-s0,1 "]


def test_within_epoch_r2_bins_evaluations_by_the_epoch_fraction(tmp_path, capsys):
    """Steps per epoch = dataset size // batch (10 here): evaluations at steps 12 and 22 fall 0.2 into an epoch,
    17 falls 0.7; per bin the mean of the modalities' R2 and a t interval over the evaluations."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import within_epoch_r2
    finally:
        sys.path.pop(0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data: {dataset_size: 100}\ntrain: {batch_size: 10}\n")
    rows = [{"step": 5, "loss": 1.0}]
    for step, r2 in ((12, 0.1), (22, 0.3), (17, 0.8)):
        rows.append({"step": step, **{f"eval/normalizer/{split}/{net}/{m}_r2": r2 + (0.1 if m == "text" else 0.0)
                                      for split in ("train", "heldout") for net in ("objective", "objective_online")
                                      for m in ("image", "text")}})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 3")  # a torn line
    assert within_epoch_r2.main([str(run), "--bins", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    half = 12.706 * math.sqrt(((0.15 - 0.25) ** 2 + (0.35 - 0.25) ** 2) / 1) / math.sqrt(2)  # t(1) interval
    assert lines[2] == "| 10 | 0.00-0.50 | 2 | " + " | ".join([f"0.25 ± {half:.2f}"] * 4) + " |"
    assert lines[3] == "| 10 | 0.50-1.00 | 1 | " + " | ".join(["0.85"] * 4) + " |"
    assert within_epoch_r2.main([str(tmp_path / "nothing")]) == 2
    assert "no config.yaml and metrics.jsonl" in capsys.readouterr().err


def test_findings_tables_r2_on_known_numbers(tmp_path, capsys):
    """R2 = 1 - (mse - bias^2) / std^2 per run, then mean ± 95% t interval over seeds; missing values are '-'."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import findings_tables
    finally:
        sys.path.pop(0)
    runs = []
    for seed, (mse, bias) in enumerate([(0.5, 0.5), (0.3, 0.1)]):  # R2 = 1 - 0.25/0.25 = 0, 1 - 0.29/0.25 = -0.16
        metrics = {"normalizer/train/true/image_std": 0.5, "normalizer/train/objective/image_mse": mse,
                   "normalizer/train/objective/image_bias": bias, "normalizer/train/inbatch/image_mse": 0.2,
                   "normalizer/train/inbatch/image_bias": 0.0}
        runs.append({"entry": "amor", "batch_size": 16, "seed": seed, "metrics": metrics})
    runs.append({"entry": "amor", "batch_size": 16, "seed": 2, "metrics": None})  # failed: left out
    assert findings_tables.r2(runs[0]["metrics"], "train", "objective", "image") == pytest.approx(0.0)
    assert findings_tables.r2(runs[1]["metrics"], "train", "objective", "image") == pytest.approx(-0.16)
    assert findings_tables.r2(runs[0]["metrics"], "heldout", "objective", "image") is None
    logged = {**runs[0]["metrics"], "normalizer/train/objective/image_r2": 0.42}  # newer runs log it: taken as is
    assert findings_tables.r2(logged, "train", "objective", "image") == 0.42
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"runs": runs}))
    assert findings_tables.main([str(path)]) == 0
    row = capsys.readouterr().out.splitlines()[2].split(" | ")
    # entry, batch, seeds; train: in-batch MSE, in-batch R2 (1 - 0.2/0.25), own MSE, own bias, own R2; held-out: -
    half = 12.706 * math.sqrt(0.0128) / math.sqrt(2)  # R2s 0 and -0.16: sd 0.1131
    assert row[1:8] == ["16", "2", "0.20 ± 0.00", "0.20 ± 0.00", "0.40 ± 1.27", "0.30 ± 2.54",
                        f"-0.08 ± {half:.2f}"]
    assert row[8:] == ["-"] * 4 + ["- |"]
    with pytest.raises(SystemExit) as e:
        findings_tables.main([str(tmp_path / "missing.json")])
    assert e.value.code == 2


def test_seeds_needed_inverts_the_interval_and_counts_seeds_as_scipy_would(tmp_path, capsys):
    """The sd behind a compare interval is the seeds' own stdev; the seeds needed for +-T are the fewest n with
    t_{0.975, n-1} sd / sqrt(n) <= T, counted here with scipy's t quantile."""
    import statistics

    from scipy.stats import t as student_t

    from amorlip.stats import mean_interval, sd_of_interval, seeds_for_half_width
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import seeds_needed
    finally:
        sys.path.pop(0)
    diffs = [-0.0114, -0.0235, 0.0007, 0.0007, -0.0152]  # fractions, as compare writes them
    iv = mean_interval(diffs)
    assert sd_of_interval(iv.half, iv.n) == pytest.approx(statistics.stdev(diffs), rel=1e-12)
    for sd in (0.3, 1.05, 2.04, 4.12, 9.0):
        want = next(n for n in range(2, 2000) if student_t.ppf(0.975, n - 1) * sd / math.sqrt(n) <= 2.0)
        assert seeds_for_half_width(sd, 2.0) == want
    assert seeds_for_half_width(100.0, 2.0, most=50) is None
    with pytest.raises(ValueError, match="positive"):
        seeds_for_half_width(1.0, 0.0)
    path = tmp_path / "differences.csv"
    path.write_text("entry,reference,train.batch_size,metric,seeds,difference,ci95_low,ci95_high,verdict\n"
                    f"amor,clip,16,zeroshot/mean_top1,5,{iv.mean},{iv.low},{iv.high},no difference measured\n"
                    "amor,clip,16,retrieval/mean_R@1,1,0.01,,,no difference measured\n")
    assert seeds_needed.main([str(path), "--target", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    sd = 100 * statistics.stdev(diffs)
    need = next(n for n in range(2, 2000) if student_t.ppf(0.975, n - 1) * sd / math.sqrt(n) <= 0.5)
    assert lines[0].endswith("| seeds for ±0.5 |")
    assert lines[2] == f"| amor | 16 | zeroshot/mean_top1 | 5 | {sd:.2f} | ±{100 * iv.half:.2f} | {need} |"
    assert lines[3] == "| amor | 16 | retrieval/mean_R@1 | 1 | - | - | - |"
    with pytest.raises(SystemExit) as e:
        seeds_needed.main([str(tmp_path / "missing.csv")])
    assert e.value.code == 2
