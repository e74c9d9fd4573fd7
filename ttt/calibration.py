"""Calibration of a classifier's probabilities: expected calibration error (ECE, 15 equal-width
confidence bins, Guo et al. 2017, the field's usual choice), negative log-likelihood (NLL) and
the Brier score. Pure NumPy: the summary writer, the probes and reports all use it.

Per row the results carry `confidence` (the top class's probability), `correct`, `label_prob`
(the probability of the true label) and `brier` (sum over classes of (p_k - [k = label])^2), so
NLL and Brier need no full probability vector; `from_probs` computes the same from one (e.g. a
`probs` column) where a run saves them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

N_BINS = 15
EPS = 1e-12  # NLL of a probability 0


def ece(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = N_BINS) -> float | None:
    """sum_b |B_b|/n * |accuracy(B_b) - mean confidence(B_b)| over equal-width bins (lo, hi] of
    [0, 1] (the first bin also holds 0): the reference definition (Guo et al.; the torchmetrics and
    FOA code bin the same way)."""
    conf = np.asarray(confidence, dtype=np.float64)
    acc = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        return None
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            total += mask.sum() / conf.size * abs(acc[mask].mean() - conf[mask].mean())
    return float(total)


def nll(label_prob: Sequence[float]) -> float | None:
    p = np.asarray(label_prob, dtype=np.float64)
    return float(np.mean(-np.log(np.clip(p, EPS, 1.0)))) if p.size else None


def brier(per_row: Sequence[float]) -> float | None:
    b = np.asarray(per_row, dtype=np.float64)
    return float(b.mean()) if b.size else None


def row_scores(probs: np.ndarray, labels: Sequence[int | None]) -> tuple[list[float | None], list[float | None]]:
    """(label_prob, brier) per row of an N x C probability array; None where a row has no label."""
    label_prob: list[float | None] = []
    briers: list[float | None] = []
    for p, y in zip(probs, labels):
        if y is None or not 0 <= int(y) < len(p):
            label_prob.append(None)
            briers.append(None)
            continue
        label_prob.append(float(p[int(y)]))
        briers.append(float(np.sum(p * p) - 2.0 * p[int(y)] + 1.0))
    return label_prob, briers


def from_probs(probs: Sequence[Sequence[float]], labels: Sequence[int]) -> dict[str, float | None]:
    arr = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if arr.size == 0:
        return {"ece": None, "nll": None, "brier": None}
    label_prob, briers = row_scores(arr, y.tolist())
    return {"ece": ece(arr.max(1), arr.argmax(1) == y), "nll": nll(label_prob), "brier": brier(briers)}


def summarise(frame: Any) -> dict[str, float | None]:
    """ECE, NLL and Brier of the scored rows of a results frame (pandas), from whatever columns it
    has: `probs` (full vectors) first, else `label_prob` / `brier`, else ECE alone from `confidence`."""
    rated = frame[frame["correct"].notna() & frame["confidence"].notna()] if "confidence" in frame else frame.iloc[:0]
    out: dict[str, float | None] = {"ece": None, "nll": None, "brier": None}
    if rated.empty:
        return out
    if "probs" in rated and rated["probs"].notna().all():
        return from_probs(list(rated["probs"]), list(rated["label"]))
    out["ece"] = ece(rated["confidence"].to_numpy(float), rated["correct"].astype(bool).to_numpy())
    if "label_prob" in rated and rated["label_prob"].notna().any():
        out["nll"] = nll(rated["label_prob"].dropna().to_numpy(float))
    if "brier" in rated and rated["brier"].notna().any():
        out["brier"] = brier(rated["brier"].dropna().to_numpy(float))
    return out


class Accumulator:
    """ECE / NLL / Brier pooled over row batches (what `ece`, `nll`, `brier` give on all rows at
    once), so the summary can read results part by part."""

    def __init__(self, n_bins: int = N_BINS) -> None:
        self.n_bins = n_bins
        self.count = np.zeros(n_bins)
        self.conf = np.zeros(n_bins)
        self.hits = np.zeros(n_bins)
        self.nll_sum = self.brier_sum = 0.0
        self.nll_n = self.brier_n = 0

    def add(self, confidence: np.ndarray, correct: np.ndarray, label_prob: np.ndarray | None = None,
            brier_rows: np.ndarray | None = None) -> None:
        conf = np.asarray(confidence, dtype=np.float64)
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, self.n_bins - 1)
        np.add.at(self.count, bins, 1.0)
        np.add.at(self.conf, bins, conf)
        np.add.at(self.hits, bins, np.asarray(correct, dtype=np.float64))
        if label_prob is not None:
            p = np.asarray(label_prob, dtype=np.float64)
            p = p[~np.isnan(p)]
            self.nll_sum += float(np.sum(-np.log(np.clip(p, EPS, 1.0))))
            self.nll_n += p.size
        if brier_rows is not None:
            b = np.asarray(brier_rows, dtype=np.float64)
            b = b[~np.isnan(b)]
            self.brier_sum += float(b.sum())
            self.brier_n += b.size

    def add_frame(self, rated: Any) -> None:
        """Rows of a results frame with `correct` and `confidence` set."""
        if rated.empty:
            return
        def col(name: str) -> np.ndarray | None:
            return rated[name].to_numpy(dtype=float, na_value=np.nan) if name in rated else None
        if "probs" in rated and rated["probs"].notna().all():
            probs = np.asarray(list(rated["probs"]), dtype=np.float64)
            label_prob, brier_rows = row_scores(probs, list(rated["label"]))
            self.add(col("confidence"), rated["correct"].astype(bool).to_numpy(),
                     np.asarray(label_prob, dtype=float), np.asarray(brier_rows, dtype=float))
            return
        self.add(col("confidence"), rated["correct"].astype(bool).to_numpy(), col("label_prob"), col("brier"))

    def result(self) -> dict[str, float | None]:
        n = self.count.sum()
        if n == 0:
            return {"ece": None, "nll": None, "brier": None}
        used = self.count > 0
        gap = np.abs(self.hits[used] / self.count[used] - self.conf[used] / self.count[used])
        return {"ece": float(np.sum(self.count[used] / n * gap)),
                "nll": self.nll_sum / self.nll_n if self.nll_n else None,
                "brier": self.brier_sum / self.brier_n if self.brier_n else None}
