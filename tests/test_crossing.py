"""Crossing points along the learning curves (amorlip.crossing): paired differences per evaluation step on
known numbers, the first step the entry stays above the reference (mean, and interval), the files compare writes."""
import json

import pytest

from amorlip.compare import point_label, safe_name
from amorlip.crossing import crossing, crossing_rows, difference_curve, write_crossing
from amorlip.history import read_history
from amorlip.stats import mean_interval

REF = {10: 0.50, 20: 0.60, 30: 0.62}
DIFF = {10: (-0.1, -0.1, -0.1), 20: (0.05, 0.01, 0.03), 30: (0.10, 0.11, 0.09)}


def _record(tmp_path):
    runs = []
    for entry in ("ref", "new"):
        for seed in range(3):
            run_dir = tmp_path / f"{entry}-s{seed}"
            run_dir.mkdir(parents=True)
            rows = [{"step": 5, "loss": 1.0}]  # a training row without evaluation
            for step, ref in REF.items():
                value = ref + (DIFF[step][seed] if entry == "new" else 0.0)
                rows.append({"step": step, "eval/zeroshot/mean_top1": value})
            (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
            runs.append({"entry": entry, "seed": seed, "sweep": {"train.batch_size": 16}, "batch_size": 16,
                         "run_dir": str(run_dir), "metrics": {"zeroshot/mean_top1": rows[-1]["eval/zeroshot/mean_top1"]},
                         "status": "trained"})
    return {"reference": "ref", "runs": runs}


def _finished(record):
    """The runs as compare.write_outputs hands them to amorlip.crossing."""
    return [{"entry": r["entry"], "point": point_label(r["sweep"]), "seed": r["seed"], "batch_size": r["batch_size"],
             "history": read_history(r["run_dir"])} for r in record["runs"]]


def test_difference_curve_and_crossings_on_known_numbers(tmp_path):
    rows = crossing_rows(_finished(_record(tmp_path)), "ref", "eval/zeroshot/mean_top1")
    assert len(rows) == 1 and rows[0]["entry"] == "new" and rows[0]["seeds"] == 3
    curve = rows[0]["curve"]
    assert [s for s, _ in curve] == [10, 20, 30]
    for step, diff in curve:
        want = mean_interval(DIFF[step])
        assert diff.mean == pytest.approx(want.mean) and diff.half == pytest.approx(want.half)
    assert rows[0]["crossing"] == 20  # the mean is above from step 20 on
    assert rows[0]["measured_crossing"] == 30  # at 20 the interval still holds 0


def test_a_dip_after_crossing_moves_the_crossing_later():
    up, down = mean_interval([0.1, 0.1, 0.12]), mean_interval([-0.1, -0.1, -0.12])
    assert crossing([(1, up), (2, down), (3, up), (4, up)]) == 3
    assert crossing([(1, up), (2, up), (3, down)]) is None
    assert crossing([], measured=True) is None


def test_only_steps_every_shared_seed_logged_are_compared():
    runs = {0: {10: 0.5, 20: 0.6}, 1: {10: 0.5}}
    ref = {0: {10: 0.4, 20: 0.5}, 1: {10: 0.4, 20: 0.5}, 2: {10: 0.0}}
    curve = difference_curve(runs, ref)
    assert [s for s, _ in curve] == [10] and curve[0][1].mean == pytest.approx(0.1)


def test_write_crossing_writes_the_table_and_plot(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    written = write_crossing(_finished(_record(tmp_path)), "ref", out, safe_name)
    assert [p.name for p in written] == ["crossing.md", "crossing_zeroshot_mean_top1.png"]
    text = (out / "crossing.md").read_text()
    assert "| new | bs=16 | 3 | +10.00 ± 2.48 | step 20 (320 samples) | step 30 (480 samples) |" in text
    assert write_crossing(_finished(_record(tmp_path / "noref")), None, out, safe_name) == []  # no reference
