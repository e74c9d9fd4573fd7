"""Intervals and paired tests for comparing runs: pure functions on arrays, checkable by hand.

- `mean_ci`: the mean of a few per-seed values with a Student-t 95% interval (what a paper's
  "mean +- CI over seeds" means; with one seed the interval is undefined and reported as NaN).
- `wilson_ci`: the interval of one error rate over n samples (Wilson score; one run, no seeds).
- `paired_bootstrap`: the error difference of two methods on the *same* samples, with a
  percentile bootstrap interval over samples (resampling pairs keeps the pairing) and a two-sided
  p-value from the bootstrap distribution.
- `mcnemar`: McNemar's test on the discordant pairs (b: A right and B wrong, c: A wrong and B right);
  exact binomial below 25 discordant pairs, else chi-square with continuity correction (Edwards).
- `hierarchical_bootstrap`: a campaign cell's error over seeds AND samples (seeds resampled, then
  each domain's samples within them), bounded to [0, 1]; what the campaign table reports.
- `holm`, `format_p`, `win_tie_loss`: a campaign's many comparisons corrected together, p-values
  printed as `< 0.001` rather than `0.00`, and a method's record against a named baseline.
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


# --------------------------------------------------------------------- seeds and samples together

def hierarchical_bootstrap(wrong: np.ndarray, n: np.ndarray, *, n_resamples: int = 10_000,
                           confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(error, low, high) of a mean-over-domains error rate averaged over seeds, with a percentile
    interval from a two-level bootstrap: resample the seeds (with replacement), then within each
    drawn seed resample each domain's samples (a binomial draw of its observed error rate: the
    bootstrap of 0/1 outcomes). `wrong` and `n` are (seeds x domains) counts. The interval thus
    widens with seed-to-seed spread AND with few samples, never leaves [0, 1], and with one seed
    is the samples-only interval. NaN where no seed has scored samples."""
    wrong, n = np.atleast_2d(np.asarray(wrong, dtype=float)), np.atleast_2d(np.asarray(n, dtype=float))
    if wrong.shape != n.shape:
        raise ValueError(f"wrong and n differ in shape: {wrong.shape} vs {n.shape}")
    keep = (n > 0).all(axis=1)
    wrong, n = wrong[keep], n[keep]
    if len(n) == 0:
        return math.nan, math.nan, math.nan
    rates = wrong / n
    point = float(rates.mean(axis=1).mean())
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, len(n), size=(n_resamples, len(n)))            # level 1: which seeds
    draws = rng.binomial(n[seeds].astype(np.int64), rates[seeds]) / n[seeds]  # level 2: samples per domain
    boot = draws.mean(axis=2).mean(axis=1)
    alpha = 1 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return point, float(max(0.0, low)), float(min(1.0, high))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error) of `p_values`, in their order: the i-th
    smallest p is multiplied by (m - i) (i from 0), made monotone, capped at 1. NaN stays NaN
    and does not count as a comparison."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def format_p(p: float) -> str:
    """A p-value as text: `< 0.001` below 0.001 (a bootstrap p of 0 means 'below its resolution'), else 3 decimals."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def win_tie_loss(diffs: Sequence[float], p_adjusted: Sequence[float], alpha: float = 0.05) -> tuple[int, int, int]:
    """(wins, ties, losses) of a method against a baseline over comparisons with error differences
    `diffs` (method - baseline) and adjusted p-values: a win is lower error at p < alpha, a loss
    higher error at p < alpha, anything else a tie."""
    wins = sum(1 for d, p in zip(diffs, p_adjusted) if p < alpha and d < 0)
    losses = sum(1 for d, p in zip(diffs, p_adjusted) if p < alpha and d > 0)
    return wins, len(list(diffs)) - wins - losses, losses
