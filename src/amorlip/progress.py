"""What a training run prints while it runs: a tqdm bar on a terminal, plain lines anywhere else.

On a non-TTY (a log file, SLURM's output, a pipe) a bar's carriage-return frames pile up on one line, so
there one line is printed every `train.log_every` steps instead, like open_clip's:

    step 20/600 (3.3%) epoch 0 | loss 3.9121 | lr 1.00e-03 | T 0.0700 | 312 samples/s | ETA 0:02:13
"""
from __future__ import annotations

import datetime
import sys
import time
from typing import Any


def _eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


class Progress:
    """`update(step, values)` after every step; `values` (loss, lr, temperature, samples/s) when logged."""

    def __init__(self, total: int, initial: int, desc: str, bar: bool | None = None, stream: Any = None) -> None:
        self.total, self.initial, self.stream = total, initial, stream or sys.stdout
        self.t0 = time.perf_counter()
        use_bar = bar if bar is not None else bool(getattr(sys.stderr, "isatty", lambda: False)())
        self.bar = None
        if use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, step: int, values: dict[str, Any] | None = None) -> None:
        if self.bar is not None:
            if values:
                self.bar.set_postfix(loss=f"{values['loss']:.3f}", T=f"{values['temperature']:.3f}",
                                     sps=f"{values['samples_per_s']:.0f}")
            self.bar.update(1)
            return
        if values:
            print(self.line(step, values), file=self.stream, flush=True)

    def line(self, step: int, values: dict[str, Any]) -> str:
        done = step - self.initial
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        return (f"step {step}/{self.total} ({100 * step / self.total:.1f}%) epoch {values['epoch']} | "
                f"loss {values['loss']:.4f} | lr {values['lr']:.2e} | T {values['temperature']:.4f} | "
                f"{values['samples_per_s']:.0f} samples/s | ETA {_eta(eta) if eta == eta else '?'}")

    def write(self, text: str) -> None:
        """A message that does not break the bar."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
