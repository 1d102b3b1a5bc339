"""`amorlip eval` end to end: a run folder, its normalizer diagnostics, and an exported checkpoint that gives the
same numbers through our eval and through clip_benchmark's own zeroshot_classification.evaluate."""
import json
import math

import numpy as np
import open_clip
import pytest
from torch.utils.data import DataLoader, Dataset

from amorlip.cli import main
from amorlip.config import DataConfig
from amorlip.data.loader import build_eval_data

TINY = ["--model.name", "micro-vit", "--data.synthetic-size", "96", "--data.val-size", "40", "--data.eval-size", "40",
        "--train.batch-size", "16", "--optim.warmup-steps", "1", "--train.progress", "false", "--train.steps", "4"]


def _numpy2_safe_accuracy(output, target, topk=(1,)):
    """clip_benchmark's `accuracy` formula (its own calls float() on an array, an error in NumPy >= 2.4)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


class Transformed(Dataset):
    def __init__(self, ds, tf):
        self.ds, self.tf = ds, tf

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img, label = self.ds[i]
        return self.tf(img), label


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    assert main(["train", "--objective", "sogclr", "--train.output-dir", str(root), "--train.name", "r", *TINY]) == 0
    return root


@pytest.mark.slow
def test_eval_run_folder_with_normalizers(trained, capsys):
    out = trained / "eval.json"
    assert main(["eval", str(trained / "r"), "--normalizers", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    summary = json.loads((trained / "r" / "summary.json").read_text())
    # the CLI re-evaluates the final checkpoint: same numbers as the trainer's final evaluation
    for k, v in summary["metrics"].items():
        assert res["metrics"][k] == pytest.approx(v, abs=1e-6), k
    # the trainer's diagnostics (amorlip.evaluate.normalizers.run_diagnostics) on both splits; SogCLR's u is
    # indexed by training row, so it has an estimate on the training pairs only
    diag = res["normalizers"]
    for mod in ("image", "text"):
        for stat in ("mse", "bias"):
            # over the rows visited so far (4 steps of 16: 64 of the 96)
            assert math.isfinite(diag[f"normalizer/train/objective/{mod}_{stat}"])
            for split in ("train", "heldout"):
                assert math.isfinite(diag[f"normalizer/{split}/inbatch/{mod}_{stat}"])
    assert diag["normalizer/train/objective/coverage"] == pytest.approx(64 / 96)
    assert diag["normalizer/train/n"] == 96 and diag["normalizer/heldout/n"] == 512
    assert not any(k.startswith("normalizer/heldout/objective/") for k in diag)
    assert "normalizer/train/inbatch/image_mse" in capsys.readouterr().out


@pytest.mark.slow
def test_exported_model_same_numbers_in_clip_benchmark(trained, monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification as zsc

    if int(np.__version__.split(".")[0]) >= 2:
        monkeypatch.setattr(zsc, "accuracy", _numpy2_safe_accuracy)
    exp = trained / "exp"
    assert main(["export", str(trained / "r"), "--out", str(exp)]) == 0
    out = trained / "eval-export.json"
    assert main(["eval", str(exp / "micro-vit.pt"), "--data", "synthetic", "--out", str(out)]) == 0
    ours = json.loads(out.read_text())["metrics"]

    open_clip.add_model_config(exp / "micro-vit.json")
    model, _, preprocess = open_clip.create_model_and_transforms("micro-vit", pretrained=str(exp / "micro-vit.pt"))
    model.eval()
    tokenizer = open_clip.get_tokenizer("micro-vit")
    # an export carries no run config: `amorlip eval` uses the default evaluation data, seed 0
    tasks, _ = build_eval_data(DataConfig(source="synthetic"), seed=0)
    for task in tasks:
        loader = DataLoader(Transformed(task.dataset, preprocess), batch_size=16)
        loader.dataset.classes = task.classnames
        templates = [t.replace("{}", "{c}") for t in task.templates]  # clip_benchmark's placeholder
        ref = zsc.evaluate(model, loader, tokenizer, task.classnames, templates, "cpu", amp=False)
        assert ours[f"zeroshot/{task.name}/top1"] == pytest.approx(ref["acc1"], abs=1e-9)
        assert ours[f"zeroshot/{task.name}/mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"],
                                                                                  abs=1e-9)


@pytest.mark.slow
def test_gradient_fidelity_from_the_runs_trained_state(trained, tmp_path, capsys):
    """--gf-trained-state: the run's own objective (sogclr) starts from its checkpoint's state, the others as
    before; wrong uses are one line, exit 2, before any evaluation."""
    out = tmp_path / "gf.json"
    common = ["eval", str(trained / "r"), "--gradient-fidelity", "--gf-batch-sizes", "16", "--gf-epochs", "2",
              "--gf-warmup", "1", "--out", str(out)]
    assert main([*common, "--gf-trained-state", "--gf-objectives", "clip,sogclr"]) == 0
    printed = capsys.readouterr().out
    assert "sogclr starts from the state saved at step 4 (epoch 0)" in printed
    records = {r["objective"]: r for r in json.loads(out.read_text())["gradient_fidelity"]}
    assert records["sogclr"]["state"] == "trained (step 4)" and records["clip"]["state"] == "warm-up 1 epochs"
    assert records["sogclr"]["visits"] == 2.0 and records["sogclr"]["pairs"] == 96
    out.unlink()
    for extra, message in ((["--gf-trained-state", "--gf-objectives", "clip"], "the run's objective sogclr is not "
                            "among --gf-objectives clip (add it)"),
                           (["--gf-trained-state", "--gf-pairs", "50"], "drop --gf-pairs")):
        assert main([*common, *extra]) == 2
        err = capsys.readouterr()
        assert message in err.err and "evaluating on" not in err.out and not out.exists()
    assert main(["eval", str(trained / "r"), "--gf-trained-state"]) == 2
    assert "--gf-trained-state is an option of --gradient-fidelity (pass both)" in capsys.readouterr().err


def test_eval_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "neither a checkpoint file nor a run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_on_other_data_keeps_a_file_per_data_set_and_prints_plain_lines(trained, tmp_path, capsys):
    """Two CSV folders with the same last part (`val`) and the run's own data: three results files, each naming
    its data; on a non-TTY (pytest's captured stderr) progress is plain lines, never a bar's \\r frames."""
    from amorlip.data.writers import write_synthetic_csv

    csvs = [write_synthetic_csv(tmp_path / side / "val", 24, seed) for seed, side in enumerate(("a", "b"))]
    run = trained / "r"
    for data in [str(c) for c in csvs] + [None]:
        capsys.readouterr()
        assert main(["eval", str(run), *(["--data", data] if data else [])]) == 0
        err = capsys.readouterr().err
        assert "\r" not in err
        assert any(line.startswith("encode val: ") and "(100%)" in line for line in err.splitlines()) or data is None
    files = sorted(p.name for p in run.glob("eval*.json"))
    assert len(files) == 3 and "eval.json" in files, files
    described = {json.loads((run / f).read_text())["data"] for f in files}
    assert described == {str(c.resolve()) for c in csvs} | {"the run's own evaluation data"}
