"""The `resolution` config section (RECLIP's schedule, `amorlip.reclip`) and the check of its phases: torch-free,
so that the config layer (`--help`, presets, validation) reads it without importing torch. `amorlip.reclip`
re-exports these names."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class ResolutionConfig:
    """The `resolution` config section (RECLIP schedule)."""

    phases: list[list[int | float | None]] = field(default_factory=list)
    """[[fraction, image_size(, context_length)], ...] in training order; fractions of the total steps sum to 1.
    The last phase must be at the model's native image size (the exported and finally evaluated model).
    context_length omitted or null = the model's native text context. Empty = native resolution throughout."""

    def validate(self) -> None:
        parse_phase_specs(self.phases)

    @property
    def enabled(self) -> bool:
        return bool(self.phases)


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def parse_phase_specs(specs: Sequence[Any]) -> list[tuple[float, int, int | None]]:
    """Check `[[fraction, image_size(, context_length)], ...]` and return it as tuples (ValueError when bad)."""
    if specs is None:
        return []
    if not isinstance(specs, (list, tuple)):
        raise ValueError(f"phases must be a list like [[0.9, 64], [0.1, 224]], got {specs!r}")
    out: list[tuple[float, int, int | None]] = []
    for i, spec in enumerate(specs):
        where = f"phase {i + 1} ({spec!r})"
        if not isinstance(spec, (list, tuple)) or len(spec) not in (2, 3):
            raise ValueError(f"{where}: each phase is [fraction, image_size] or [fraction, image_size, context_length]")
        frac = spec[0]
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not math.isfinite(frac) or frac <= 0:
            raise ValueError(f"{where}: the fraction of training must be a positive number")
        size = _as_int(spec[1], f"{where}: image_size")
        if size <= 0:
            raise ValueError(f"{where}: image_size must be positive")
        ctx = None
        if len(spec) == 3 and spec[2] is not None:
            ctx = _as_int(spec[2], f"{where}: context_length")
            if ctx < 2:
                raise ValueError(f"{where}: context_length must be at least 2 (start and end-of-text tokens)")
        out.append((float(frac), size, ctx))
    total = sum(f for f, _, _ in out)
    if out and abs(total - 1.0) > 1e-6:
        raise ValueError(
            f"the phase fractions sum to {total:g}, not 1; e.g. [[0.9, 64], [0.1, 224]] trains 90% of the steps "
            "at 64 px and the last 10% at 224 px"
        )
    return out
