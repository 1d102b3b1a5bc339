"""A lean start: `amorlip train` imports neither transformers nor timm for a model that uses neither; DataComp's
clip_benchmark is an extra with an error naming it; an opt-in check that a built wheel installs and trains."""
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import amorlip
from amorlip.model_catalog import unused_imports

ROOT = Path(__file__).resolve().parents[1]


def test_train_imports_neither_transformers_nor_timm(tmp_path):
    code = ("import sys; from amorlip.cli import main\n"
            "main(['train', '--model.name', 'micro-vit', '--data.synthetic-size', '32', '--train.batch-size', '16', "
            f"'--train.steps', '1', '--eval.zeroshot', 'false', '--eval.retrieval', 'false', '--data.workers', '0', "
            f"'--train.output-dir', {str(tmp_path)!r}])\n"
            "loaded = [m for m in ('transformers', 'timm', 'clip_benchmark') if sys.modules.get(m) is not None]\n"
            "assert not loaded, loaded")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_unused_imports_follow_the_model():
    assert unused_imports("tiny-vit") == ["transformers", "timm"]
    assert unused_imports("ViT-B-32") == ["transformers", "timm"]
    assert "transformers" not in unused_imports("xlm-roberta-base-ViT-B-32")  # a Hugging Face text tower
    assert "timm" not in unused_imports("convnext_base")  # a timm image tower
    assert unused_imports("hf-hub:someone/some-model") == []  # unknown here: nothing skipped


def test_missing_clip_benchmark_names_the_extra(monkeypatch):
    from amorlip.evaluate.datacomp import require_clip_benchmark

    monkeypatch.setitem(sys.modules, "clip_benchmark", None)
    with pytest.raises(amorlip.ConfigError, match=r"pip install 'amorlip\[datacomp\]'"):
        require_clip_benchmark()


@pytest.mark.skipif(not os.environ.get("AMORLIP_WHEEL_TEST"), reason="opt-in (AMORLIP_WHEEL_TEST=1): builds a wheel "
                    "and installs it with its dependencies in a fresh venv (PyPI or a local index; minutes)")
def test_wheel_installs_in_a_clean_venv_and_trains(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("amorlip-*.whl"))
    venv.create(tmp_path / "venv", with_pip=True)
    py = tmp_path / "venv" / "bin" / "python"
    torch_pins = os.environ.get("AMORLIP_TORCH_PINS", "torch==2.14.1 torchvision==0.29.1").split()
    subprocess.run([str(py), "-m", "pip", "install", "-q", *torch_pins, str(wheel)], check=True, timeout=1800)
    run = subprocess.run([str(tmp_path / "venv" / "bin" / "amorlip"), "train", "--config", "tiny-demo",
                          "--train.steps", "5", "--train.output-dir", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "runs" / "amorlip-tiny-vit-b64-s0" / "summary.json").exists()
    probe = "import amorlip, pathlib; p = pathlib.Path(amorlip.__file__).parent; print((p / 'py.typed').exists())"
    assert subprocess.run([str(py), "-c", probe], capture_output=True, text=True).stdout.strip() == "True"
