"""The study scripts of docs/findings.md: the GPU recipe runs end to end (here on the CPU, at a micro size, through
its environment knobs), and the CPU study's script rejects an unknown part before any work."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from amorlip.data import fashion_mnist as fmnist

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not fmnist.available(), reason="Debian package dataset-fashion-mnist is not installed")
def test_gpu_recipe_runs_end_to_end_at_a_micro_size_on_cpu(tmp_path):
    out = tmp_path / "study"
    extra = ("--model.name micro-vit --data.dataset-size 64 --train.batch-size 16 --train.steps 4 --train.eval-every 2 "
             "--data.val-size 16 --data.eval-size 32 --eval.normalizer-size 16 --data.workers 0 --train.threads 1 "
             "--train.progress false")
    env = {**os.environ, "DEVICE": "cpu", "PRECISION": "fp32", "OBJECTIVES": "tiny-clip,tiny-amorlip", "SEEDS": "0",
           "BATCHES": "8,16", "EXTRA": extra, "AMORLIP": f"{sys.executable} -m amorlip.cli",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT / "src"), os.environ.get("PYTHONPATH"))))}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "study_gpu.sh"), "2", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    runs = record["runs"]
    assert sorted((r["entry"], r["batch_size"], r["steps"]) for r in runs) == [
        ("tiny-amorlip", 8, 8), ("tiny-amorlip", 16, 4), ("tiny-clip", 8, 8), ("tiny-clip", 16, 4)]  # equal samples
    assert all(r["status"] == "trained" for r in runs)
    amor = next(r for r in runs if r["entry"] == "tiny-amorlip")
    assert "normalizer/heldout/objective/image_mse" in amor["metrics"]
    for name in ("table.md", "differences.csv", "normalizers.md", "normalizer_mse_bs_8.png",
                 "sweep_zeroshot_mean_top1.png"):
        assert (out / name).is_file(), name


def test_cpu_study_script_rejects_an_unknown_part(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "scripts" / "study_fmnist.sh"), "1", "main", "mian"], cwd=tmp_path,
                          env={**os.environ, "AMORLIP": "false", "OUT": str(tmp_path / "o")},
                          capture_output=True, text=True, timeout=50)
    assert done.returncode == 2 and "unknown part mian" in done.stderr
    assert not (tmp_path / "o").exists()
