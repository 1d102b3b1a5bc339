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


class PlainCounter:
    """tqdm's `update` / `set_postfix` / `close` for a non-TTY: a plain line `DESC: DONE/TOTAL (PCT%) ...` at most
    every `every_s` seconds, and one when closed, instead of a bar's carriage-return frames."""

    def __init__(self, total: int | None, desc: str, stream: Any = None, every_s: float = 30.0) -> None:
        self.total, self.desc, self.stream, self.every_s = total, desc, stream or sys.stderr, every_s
        self.n, self.postfix = 0, ""
        self.t0 = self._last = time.perf_counter()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self._last >= self.every_s:
            self._print()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print()

    def _print(self) -> None:
        self._last = now = time.perf_counter()
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        tail = f" | {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} | {_eta(now - self.t0)} elapsed{tail}", file=self.stream, flush=True)


class _Silent:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **values: Any) -> None: ...
    def close(self) -> None: ...


def counter(total: int | None, desc: str, disable: bool = False, every_s: float = 30.0) -> Any:
    """A progress counter on stderr: a tqdm bar on a terminal, `PlainCounter` lines elsewhere, nothing if `disable`."""
    if disable:
        return _Silent()
    if getattr(sys.stderr, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr, leave=False)
    return PlainCounter(total, desc, every_s=every_s)


def iterate(items: Any, desc: str, enabled: bool = True, total: int | None = None, every_s: float = 30.0) -> Any:
    """Yield from `items`, counting them on a `counter` (its total: `total`, else `len(items)` when it has one)."""
    if total is None:
        try:
            total = len(items)
        except TypeError:  # no length (an iterable dataset's loader)
            total = None
    bar = counter(total, desc, disable=not enabled, every_s=every_s)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
