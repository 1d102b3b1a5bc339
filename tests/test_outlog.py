"""RUN/out.log holds everything `amorlip train` printed (amorlip.outlog); mid-run evaluations are printed too."""
import pytest

from amorlip.cli import main

TINY = ["--model.name", "micro-vit", "--data.synthetic-size", "64", "--data.val-size", "16", "--data.eval-size", "16",
        "--train.batch-size", "8", "--optim.warmup-steps", "1", "--train.progress", "false", "--train.threads", "1",
        "--train.log-every", "2"]


@pytest.mark.slow
def test_out_log_keeps_what_was_printed_including_mid_run_evaluations(tmp_path, capsys):
    assert main(["train", "--train.output-dir", str(tmp_path), "--train.name", "r", *TINY, "--train.steps", "4",
                 "--train.eval-every", "2"]) == 0
    captured = capsys.readouterr()
    log = (tmp_path / "r" / "out.log").read_text()
    assert log.splitlines()[0] == f"run folder: {tmp_path / 'r'}"  # held until the folder existed, then written
    assert log == captured.out + captured.err or sorted(log.splitlines()) == sorted(
        (captured.out + captured.err).splitlines())  # (stdout and stderr interleave in the file)
    evals = [line for line in captured.out.splitlines() if line.startswith("eval at step")]
    assert len(evals) == 1 and evals[0].startswith("eval at step 2: zeroshot/mean_top1 ") and "retrieval/mean_R@1" in evals[0]
    assert [line.split()[1] for line in log.splitlines() if line.startswith("step ")] == ["2/4", "4/4"]


@pytest.mark.slow
def test_out_log_ends_with_the_error_line_and_a_resume_appends(tmp_path, capsys):
    args = ["train", "--train.output-dir", str(tmp_path), "--train.name", "r", *TINY, "--train.steps", "2"]
    assert main(args) == 0
    first = (tmp_path / "r" / "out.log").read_text()
    capsys.readouterr()
    assert main([*args, "--train.resume", "latest", "--train.steps", "20", "--optim.lr", "1e5",
                 "--train.resume-allow-changes", "train.steps,optim.lr"]) == 1  # diverges
    err = capsys.readouterr().err
    log = (tmp_path / "r" / "out.log").read_text()
    assert log.startswith(first)
    error = [line for line in err.splitlines() if line.startswith("amorlip train: error:")]
    assert len(error) == 1 and log.rstrip("\n").splitlines()[-1] == error[0]


def test_bad_input_writes_no_out_log(tmp_path, capsys):
    assert main(["train", "--train.output-dir", str(tmp_path), "--train.name", "r", *TINY, "--train.steps", "0"]) == 2
    assert not (tmp_path / "r").exists()


def test_tee_leaves_bar_frames_out_and_restores_the_streams(tmp_path):
    import io
    import sys

    from amorlip.outlog import OutLog, attach

    before = sys.stdout
    sys.stdout = buf = io.StringIO()
    try:
        with OutLog():
            print("held")
            sys.stdout.write("\r 10%|#   |")
            attach(tmp_path / "out.log")
            print("kept")
        assert sys.stdout is buf
    finally:
        sys.stdout = before
    assert (tmp_path / "out.log").read_text() == "held\nkept\n"
    assert buf.getvalue() == "held\n\r 10%|#   |kept\n"
    attach(tmp_path / "other.log")  # no OutLog active: nothing
    assert not (tmp_path / "other.log").exists()
