"""Every user mistake is one line `amorlip <cmd>: error: <what> (<how to fix>)` on stderr, exit status 2, before any
work is done or any file is written, and never a traceback.

A few cases run the real CLI in a subprocess (the process contract: exit status, stderr, no traceback); the
rest call `amorlip.cli.main` in-process, which runs the same code path without paying ~10 s of imports each.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amorlip.cli import main
from amorlip.config import ConfigError, build_config, preset_names

TINY = ["--model.name", "micro-vit", "--data.synthetic-size", "64", "--data.val-size", "16", "--data.eval-size", "16",
        "--train.batch-size", "8", "--optim.warmup-steps", "1", "--train.progress", "false", "--train.threads", "1",
        "--eval.zeroshot", "false", "--eval.retrieval", "false"]

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} if root.exists() else set()


def assert_one_line_error(err: str, command: str, *names: str, fix: bool = True) -> None:
    """One line `amorlip COMMAND: error: ...` naming `names`; with `fix`, it ends in the parenthesised fix."""
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"amorlip {command}: error: "), err
    assert "Traceback" not in err
    if fix:
        assert lines[0].endswith(")"), f"no (how to fix) at the end: {err}"
    for name in names:  # (a key may be spelt with dashes or underscores)
        assert name.replace("_", "-") in lines[0].replace("_", "-"), (name, err)


def run_main(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # a parser's own error exit
        rc = e.code
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    return captured.err


def run_subprocess(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amorlip.cli", *argv], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A finished 2-step run (its folder holds a checkpoint for eval and export)."""
    root = tmp_path_factory.mktemp("badinput")
    assert main(["train", "--train.output-dir", str(root), "--train.name", "r", "--train.steps", "2", *TINY]) == 0
    return root / "r"


@pytest.fixture(scope="module")
def exported(run_folder) -> Path:
    out = run_folder.parent / "exp"
    assert main(["export", str(run_folder), "--out", str(out)]) == 0
    return out / "micro-vit.pt"


# ----------------------------------------------------------------------------------------------------
# The process contract, through the real CLI in a subprocess

SUBPROCESS_TRAIN = {
    "log_every_0": (["--train.log-every", "0"], "train.log_every"),
    "unknown_model": (["--model.name", "tiny-vt"], "model.name"),
}


