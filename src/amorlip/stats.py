"""Statistics: the Student t 95% interval of a mean over seeds and paired differences between two entries
(compare, crossing), and paired block ratios of step times (bench).

With n seeds the interval is mean ± t_{0.975, n-1} * sd / sqrt(n) (sd: the sample standard deviation, n - 1
in the denominator). A paired difference takes the seeds two entries share (same seed = same data order and
initialisation), differences them seed by seed, and gives that mean and interval: the seed-to-seed spread
that both entries share cancels, so it is the sharper test of "is A better than B here".
No scipy: the 97.5% quantiles for 1..30 degrees of freedom are tabulated, beyond that a Cornish-Fisher
expansion around the normal quantile is exact to 1e-5.

The benchmarks time variants side by side, step after step; `paired_stats` cuts each variant's step times into
blocks (`bench.common.block_length`: the same mix of cheap and expensive steps in each), and gives the median
block mean and the median of the per-block ratios to the reference, with their quartiles: drift that all
variants share cancels in the ratio.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

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


def sd_of_interval(half: float, n: int) -> float:
    """The per-seed standard deviation behind a 95% t interval of half-width `half` over `n` >= 2 values."""
    return half * math.sqrt(n) / t975(n - 1)


def seeds_for_half_width(sd: float, target: float, most: int = 1000) -> int | None:
    """The fewest seeds n >= 2 whose 95% t interval, t_{0.975, n-1} * sd / sqrt(n), is at most `target` wide
    on each side if the per-seed spread stays `sd`; None when more than `most` would be needed."""
    if target <= 0:
        raise ValueError(f"the target half-width must be positive, got {target}")
    for n in range(2, most + 1):
        if t975(n - 1) * sd / math.sqrt(n) <= target:
            return n
    return None


# ----------------------------------------------------------------------------------------------------
# Benchmarks: per-step times of variants measured side by side, in blocks


def block_means(times: Sequence[float], block: int) -> list[float]:
    """Mean of each complete block of `block` consecutive values."""
    n = len(times) // block
    return [statistics.fmean(times[i * block:(i + 1) * block]) for i in range(n)]


def quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q25, median, q75); degenerate inputs give the value three times."""
    vals = sorted(values)
    if not vals:
        return (math.nan, math.nan, math.nan)
    if len(vals) == 1:
        return (vals[0], vals[0], vals[0])
    q = statistics.quantiles(vals, n=4, method="inclusive")
    return (q[0], q[1], q[2])


@dataclass
class Paired:
    """Per-variant block means and the paired ratios to the reference (same blocks, interleaved steps)."""

    median: float
    q25: float
    q75: float
    ratio: float = 1.0
    ratio_q25: float = 1.0
    ratio_q75: float = 1.0
    blocks: int = 0
    ratios: list[float] = field(default_factory=list)

    @property
    def delta_pct(self) -> float:
        return 100.0 * (self.ratio - 1.0)

    @property
    def noise_pct(self) -> float:
        """Half the interquartile range of the paired ratios, in percent."""
        return 50.0 * (self.ratio_q75 - self.ratio_q25)


def paired_stats(times: dict[str, list[float]], reference: str, block: int) -> dict[str, Paired]:
    """Median block mean of each variant, and the median of its per-block ratio to the reference's block."""
    means = {k: block_means(v, block) for k, v in times.items()}
    out = {}
    for k, m in means.items():
        q25, med, q75 = quantiles(m)
        ratios = [a / b for a, b in zip(m, means[reference]) if b > 0]
        r25, r50, r75 = quantiles(ratios) if ratios else (math.nan,) * 3
        out[k] = Paired(med, q25, q75, r50, r25, r75, len(m), ratios)
    return out
