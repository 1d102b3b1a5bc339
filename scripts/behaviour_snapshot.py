"""Print what a refactoring must leave unchanged: every help text, every preset's resolved configuration and run
hash, and the one-line error of every rejected input that the tests list.

Run it before and after a change and compare the two files:

    python scripts/behaviour_snapshot.py > /tmp/before.txt   # on the old commit
    python scripts/behaviour_snapshot.py > /tmp/after.txt    # on the new one
    diff /tmp/before.txt /tmp/after.txt && echo unchanged

Everything runs in this process (`amorlip.cli.main`), with a fixed terminal width, so the output depends only on
the code and the installed library versions.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ["COLUMNS"] = "100"

from amorlip import cli  # noqa: E402
from amorlip.config import build_config, parse_overrides, preset_names  # noqa: E402
from amorlip.resume import config_hash  # noqa: E402


def call(words: list[str]) -> str:
    """`amorlip WORDS` in this process: exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(words)
        except SystemExit as e:
            rc = e.code
    return f"$ amorlip {' '.join(words)}\n[exit {rc}]\n{out.getvalue()}{err.getvalue()}"


def helps() -> list[list[str]]:
    words = [["--help"], ["train", "--help"], ["compare", "--help"], ["eval", "--help"], ["export", "--help"],
             ["data", "--help"], ["presets", "--help"], ["models", "--help"], ["bench", "--help"], ["presets"],
             ["models"]]
    return words + [["bench", what, "--help"] for what in cli.BENCH_COMMANDS]


def presets() -> list[str]:
    blocks = []
    for name in preset_names():
        cfg = build_config(name, {})
        blocks.append(f"== preset {name}: run hash {config_hash(cfg.to_dict())}")
        blocks.append(call(["train", "--config", name, "--print-config"]))
    return blocks


def errors(out_dir: str) -> list[list[str]]:
    import test_bad_input as bad

    cases = [args for args, _ in bad.TRAIN_CASES + bad.PARSE_CASES]
    cases += [["--objective", "amorlip", "--amor.dim-factor", "0"], ["--objective", "sogclr", "--sogclr.gamma", "2"],
              ["--objective", "siglip", "--siglip.init-logit-bias", "nan"], ["--train.name", "a/b"],
              ["--objective", "neuclip", "--neuclip.lr", "0"], ["--resolution.phases", "x"]]
    words = [["train", "--train.output-dir", out_dir, *args] for args in cases]
    words += [["compare", "--seeds", "0,x", "--out", out_dir], ["compare", "--objectives", "clip,nope", "--out", out_dir],
              ["compare", "--sweep", "train.nope=1,2", "--out", out_dir], ["bench", "nope"],
              ["eval", str(Path(out_dir) / "missing")], ["data", "csv", "--n", "0", "--out", out_dir + "/d"],
              ["export", str(Path(out_dir) / "missing")], ["presets", "nope"]]
    return words


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        blocks = [call(w) for w in helps()] + presets() + [call(w) for w in errors(tmp)]
    text = "\n".join(blocks).replace(tmp, "TMP")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
