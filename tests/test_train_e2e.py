"""End-to-end training from the CLI: runs, resume equivalence, export round trip, bad input."""
import json
import math
from pathlib import Path

import open_clip
import pytest
import torch

from amorlip.cli import main

TINY = ["--model.name", "micro-vit", "--data.synthetic-size", "256", "--data.val-size", "64",
        "--data.eval-size", "48", "--train.batch-size", "16", "--optim.warmup-steps", "2",
        "--train.progress", "false", "--train.log-every", "1"]


def run_cli(tmp_path, *args):
    return main(["train", "--train.output-dir", str(tmp_path), *TINY, *args])


def load_model_state(run_dir: Path) -> dict:
    from amorlip.checkpoint import latest_checkpoint, load_checkpoint

    return load_checkpoint(latest_checkpoint(run_dir))


def test_train_writes_run_folder(tmp_path, capsys):
    assert run_cli(tmp_path, "--train.steps", "6", "--train.name", "r", "--train.tensorboard", "true") == 0
    run = tmp_path / "r"
    assert list((run / "tensorboard").glob("events.out.tfevents.*")), "TensorBoard events not written"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "training.png"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6
    assert any(k.startswith("zeroshot/") for k in summary["metrics"])
    assert any(k.startswith("retrieval/") for k in summary["metrics"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    out = capsys.readouterr().out
    assert "after 6 steps" in out


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    """Train 10 steps straight, and 6 + resume to 10 (crossing an epoch boundary): identical weights."""
    common = ["--train.steps", "10", "--data.synthetic-size", "112", "--train.checkpoint-every", "3",
              "--train.keep-checkpoints", "5", "--eval.zeroshot", "false", "--eval.retrieval", "false"]
    assert run_cli(tmp_path, *common, "--train.name", "straight") == 0
    # interrupted run: stops after step 6 (as a killed or time-limited job would), then resumes
    assert run_cli(tmp_path, *common, "--train.name", "split", "--train.stop-at", "6") == 0
    stopped = load_model_state(tmp_path / "split")
    assert stopped["step"] == 6
    rows = (tmp_path / "split" / "metrics.jsonl").read_text()
    for stop in ("6", "4"):  # resumed at (or past) its stop_at, a run trains no step
        assert run_cli(tmp_path, *common, "--train.name", "split", "--train.resume", "latest",
                       "--train.stop-at", stop) == 0
        again = load_model_state(tmp_path / "split")
        assert again["step"] == 6 and all(torch.equal(again["model"][k], v) for k, v in stopped["model"].items())
        assert (tmp_path / "split" / "metrics.jsonl").read_text() == rows
    assert run_cli(tmp_path, *common, "--train.name", "split", "--train.resume", "latest") == 0
    a, b = load_model_state(tmp_path / "straight"), load_model_state(tmp_path / "split")
    assert a["step"] == b["step"] == 10
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert torch.equal(va["exp_avg"], vb["exp_avg"])


def test_diverged_loss_is_a_clear_error_before_the_update(tmp_path, capsys, monkeypatch):
    """A non-finite loss stops the run with exit 1 and advice, and no optimizer step is taken with it."""
    import amorlip.step as step_mod

    updates = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (updates.append(1), real_step(self, *a, **k))[1])
    real_scheme = step_mod.apply_temperature_scheme

    def poisoned(loss, *args):  # the loss of the fourth step (step index 3) is NaN
        return real_scheme(loss, *args) * (float("nan") if len(updates) == 3 else 1.0)

    monkeypatch.setattr(step_mod, "apply_temperature_scheme", poisoned)
    assert run_cli(tmp_path, "--train.steps", "6", "--train.name", "nan", "--eval.zeroshot", "false",
                   "--eval.retrieval", "false") == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 3" in err and "lower --optim.lr" in err
    assert len(updates) == 3  # steps 0..2 updated the weights; the NaN step did not


def test_existing_run_needs_resume_flag(tmp_path, capsys):
    assert run_cli(tmp_path, "--train.steps", "2", "--train.name", "x", "--eval.zeroshot", "false") == 0
    assert run_cli(tmp_path, "--train.steps", "2", "--train.name", "x") == 2
    assert "--train.resume latest" in capsys.readouterr().err


def test_export_round_trip(tmp_path):
    assert run_cli(tmp_path, "--train.steps", "3", "--train.name", "e", "--eval.retrieval", "false") == 0
    assert main(["export", str(tmp_path / "e"), "--out", str(tmp_path / "exp")]) == 0
    pt, js = tmp_path / "exp" / "micro-vit.pt", tmp_path / "exp" / "micro-vit.json"
    assert pt.is_file() and js.is_file()
    open_clip.add_model_config(js)
    model, _, preprocess = open_clip.create_model_and_transforms("micro-vit", pretrained=str(pt))
    ours = load_model_state(tmp_path / "e")["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ours[k]), k


def test_unknown_key_is_an_error(tmp_path, capsys):
    assert run_cli(tmp_path, "--train.stepz", "3") == 2
    err = capsys.readouterr().err
    assert "unknown key train.stepz" in err and "steps" in err


def test_missing_data_is_an_error_before_model(tmp_path, capsys):
    assert main(["train", "--data.source", "csv", "--data.train-path", str(tmp_path / "nope.csv"),
                 "--train.output-dir", str(tmp_path)]) == 2
    assert "nope.csv" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert main(["train", "--data.source", "wds", "--data.train-path", str(tmp_path / "empty"),
                 "--train.output-dir", str(tmp_path)]) == 2


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    from amorlip.data.writers import write_synthetic_csv

    # 48 pairs, 3 steps of 16: one epoch, so the one corrupt file is met exactly once
    csv_path = write_synthetic_csv(tmp_path / "csv", 48, 0)
    images = sorted((tmp_path / "csv").rglob("*.png"))
    images[0].write_bytes(b"garbage")
    assert run_cli(tmp_path, "--data.source", "csv", "--data.train-path", str(csv_path), "--train.steps", "3",
                   "--train.name", "c", "--eval.zeroshot", "false", "--eval.retrieval", "false") == 0
    skipped = json.loads((tmp_path / "c" / "summary.json").read_text())["data_skipped"]
    assert (skipped["skipped_corrupt"], skipped["corrupt_visits"], skipped["seen"]) == (1, 1, 48)
    assert skipped["summary"].endswith(f"first: {images[0]}")


def test_fused_adamw_is_the_default_and_takes_the_same_step():
    """optim.fused: None picks the fused kernel on the CPU, false torch's default one; one step of each from the
    same state agrees to float rounding."""
    from amorlip.config import build_config
    from amorlip.train_setup import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    cfg = build_config(None, [])
    assert cfg.optim.fused is None
    after = {}
    for fused in (None, False):
        cfg.optim.fused = fused
        copy = [p.detach().clone().requires_grad_() for p in model.parameters()]
        opt = build_optimizer([{"params": copy, "lr": 1e-2, "weight_decay": 0.1}], cfg, torch.device("cpu"))
        assert opt.defaults["fused"] is (True if fused is None else None)
        for p in copy:
            p.grad = torch.linspace(-1, 1, p.numel()).view_as(p)
        for _ in range(3):
            opt.step()
        after[fused] = copy
    # AdamW from its definition: with a constant gradient g the bias-corrected moments are g and g^2, so each
    # step decays p by (1 - lr * wd) and then moves it by lr * g / (|g| + eps)
    lr, wd, eps = 1e-2, 0.1, cfg.optim.eps
    for p0, a, b in zip(model.parameters(), after[None], after[False]):
        g = torch.linspace(-1, 1, p0.numel()).view_as(p0)
        expected = p0.detach().clone()
        for _ in range(3):
            expected = expected * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_eval_normalizers_logs_the_diagnostics_at_every_evaluation(tmp_path):
    """eval.normalizers: the diagnostics' keys at each eval_every row of metrics.jsonl (their curve) and in the
    final metrics; AmorLIP has its own estimate on both splits, and the training itself is unchanged."""
    common = ["--objective", "amorlip", "--train.steps", "4", "--train.eval-every", "2",
              "--eval.normalizer-size", "32"]
    assert run_cli(tmp_path, *common, "--train.name", "diag", "--eval.normalizers", "true") == 0
    assert run_cli(tmp_path, *common, "--train.name", "plain") == 0
    rows = [json.loads(line) for line in (tmp_path / "diag" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if any(k.startswith("eval/normalizer/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4]
    for split in ("train", "heldout"):
        for est in ("inbatch", "objective"):
            assert math.isfinite(evals[-1][f"eval/normalizer/{split}/{est}/image_mse"])
    summary = json.loads((tmp_path / "diag" / "summary.json").read_text())
    assert "normalizer/train/objective/text_bias" in summary["metrics"]
    plain = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in plain if "loss" in r]


def test_the_temperature_rate_and_step_thresh_are_logged(tmp_path):
    """metrics.jsonl carries the temperature group's own rate and the step_thresh flag, so the rule can be
    audited from the log: the rate of step t is lr_temperature / 3 exactly when the temperature after step t-1
    was at most 0.03 (rho 50 drives it there within two steps)."""
    assert run_cli(tmp_path, "--train.steps", "6", "--optim.lr-temperature", "0.5", "--optim.temperature-step-thresh",
                   "true", "--temperature.scheme", "rescaled", "--temperature.rho", "50", "--train.name", "t",
                   "--eval.zeroshot", "false", "--eval.retrieval", "false") == 0
    rows = [r for r in map(json.loads, (tmp_path / "t" / "metrics.jsonl").read_text().splitlines())
            if "lr_temperature" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    hit_before = 0.0
    for r in rows:
        assert r["lr_temperature"] == pytest.approx(0.5 / (3 if hit_before else 1)), r
        assert r["temp_thresh_hit"] == float(r["temperature"] <= 0.03), r
        hit_before = r["temp_thresh_hit"]
    assert {r["temp_thresh_hit"] for r in rows} == {0.0, 1.0}
