"""Paths no other test reaches, each checked against a fact known independently of the code under test:
resume from a named checkpoint file, a run sized by epochs, gradient clipping's effect on the update,
resume-neutral settings, `pipe:` webdataset shards, SigLIP's initial bias in an export, torch.compile on the
CPU, the switch to rho_final in a real run, and a latched step_thresh carried across a resume."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import amorlip.train as train_mod
from amorlip.checkpoint import load_checkpoint
from amorlip.cli import main

TINY = ["--model.name", "micro-vit", "--data.synthetic-size", "256", "--train.batch-size", "16",
        "--optim.warmup-steps", "2", "--train.progress", "false", "--train.log-every", "1", "--train.threads", "1",
        "--eval.zeroshot", "false", "--eval.retrieval", "false"]


def run_cli(out: Path, *args: str) -> int:
    return main(["train", "--train.output-dir", str(out), *TINY, *args])


def rows_of(run_dir: Path) -> list[dict]:
    """metrics.jsonl's training rows (those with a loss)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def final_state(run_dir: Path) -> dict:
    files = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    return load_checkpoint(files[-1])


def count_steps(monkeypatch) -> list[int]:
    """Record the step index every optimizer step of the trainer starts from."""
    started: list[int] = []
    real = train_mod._train_step

    def counted(run, batch, epoch):
        started.append(run.step)
        return real(run, batch, epoch)

    monkeypatch.setattr(train_mod, "_train_step", counted)
    return started


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("amorlip train: error:")]


# --- 1: --train.resume PATH (a named checkpoint file, not the newest) ------------------------------------------


@pytest.mark.slow
def test_resume_from_a_named_checkpoint_file(tmp_path, monkeypatch, capsys):
    """A run stopped at step 4 with checkpoints at 2 and 4, resumed from step_2's file by its path: it trains
    exactly the steps 2..5 and ends bit-identical to an uninterrupted 6-step run."""
    common = ["--train.steps", "6", "--data.synthetic-size", "64", "--train.checkpoint-every", "2",
              "--train.keep-checkpoints", "10"]
    assert run_cli(tmp_path, *common, "--train.name", "straight") == 0
    assert run_cli(tmp_path, *common, "--train.name", "split", "--train.stop-at", "4") == 0
    ckdir = tmp_path / "split" / "checkpoints"
    assert sorted(p.name for p in ckdir.glob("step_*.pt")) == ["step_00000002.pt", "step_00000004.pt"]
    capsys.readouterr()
    started = count_steps(monkeypatch)
    named = ckdir / "step_00000002.pt"
    assert run_cli(tmp_path, *common, "--train.name", "split", "--train.resume", str(named)) == 0
    assert started == [2, 3, 4, 5]  # from the named file's step, not the newest checkpoint's (4)
    assert f"resumed from {named} at step 2" in capsys.readouterr().out
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the log holds each step once, and the resumed steps' losses are the uninterrupted run's
    straight, split = rows_of(tmp_path / "straight"), rows_of(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 7))
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]


# --- 2: a run sized by --train.epochs alone -----------------------------------------------------------------