@pytest.mark.parametrize("case", list(SUBPROCESS_TRAIN))
def test_train_subprocess(tmp_path, case):
    args, key = SUBPROCESS_TRAIN[case]
    runs = tmp_path / "runs"
    r = run_subprocess(["train", "--train.output-dir", str(runs), *args], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert_one_line_error(r.stderr, "train", key)
    assert not runs.exists()


def test_compare_bad_seed_subprocess(tmp_path):
    out = tmp_path / "cmp"
    r = run_subprocess(["compare", "--seeds", "0,x", "--out", str(out)], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert_one_line_error(r.stderr, "compare", "--seeds", "'x'")
    assert not out.exists()


@pytest.mark.slow
def test_eval_and_export_subprocess(tmp_path, run_folder):
    before = files_under(run_folder.parent)
    r = run_subprocess(["eval", str(run_folder), "--datacomp", str(tmp_path / "no-such-root")], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert_one_line_error(r.stderr, "eval", "--datacomp", "does not exist")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = run_subprocess(["export", str(run_folder), "--out", str(blocker / "model.pt")], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert_one_line_error(r.stderr, "export", str(blocker))
    assert files_under(run_folder.parent) == before
    assert sorted(tmp_path.iterdir()) == [blocker]


# ----------------------------------------------------------------------------------------------------
# train: every rejected value, in-process

TRAIN_CASES = [
    (["--train.log-every", "0"], "train.log_every"),
    (["--train.checkpoint-every", "-1"], "train.checkpoint_every"),
    (["--train.checkpoint-minutes", "-5"], "train.checkpoint_minutes"),
    (["--train.keep-checkpoints", "-1"], "train.keep_checkpoints"),
    (["--train.eval-every", "-10"], "train.eval_every"),
    (["--train.stop-at", "-1"], "train.stop_at"),
    (["--train.stop-at", "0"], "train.stop_at"),
    (["--train.steps", "10", "--train.stop-at", "11"], "train.stop_at"),
    (["--train.threads", "-2"], "train.threads"),
    (["--train.steps", "0"], "train.steps"),
    (["--train.steps", "none", "--train.epochs", "0"], "train.epochs"),
    (["--train.steps", "none"], "train.epochs"),
    (["--train.batch-size", "1"], "train.batch_size"),
    (["--train.device", "gpu"], "train.device"),
    (["--model.name", "ViT-B-33"], "model.name"),
    (["--model.precision", "fp8"], "model.precision"),
    (["--optim.beta1", "-0.1"], "optim.beta1"),
    (["--optim.beta2", "1.0"], "optim.beta2"),
    (["--optim.beta2", "nan"], "optim.beta2"),
    (["--optim.eps", "0"], "optim.eps"),
    (["--optim.eps=-1e-8"], "optim.eps"),
    (["--optim.weight-decay", "-0.1"], "optim.weight_decay"),
    (["--optim.warmup-steps", "-1"], "optim.warmup_steps"),
    (["--optim.grad-clip", "-1"], "optim.grad_clip"),
    (["--optim.lr", "0"], "optim.lr"),
    (["--optim.lr", "inf"], "optim.lr"),
    (["--optim.lr-temperature", "0"], "optim.lr_temperature"),
    (["--optim.lr-temperature=-1e-4"], "optim.lr_temperature"),
    (["--temperature.scheme", "fancy"], "temperature.scheme"),
    (["--temperature.rho-final-fraction", "0"], "temperature.rho_final_fraction"),
    (["--data.dataset-size", "0"], "data.dataset_size"),
    (["--data.dataset-size", "-5"], "data.dataset_size"),
    (["--data.workers", "-1"], "data.workers"),
    (["--data.synthetic-size", "0"], "data.synthetic_size"),
    (["--data.val-size", "-1"], "data.val_size"),
    (["--data.eval-size", "0"], "data.eval_size"),
    (["--data.source", "parquet"], "data.source"),
    (["--data.source", "csv"], "data.train-path"),
    (["--eval.batch-size", "0"], "eval.batch_size"),
    (["--objective", "fastclip", "--fastclip.version", "3", "--temperature.scheme", "plain"],
     "--temperature.scheme rescaled"),
    (["--config", "tiny-fastclip", "--temperature.scheme", "plain"], "--temperature.scheme rescaled"),
]

# errors raised while the command line is read (their wording is the parser's): still one line, nothing written
PARSE_CASES = [
    (["--train.log-every"], "--train.log-every"),
    (["--train.log-every", "often"], "train.log_every"),
    (["--train.logevery", "5"], "train.logevery"),
    (["--objective", "nope"], "nope"),
    (["--objective", "fastclip", "--fastclip.version", "2", "--temperature.scheme", "rescaled"], "fastclip.version"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args,key", TRAIN_CASES, ids=[" ".join(a) for a, _ in TRAIN_CASES])
def test_train_rejects_before_writing(tmp_path, capsys, args, key):
    runs = tmp_path / "runs"
    err = run_main(capsys, ["train", "--train.output-dir", str(runs), *args])
    assert_one_line_error(err, "train", key)
    assert not runs.exists()


@pytest.mark.parametrize("args,key", PARSE_CASES, ids=[" ".join(a) for a, _ in PARSE_CASES])
def test_train_parse_errors_are_one_line(tmp_path, capsys, args, key):
    runs = tmp_path / "runs"
    err = run_main(capsys, ["train", "--train.output-dir", str(runs), *args])
    assert_one_line_error(err, "train", key, fix=False)
    assert not runs.exists()


@no_cuda
def test_train_cuda_without_gpu(tmp_path, capsys):
    runs = tmp_path / "runs"
    err = run_main(capsys, ["train", "--train.output-dir", str(runs), "--train.device", "cuda"])
    assert_one_line_error(err, "train", "train.device", "--train.device cpu")
    assert not runs.exists()


def test_train_output_dir_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    err = run_main(capsys, ["train", "--train.output-dir", str(blocker / "runs")])
    assert_one_line_error(err, "train", "train.output_dir", "is a file")
    err = run_main(capsys, ["train", "--train.output-dir", str(blocker)])
    assert_one_line_error(err, "train", "train.output_dir", "is a file")
    assert sorted(tmp_path.iterdir()) == [blocker]


def test_train_unwritable_output_dir(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes anywhere: pretend the folder is read-only as it is for anyone else
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real(p, mode, **kw))
    try:
        err = run_main(capsys, ["train", "--train.output-dir", str(locked / "runs")])
        assert_one_line_error(err, "train", "train.output_dir", "cannot write")
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("args", [
    ["--train.checkpoint-every", "0", "--train.keep-checkpoints", "0", "--train.eval-every", "0",
     "--train.threads", "0", "--optim.grad-clip", "0", "--optim.warmup-steps", "0", "--optim.weight-decay", "0",
     "--train.checkpoint-minutes", "0", "--data.workers", "0", "--optim.beta1", "0"],
    ["--train.steps", "10", "--train.stop-at", "10"],
    ["--train.steps", "none", "--train.epochs", "2", "--train.stop-at", "1000"],
    ["--objective", "fastclip", "--temperature.scheme", "rescaled"],
    ["--objective", "fastclip"],  # temperature.scheme auto: rescaled for FastCLIP-v3
    ["--objective", "fastclip", "--fastclip.version", "0"],
    ["--objective", "fastclip", "--fastclip.version", "1"],
    ["--optim.lr-temperature", "none", "--data.dataset-size", "none", "--train.stop-at", "none"],
    ["--temperature.rho-final", "-8.5"],
])
def test_boundary_values_are_accepted(args):
    from amorlip.config import parse_overrides

    build_config(None, parse_overrides(args))


def test_every_preset_still_validates():
    bad = {}
    for name in preset_names():
        try:
            build_config(name)
        except ConfigError as e:
            bad[name] = str(e)
    assert not bad


# ----------------------------------------------------------------------------------------------------
# eval / export / compare, in-process


def eval_cases(tmp_path: Path, exported: Path) -> list[tuple[list[str], tuple[str, ...]]]:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    (tmp_path / "empty-root").mkdir()
    cases = [
        (["--datacomp", str(tmp_path / "missing")], ("--datacomp", "does not exist")),
        (["--datacomp", str(blocker)], ("--datacomp", "not a folder")),
        (["--datacomp", str(tmp_path / "empty-root")], ("--datacomp", "holds none")),
        (["--datacomp", str(tmp_path / "empty-root"), "--datacomp-tasks", "vtab/nope"], ("--datacomp-tasks",)),
        (["--datacomp-tasks", "vtab/cifar10"], ("--datacomp-tasks", "--datacomp ROOT")),
        (["--batch-size", "0"], ("--batch-size",)),
        (["--device", "tpu"], ("--device",)),
        (["--data", "imagenet"], ("--data",)),
        (["--model", "ViT-B-33"], ("--model",)),
        (["--out", str(blocker / "eval.json")], ("--out", "is a file")),
        (["--out", str(tmp_path)], ("--out", "is a folder")),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], ("--device cuda", "--device cpu")))
    return cases


@pytest.mark.slow
def test_eval_rejects_before_evaluating(tmp_path, capsys, run_folder, exported):
    watched = run_folder.parent
    before = files_under(watched)
    for args, names in eval_cases(tmp_path, exported):
        err = run_main(capsys, ["eval", str(run_folder), *args])
        assert_one_line_error(err, "eval", *names)
        assert "--train." not in err, "eval's advice must name eval's own flags"
    err = run_main(capsys, ["eval", str(exported), "--normalizers"])
    assert_one_line_error(err, "eval", "--normalizers")
    assert files_under(watched) == before, "eval wrote files although it refused to run"
    assert not (run_folder / "eval.json").exists()


def test_export_rejects_before_writing(tmp_path, capsys, monkeypatch, run_folder, exported):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    folder_pt = tmp_path / "dir.pt"
    folder_pt.mkdir()
    before = files_under(run_folder.parent)
    for out, names in [
        (blocker / "model.pt", (str(blocker), "is a file")),
        (blocker / "sub" / "model.pt", (str(blocker), "is a file")),
        (blocker, (str(blocker), "is a file")),
        (folder_pt, ("is a folder",)),
    ]:
        err = run_main(capsys, ["export", str(run_folder), "--out", str(out)])
        assert_one_line_error(err, "export", *names)
    err = run_main(capsys, ["export", str(exported), "--out", str(tmp_path / "again")])
    assert_one_line_error(err, "export", "not an amorlip training checkpoint")
    err = run_main(capsys, ["export", str(tmp_path / "no-run"), "--out", str(tmp_path / "x")])
    assert_one_line_error(err, "export", "no-run", fix=False)

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real(p, mode, **kw))
    try:
        err = run_main(capsys, ["export", str(run_folder), "--out", str(locked / "sub")])
        assert_one_line_error(err, "export", "not writable")
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o700)
    assert files_under(run_folder.parent) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "dir.pt", "locked"]
    assert not any(folder_pt.iterdir())


@pytest.mark.parametrize("seeds,names", [("0,x", ("'x'",)), (",", ("names no seed",)), ("1,1", ("repeats",)),
                                         ("0,1.5", ("'1.5'",))])
def test_compare_bad_seeds(tmp_path, capsys, seeds, names):
    out = tmp_path / "cmp"
    err = run_main(capsys, ["compare", "--seeds", seeds, "--out", str(out)])
    assert_one_line_error(err, "compare", "--seeds", *names)
    assert not out.exists()
