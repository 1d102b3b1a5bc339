"""Intervals over seeds: the Student t 95% interval of a mean, and paired differences between two entries.

With n seeds the interval is mean ± t_{0.975, n-1} * sd / sqrt(n) (sd: the sample standard deviation, n - 1
in the denominator). A paired difference takes the seeds two entries share (same seed = same data order and
initialisation), differences them seed by seed, and gives that mean and interval: the seed-to-seed spread
that both entries share cancels, so it is the sharper test of "is A better than B here".
No scipy: the 97.5% quantiles for 1..30 degrees of freedom are tabulated, beyond that a Cornish-Fisher
expansion around the normal quantile is exact to 1e-5.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Mapping

# t_{0.975, df} for df = 1..30 (scipy.stats.t.ppf(0.975, df), 6 decimals)
T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
        2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
        2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
Z975 = 1.959963984540054

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no difference measured"


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"t quantile needs at least 1 degree of freedom, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975  # Cornish-Fisher (Abramowitz & Stegun 26.7.5), three terms
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


@dataclass(frozen=True)
class Interval:
    """Mean of `n` values and its 95% t interval (`half` is None for one value: no interval)."""

    n: int
    mean: float
    sd: float | None
    half: float | None

    @property
    def low(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    @property
    def high(self) -> float | None:
        return None if self.half is None else self.mean + self.half


def mean_interval(values: Iterable[float]) -> Interval:
    """mean ± t_{0.975, n-1} * sd / sqrt(n); for one value the mean alone."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_interval of no values")
    if len(vals) == 1:
        return Interval(1, vals[0], None, None)
    sd = statistics.stdev(vals)
    return Interval(len(vals), statistics.fmean(vals), sd, t975(len(vals) - 1) * sd / math.sqrt(len(vals)))


def paired_difference(values: Mapping[int, float], reference: Mapping[int, float]) -> Interval | None:
    """`values - reference` over the seeds (keys) both have: mean and 95% interval; None when none is shared."""
    shared = [s for s in values if s in reference]
    if not shared:
        return None
    return mean_interval(values[s] - reference[s] for s in shared)


def verdict(diff: Interval | None, higher_is_better: bool = True) -> str:
    """better / worse when the 95% interval of the difference excludes 0, else "no difference measured"
    (also with a single shared seed: one pair gives no interval)."""
    if diff is None or diff.half is None:
        return NO_DIFFERENCE
    if diff.low > 0:
        return BETTER if higher_is_better else WORSE
    if diff.high < 0:
        return WORSE if higher_is_better else BETTER
    return NO_DIFFERENCE
