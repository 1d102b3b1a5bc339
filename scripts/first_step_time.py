"""Time from launching `amorlip train` to its first training step, as a user sees it (issue: a lean, fast start).

Runs `amorlip train --config tiny-demo --train.steps 1` (plus any words after `--`) REPEATS times in a fresh
temporary folder and prints, per launch and as median [min, max], the seconds from the launch to the line
`step 1/...` and to the process's exit. The first launch after an install or a reboot also pays the disk cache.

    python scripts/first_step_time.py --repeats 5
    python scripts/first_step_time.py --repeats 3 -- --model.name micro-vit
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def launch(amorlip: list[str], out: Path, name: str, extra: list[str]) -> tuple[float, float]:
    """(seconds to the first step's line, seconds to exit) of one launch."""
    cmd = [*amorlip, "train", "--config", "tiny-demo", "--train.steps", "1", "--train.output-dir", str(out),
           "--train.name", name, *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if first is None and line.startswith("step 1/"):
            first = time.perf_counter() - start
    if proc.wait() != 0 or first is None:
        sys.exit("first_step_time.py: error: the run failed:\n" + "".join(lines[-20:]))
    return first, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("extra", nargs="*", help="more `amorlip train` words (after --)")
    args = parser.parse_args()
    amorlip = [sys.executable, "-m", "amorlip.cli"]
    out = Path(tempfile.mkdtemp(prefix="first-step-"))
    try:
        firsts, ends = [], []
        for k in range(args.repeats):
            first, end = launch(amorlip, out, f"r{k}", args.extra)
            firsts.append(first)
            ends.append(end)
            print(f"launch {k + 1}: first step at {first:.2f} s, exit at {end:.2f} s", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    for label, values in (("first step", firsts), ("exit", ends)):
        print(f"{label}: median {statistics.median(values):.2f} s [{min(values):.2f}, {max(values):.2f}] "
              f"over {len(values)} launches")


if __name__ == "__main__":
    main()
