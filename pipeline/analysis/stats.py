"""Intervals and paired tests for comparing runs: pure functions on arrays, checkable by hand.

- `mean_ci`: the mean of a few per-seed values with a Student-t 95% interval (what a paper's
  "mean +- CI over seeds" means; with one seed the interval is undefined and reported as NaN).
- `wilson_ci`: the interval of one error rate over n samples (Wilson score; one run, no seeds).
- `paired_bootstrap`: the error difference of two methods on the *same* samples, with a
  percentile bootstrap interval over samples (resampling pairs keeps the pairing) and a two-sided
  p-value from the bootstrap distribution.
- `mcnemar`: McNemar's test on the discordant pairs (b: A right and B wrong, c: A wrong and B right);
  exact binomial below 25 discordant pairs, else chi-square with continuity correction (Edwards).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as _st

EXACT_BELOW = 25  # discordant pairs under which McNemar uses the exact binomial test


def _bool_array(values: Sequence[bool] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans (correct or not)")
        arr = arr.astype(bool)
    return arr


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n) with a Student-t interval; NaN bounds when n < 2, all NaN when n == 0."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(arr)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(arr.mean())
    if n < 2:
        return mean, math.nan, math.nan, n
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1) * arr.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def wilson_ci(errors: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion errors / n; (NaN, NaN) when n == 0."""
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= errors <= n:
        raise ValueError(f"errors must lie in [0, n], got {errors} of {n}")
    z = float(_st.norm.ppf(0.5 + confidence / 2))
    p = errors / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray, *,
                     n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Error(A) - error(B) on paired samples: the observed difference, a percentile interval and a
    two-sided p-value (twice the smaller tail of the bootstrap differences at 0, at most 1)."""
    a, b = _bool_array(correct_a, "correct_a"), _bool_array(correct_b, "correct_b")
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    if len(a) == 0:
        raise ValueError("no paired samples")
    # per-sample difference in error: +1 where only A is wrong, -1 where only B is wrong
    d = (~a).astype(np.int8) - (~b).astype(np.int8)
    rng = np.random.default_rng(seed)
    # counts of each sample in each resample (multinomial) instead of index draws: same distribution,
    # memory O(n_resamples * 3) since d takes only three values
    values = np.array([-1, 0, 1])
    counts = np.array([(d == v).sum() for v in values])
    draws = rng.multinomial(len(d), counts / len(d), size=n_resamples)
    boot = draws @ values / len(d)
    alpha = 1 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2 * min(float((boot <= 0).mean()), float((boot >= 0).mean())))
    return {"n": int(len(d)), "diff": float(d.mean()), "low": float(low), "high": float(high), "p_value": p}


def mcnemar(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray) -> dict[str, float]:
    """McNemar's test of equal error rates on paired samples; b = A right & B wrong, c = A wrong & B right."""
    a, b_ = _bool_array(correct_a, "correct_a"), _bool_array(correct_b, "correct_b")
    if len(a) != len(b_):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b_)}")
    b = int((a & ~b_).sum())
    c = int((~a & b_).sum())
    n = b + c
    if n == 0:
        return {"n": int(len(a)), "b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0, "exact": True}
    if n < EXACT_BELOW:
        # two-sided exact: twice the smaller binomial tail under p = 1/2
        p = min(1.0, 2 * float(_st.binom.cdf(min(b, c), n, 0.5)))
        return {"n": int(len(a)), "b": b, "c": c, "statistic": float(min(b, c)), "p_value": p, "exact": True}
    stat = (abs(b - c) - 1) ** 2 / n
    return {"n": int(len(a)), "b": b, "c": c, "statistic": float(stat),
            "p_value": float(_st.chi2.sf(stat, 1)), "exact": False}