def test_epochs_alone_sets_the_number_of_steps(tmp_path):
    """--train.epochs 2 without --train.steps: 50 samples in batches of 16 make 3 whole batches per epoch (the
    last partial batch of 2 is dropped), so 6 steps, epochs 0 and 1, and summary.json says 6."""
    assert run_cli(tmp_path, "--train.epochs", "2", "--data.synthetic-size", "50", "--train.name", "ep") == 0
    summary = json.loads((tmp_path / "ep" / "summary.json").read_text())
    assert summary["steps"] == 2 * (50 // 16) == 6
    rows = rows_of(tmp_path / "ep")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["epoch"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert final_state(tmp_path / "ep")["step"] == 6


# --- 3: gradient clipping's effect on the first update ------------------------------------------------------


def first_update(tmp_path: Path, monkeypatch, name: str, clip: str) -> tuple[list[torch.Tensor], float, dict]:
    """One step (lr at its peak from step 0, no weight decay): every parameter's change, the lr, the log row."""
    seen: dict[str, list[torch.Tensor]] = {}
    real = torch.optim.AdamW.step

    def recording(self, *a, **k):
        params = [p for g in self.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        result = real(self, *a, **k)
        seen["delta"] = [p.detach() - b for p, b in zip(params, before)]
        seen["lr"] = [g["lr"] for g in self.param_groups]
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    assert run_cli(tmp_path, "--train.steps", "1", "--optim.warmup-steps", "0", "--optim.weight-decay", "0",
                   "--optim.lr", "1e-3", "--optim.grad-clip", clip, "--train.name", name) == 0
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    assert set(seen["lr"]) == {1e-3}
    return seen["delta"], 1e-3, rows_of(tmp_path / name)[0]


@pytest.mark.slow
def test_grad_clip_bounds_the_first_update_and_logs_the_norm_before_clipping(tmp_path, monkeypatch):
    """AdamW's first step moves each parameter by lr * g / (|g| + eps) (bias-corrected moments g and g^2, eps
    1e-6). Unclipped, |g| >> eps for most entries, so they move by about lr. Clipped to a norm of 1e-6 every
    |g_i| < 1e-6 = eps, so no entry moves by lr / 2 or more and the whole update's norm lies between lr / 2 and lr.
    The logged grad_norm is the norm before clipping: the same for every threshold (nan with clipping off)."""
    free, lr, row_free = first_update(tmp_path, monkeypatch, "free", "0")
    huge, _, row_huge = first_update(tmp_path, monkeypatch, "huge", "1e9")
    tiny, _, row_tiny = first_update(tmp_path, monkeypatch, "tiny", "1e-6")
    eps = 1e-6
    assert math.isnan(row_free["grad_norm"])
    assert row_tiny["grad_norm"] == row_huge["grad_norm"] > 1e3 * eps  # not the clipped norm (<= 1e-6)
    # a threshold above the norm changes nothing: the same update as no clipping, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(free, huge))
    flat_free, flat_tiny = torch.cat([d.flatten() for d in free]), torch.cat([d.flatten() for d in tiny])
    assert not torch.equal(flat_free, flat_tiny)
    assert flat_free.abs().max() > 0.99 * lr
    assert flat_free.norm() > 100 * lr  # about lr * sqrt(number of entries with a gradient)
    assert flat_tiny.abs().max() < lr / 2
    # |g_i| <= eps, so lr |g_i| / (2 eps) <= |step_i| <= lr |g_i| / eps: the norm lies in [lr / 2, lr]
    assert 0.5 * lr * (1 - 1e-5) <= flat_tiny.norm() <= lr * (1 + 1e-5)


# --- 4: resume-neutral settings, and a structural one -------------------------------------------------------


@pytest.mark.slow
def test_resume_accepts_memory_and_loader_knobs_and_refuses_another_model(tmp_path, capsys):
    """train.accum_steps, optim.fused and (map-style data) data.workers are resume-neutral (amorlip.resume's
    NEUTRAL_KEYS, and data.workers for sources other than wds): a resume changing all three needs no
    --train.resume-allow-changes and reports no accepted change. Another model.name is refused, one line, exit 2,
    even with --train.resume-allow-changes all; the run folder is left as it was."""
    common = ["--train.steps", "4", "--data.synthetic-size", "64", "--train.name", "r"]
    assert run_cli(tmp_path, *common, "--train.stop-at", "2") == 0
    capsys.readouterr()
    assert run_cli(tmp_path, *common, "--train.resume", "latest", "--train.stop-at", "3", "--train.accum-steps", "2",
                   "--optim.fused", "false", "--data.workers", "1") == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2" in out and "changed settings" not in out
    assert final_state(tmp_path / "r")["step"] == 3
    log = (tmp_path / "r" / "metrics.jsonl").read_text()
    for allow in ([], ["--train.resume-allow-changes", "all"]):
        assert run_cli(tmp_path, *common, "--train.resume", "latest", "--model.name", "tiny-vit", *allow) == 2
        err = capsys.readouterr().err
        lines = error_lines(err)
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "model.name 'micro-vit' -> 'tiny-vit'" in lines[0] and "--train.name NEW_NAME" in lines[0]
        assert final_state(tmp_path / "r")["step"] == 3
        assert (tmp_path / "r" / "metrics.jsonl").read_text() == log


# --- 5: webdataset shards read through a pipe: url ------------------------------------------------------------


@pytest.mark.slow
def test_pipe_shards_train_like_the_same_local_shards(tmp_path, capsys):
    """`pipe:cat DIR/shard-{00000..00001}.tar`: a pipe url has no sizes.json to read, so without
    --data.dataset-size the run is refused before any step (one line naming the option); with it, the run
    trains on the bytes `cat` gives, the very samples of the local shards: the same losses step by step. A resume
    of webdataset training with another data.workers is refused."""
    shards = tmp_path / "shards"
    assert main(["data", "wds", "--out", str(shards), "--n", "64", "--shard-size", "32"]) == 0
    assert sorted(p.name for p in shards.glob("shard-*.tar")) == ["shard-00000.tar", "shard-00001.tar"]
    pipe = f"pipe:cat {shards}/shard-{{00000..00001}}.tar"
    wds = ["--data.source", "wds", "--train.steps", "3"]
    capsys.readouterr()
    assert run_cli(tmp_path, *wds, "--data.train-path", pipe, "--train.name", "nosize") == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "--data.dataset-size" in lines[0], lines
    assert not (tmp_path / "nosize" / "checkpoints").exists()
    assert run_cli(tmp_path, *wds, "--data.train-path", pipe, "--data.dataset-size", "64", "--train.name", "pipe") == 0
    assert run_cli(tmp_path, *wds, "--data.train-path", f"{shards}/shard-{{00000..00001}}.tar",
                   "--train.name", "local") == 0
    summary = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    assert summary["steps"] == 3
    pipe_rows, local_rows = rows_of(tmp_path / "pipe"), rows_of(tmp_path / "local")
    assert [r["step"] for r in pipe_rows] == [1, 2, 3]
    assert [r["loss"] for r in pipe_rows] == [r["loss"] for r in local_rows]
    # webdataset splits the shards over the loader's workers, so (unlike map-style data) data.workers is not
    # resume-neutral there: a changed count is refused, naming the key
    capsys.readouterr()
    assert run_cli(tmp_path, *wds, "--data.train-path", f"{shards}/shard-{{00000..00001}}.tar", "--train.name",
                   "local", "--train.resume", "latest", "--data.workers", "1") == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "data.workers 0 -> 1" in lines[0], lines


# --- 6: SigLIP's initial bias survives into an export -------------------------------------------------------


def test_siglip_export_carries_its_initial_bias(tmp_path, monkeypatch):
    """SigLIP starts from t' = log 10 and b = -10 (Zhai et al. 2023); open_clip builds micro-vit's own config
    without any bias. After one step at lr 5e-4 (warm-up step 1 of 2 at 1e-3) AdamW has moved each by at most
    about 5e-4, so the model `--train.export-final` writes, loaded by open_clip alone, has b within 1e-3 of -10:
    its JSON config asks for the bias (without it open_clip would refuse the state dict's logit_bias)."""
    import open_clip
    import open_clip.factory

    from amorlip.models import MODEL_CONFIG_DIR

    # open_clip's registry is process-wide: the exported config must not outlive this test
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIG_PATHS", list(open_clip.factory._MODEL_CONFIG_PATHS))
    own = json.loads((Path(MODEL_CONFIG_DIR) / "micro-vit.json").read_text())
    assert "init_logit_bias" not in own and open_clip.CLIP(**own).logit_bias is None
    assert run_cli(tmp_path, "--objective", "siglip", "--train.steps", "1", "--train.export-final", "true",
                   "--train.name", "sig") == 0
    export = tmp_path / "sig" / "export"
    pt, js = export / "micro-vit.pt", export / "micro-vit.json"
    assert json.loads((tmp_path / "sig" / "summary.json").read_text())["export"] == str(pt)
    assert json.loads(js.read_text())["init_logit_bias"] == pytest.approx(-10.0, abs=1e-3)
    open_clip.add_model_config(js)
    model = open_clip.create_model("micro-vit", pretrained=str(pt))
    assert model.logit_bias is not None
    assert float(model.logit_bias.detach().reshape(())) == pytest.approx(-10.0, abs=1e-3)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(10.0), abs=1e-3)


# --- 7: model.compile on the CPU ----------------------------------------------------------------------------

COMPILE = ["--train.steps", "2", "--data.synthetic-size", "64"]


def assert_like_eager(tmp_path: Path, name: str) -> None:
    """The compiled run `name` against an eager run of the same settings: its checkpoint holds the bare model's
    keys (loadable without torch.compile, no `_orig_mod.` prefix) and its losses agree to float rounding (the
    same initial weights and batches; fused kernels sum in another order)."""
    assert run_cli(tmp_path, *COMPILE, "--train.name", "eager") == 0
    compiled, eager = final_state(tmp_path / name), final_state(tmp_path / "eager")
    assert compiled["step"] == eager["step"] == 2
    assert list(compiled["model"]) == list(eager["model"])
    for a, b in zip(rows_of(tmp_path / name), rows_of(tmp_path / "eager")):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert json.loads((tmp_path / name / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_compile_wraps_the_model_and_saves_its_bare_weights(tmp_path, monkeypatch):
    """model.compile true through torch.compile's graph capture (TorchDynamo) with its eager backend, which runs
    the captured graph with torch's own kernels: the wrapper is in place (torch.compile was called on the model
    and gave an OptimizedModule) and the checkpoint and losses are an eager run's."""
    real = torch.compile
    wrapped: list[torch.nn.Module] = []

    def eager_backend(model, **kw):
        out = real(model, backend="eager")
        wrapped.append(out)
        return out

    monkeypatch.setattr(torch, "compile", eager_backend)
    assert run_cli(tmp_path, *COMPILE, "--model.compile", "true", "--train.name", "compiled") == 0
    assert len(wrapped) == 1 and isinstance(wrapped[0], torch._dynamo.eval_frame.OptimizedModule)
    monkeypatch.setattr(torch, "compile", real)
    torch._dynamo.reset()
    assert_like_eager(tmp_path, "compiled")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("AMORLIP_INDUCTOR_TEST"),
                    reason="opt-in (AMORLIP_INDUCTOR_TEST=1): inductor builds C++ kernels, about 2 minutes on 2 cores; "
                           "the eager-backend test covers the wrapping and the checkpoint")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="torch.compile's inductor backend needs a C++ compiler on the CPU (none found: g++ / $CXX)")
def test_compile_with_inductor_trains_on_the_cpu(tmp_path):
    """model.compile true as a user runs it (inductor, C++ kernels built by g++): 2 steps in a fresh process
    (the first compilation takes a minute or two on a small shared machine), then as an eager run."""
    cmd = [sys.executable, "-m", "amorlip.cli", "train", "--train.output-dir", str(tmp_path), *TINY, *COMPILE,
           "--train.device", "cpu", "--model.compile", "true", "--train.name", "compiled"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_like_eager(tmp_path, "compiled")

# --- 8: the switch to rho_final, crossed in a real run ------------------------------------------------------


@pytest.mark.parametrize("fraction, last", [("0.5", 4), ("0.3", 2)])
def test_rho_switches_to_rho_final_for_the_last_fraction_of_steps(tmp_path, fraction, last):
    """temperature.rho_final holds for the last rho_final_fraction of the steps (the nearest whole number of
    steps: 8 * 0.5 = 4, 8 * 0.3 = 2.4 -> 2) and rho before: metrics.jsonl's row of step k (the k-th update) logs
    the rho that update used, 6.5 for the first 8 - last rows and -8 for the last ones, and the rescaled loss
    it back-propagated is L / s + rho / s with that rho."""
    assert run_cli(tmp_path, "--train.steps", "8", "--temperature.scheme", "rescaled", "--temperature.rho", "6.5",
                   "--temperature.rho-final", "-8", "--temperature.rho-final-fraction", fraction,
                   "--train.name", "rho") == 0
    rows = rows_of(tmp_path / "rho")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["rho"] for r in rows] == [6.5] * (8 - last) + [-8.0] * last
    # each update's loss is L / s + rho / s with its own rho, s = exp(logit_scale) as the update before left it
    # (open_clip's initial 1 / 0.07 for the first)
    scale = 1 / 0.07
    for r in rows:
        assert r["loss"] == pytest.approx((r["objective_loss"] + r["rho"]) / scale, rel=1e-5), r
        scale = math.exp(r["logit_scale"])


# --- 9: step_thresh latched across a resume ----------------------------------------------------------------


def test_latched_step_thresh_travels_in_the_checkpoint(tmp_path):
    """step_thresh divides the temperature's lr by 3 once T <= 0.03. From T = 0.028 (a pretrained file with that
    logit_scale) at lr_temperature 0.05, the first update leaves T = 0.0294 (hit), and T rises past 0.03 after the
    third. Re-checked, the lr goes back to 0.05 from step 4; latched, it stays 0.05 / 3 to the end, a flag no
    longer visible in the weights (T > 0.03): it must come from the checkpoint. Stopped at 5 (T = 0.031) and
    resumed, the latched run logs the same lr per step and ends bit-identical to the uninterrupted one."""
    from amorlip.models import create_model

    model, *_ = create_model("micro-vit")
    state = model.state_dict()
    state["logit_scale"] = torch.tensor(math.log(1 / 0.028))
    torch.save(state, tmp_path / "init.pt")
    common = ["--objective", "clip", "--model.pretrained", str(tmp_path / "init.pt"), "--train.steps", "8",
              "--optim.temperature-step-thresh", "true", "--optim.lr-temperature", "0.05"]
    latched = [*common, "--optim.temperature-step-thresh-latch", "true"]
    assert run_cli(tmp_path, *common, "--train.name", "rechecked") == 0
    assert run_cli(tmp_path, *latched, "--train.name", "straight") == 0
    assert run_cli(tmp_path, *latched, "--train.name", "split", "--train.stop-at", "5") == 0
    saved = final_state(tmp_path / "split")
    assert saved["step"] == 5 and saved["temp_thresh_hit"] is True
    assert 1 / math.exp(float(saved["model"]["logit_scale"])) > 0.03  # the weights alone would say "not hit"
    assert run_cli(tmp_path, *latched, "--train.name", "split", "--train.resume", "latest") == 0

    def temperature_lrs(name: str) -> list[float]:
        return [r["lr_temperature"] for r in rows_of(tmp_path / name)]

    third = 0.05 / 3
    assert temperature_lrs("rechecked") == pytest.approx([0.05, third, third] + [0.05] * 5)
    assert temperature_lrs("straight") == pytest.approx([0.05] + [third] * 7)
    assert temperature_lrs("split") == temperature_lrs("straight")
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
