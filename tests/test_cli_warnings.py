"""Warnings on the command line are one line naming the command, not Python's source path and line."""
import subprocess
import sys
import warnings

from amorlip import cli


def test_warning_line_names_the_command_and_the_library():
    fmt = cli.warning_line("train")
    ours = fmt("a whole batch was unusable", UserWarning, "/x/src/amorlip/data/samples.py", 288, "warnings.warn(...)")
    assert ours == "amorlip train: warning: a whole batch was unusable\n"
    theirs = fmt("old API", FutureWarning, "/venv/lib/python3.11/site-packages/torch/nn/modules/module.py", 12)
    assert theirs == "amorlip train: warning: old API (FutureWarning from torch)\n"
    assert cli.warning_line(None)("m", UserWarning, "/a/b.py", 1).startswith("amorlip: warning: m (UserWarning from b)")


def test_main_formats_warnings_while_a_command_runs(monkeypatch):
    seen = []
    monkeypatch.setitem(cli.OWN_PARSERS, "train", lambda words: seen.append(warnings.formatwarning) or 0)
    before = warnings.formatwarning
    assert cli.main(["train"]) == 0
    assert seen[0]("m", UserWarning, "/src/amorlip/x.py", 1) == "amorlip train: warning: m\n"
    assert warnings.formatwarning is before  # restored after the command


def test_a_real_warning_in_a_subprocess_has_no_source_path():
    code = ("import sys, warnings; from amorlip import cli; cli.OWN_PARSERS['bench'] = "
            "lambda w: warnings.warn('slow disk') or 0; sys.exit(cli.main(['bench']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "amorlip bench: warning: slow disk (UserWarning from <string>)\n"
