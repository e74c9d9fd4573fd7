"""The five evaluation settings of the public TTA benchmarks, as orderings of a manifest's rows.

A setting is a property of the stream, not of the method: each function here takes a *pool* (a
pyarrow Table with at least `sample_id`, `label`, `domain`, `corruption`, `severity`, one block
of rows per domain in the order the domains should come) and returns the rows in stream order,
plus the metadata that says how they were ordered. The job cuts the ordered manifest into
contiguous shards, so a shard of a mixed or correlated stream is a contiguous piece of that
stream; each shard starts from the source model.

References followed (read, not copied):
- `reset_each_shift`, `continual`, `mixed_domains`: mariodoebler/test-time-adaptation
  (classification/test_time.py, datasets/data_loading.py): domain by domain, resetting the model
  at each domain only in reset_each_shift; mixed = every domain's samples shuffled together.
- `gradual`: qinenergy/cotta cifar/cifar10c_gradual.py: the first corruption runs severities
  5,4,3,2,1 ("to simulate the large gap between the source and first target domain"), every later
  corruption 1,2,3,4,5,4,3,2,1, no reset. mariodoebler's variant (1..5..1 for every corruption) is
  `first_descending=False`. A severity block visited twice holds the same images twice (as both
  references reload the same block), so a repeat's `sample_id` gets a `~k` suffix to stay unique.
- `correlated`: BIT-DA/RoTTA core/data/ttasampler.py (LabelDirichletDomainSequence): per domain,
  each class's samples are split over `slots` time slots by proportions drawn from
  Dirichlet(delta, ..., delta); each slot lists its class chunks in a random class order. `slots`
  defaults to RoTTA's min(number of classes, 100). delta = 0 sorts by label, as mariodoebler does.
  Deviations on purpose: classes are the labels present (RoTTA assumes 0..K-1 all present),
  domains keep the pool's order (RoTTA sorts them), randomness comes from a seeded Generator.
  Note what the reference implies: at a large delta every slot holds ~N/(K*slots) samples of each
  class one after another, so the order approaches an i.i.d. one only when `slots` is about the
  number of samples per class; with the default slots the runs stay ~N/K^2 long.

- `imbalanced`: a long-tailed test label distribution with the exponential profile of CIFAR-10/100-LT
  (Cui et al. 2019, "Class-balanced loss", the profile Cao et al.'s LDAM and the class-imbalanced
  test-time adaptation benchmarks take): with classes ranked by a seeded permutation, class of rank
  i keeps n_i = floor(n_max * R^(-i / (C - 1))) of its rows in every domain (n_max the smallest
  class's count in the domain, so every class can pay its share; R = n_max / n_min the imbalance
  ratio), the same images in every domain, shuffled within the domain by the seed; domains in pool
  order, no reset (continual). RoTTA's label correlation (`correlated`) orders a balanced stream;
  this one changes the label marginal itself.
- Domain orders (`domain_orders`, `manifest --orders N`): N distinct permutations of the domains
  (the first is the pool's own order, the others seeded draws), each applied to the pool before a
  continual / gradual / any setting, as CoTTA's 10 orders of its ImageNet-C experiment.

The metadata goes into the Parquet file's key/value schema metadata under `ttt_pipeline.manifest`
(JSON), written and read back by `pipeline.manifest` (`write_manifest`, `read_manifest_meta`).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

SETTINGS: tuple[str, ...] = ("reset_each_shift", "continual", "gradual", "mixed_domains", "correlated", "imbalanced")
# Which value of the run config's `ttt.reset_on_domain_change` each setting is defined with.
EXPECTS_RESET: dict[str, bool] = {
    "reset_each_shift": True, "continual": False, "gradual": False, "mixed_domains": False, "correlated": False,
    "imbalanced": False,
}
POOL_COLUMNS: tuple[str, ...] = ("sample_id", "label", "domain", "corruption", "severity")


class SettingError(ValueError):
    """A setting that cannot be applied to this pool, phrased as one line."""


def _check_pool(pool: pa.Table, need_labels: bool = False) -> None:
    missing = [c for c in POOL_COLUMNS if c not in pool.column_names]
    if missing:
        raise SettingError(f"pool is missing column(s) {missing}")
    if pool.num_rows == 0:
        raise SettingError("pool has no rows")
    if need_labels and pool.column("label").null_count:
        raise SettingError("this setting orders by label, but some rows have no label")


def domain_blocks(pool: pa.Table) -> dict[str, np.ndarray]:
    """Row indices of each domain, domains in order of first appearance, rows in pool order."""
    domains = np.asarray(pool.column("domain").to_pylist(), dtype=object)
    order: dict[str, list[int]] = {}
    for i, d in enumerate(domains):
        order.setdefault(d, []).append(i)
    return {d: np.asarray(idx, dtype=np.int64) for d, idx in order.items()}


def _finish(pool: pa.Table, indices: np.ndarray, sample_ids: list[str] | None = None) -> pa.Table:
    table = pool.take(pa.array(indices, pa.int64()))
    if sample_ids is not None:
        table = table.set_column(table.column_names.index("sample_id"), "sample_id", pa.array(sample_ids, pa.string()))
    if "position" in table.column_names:
        table = table.drop_columns(["position"])
    return table.append_column("position", pa.array(np.arange(table.num_rows), pa.int64()))


def _meta(name: str, pool_or_table: pa.Table, **params: Any) -> dict[str, Any]:
    domains = list(dict.fromkeys(pool_or_table.column("domain").to_pylist()))
    return {"setting": name, "params": params, "reset_on_domain_change": EXPECTS_RESET[name], "domains": domains}


def reset_each_shift(pool: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
    """Domain by domain in pool order; the method resets to the source model at each domain change
    (the Tent paper's protocol), which the run must ask for with `ttt.reset_on_domain_change: true`."""
    _check_pool(pool)
    blocks = domain_blocks(pool)
    table = _finish(pool, np.concatenate(list(blocks.values())))
    return table, _meta("reset_each_shift", table)


def continual(pool: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
    """Domain by domain in pool order, one stream, no reset (CoTTA's continual benchmark)."""
    _check_pool(pool)
    blocks = domain_blocks(pool)
    table = _finish(pool, np.concatenate(list(blocks.values())))
    return table, _meta("continual", table)


def gradual_severities(available: list[int], first: bool, first_descending: bool = True) -> list[int]:
    """CoTTA's severity sequence for one corruption: the first one falls from the top
    (5,4,3,2,1), every later one rises and falls (1,2,3,4,5,4,3,2,1)."""
    s = sorted(set(available))
    if first and first_descending:
        return s[::-1]
    return s + s[-2::-1]


def gradual(pool: pa.Table, *, first_descending: bool = True) -> tuple[pa.Table, dict[str, Any]]:
    """Severity rising and falling per corruption, corruptions in pool order, no reset.
    A severity block visited a second time repeats its rows with sample_id suffix `~1`, `~2`, ..."""
    _check_pool(pool)
    corruptions = list(dict.fromkeys(pool.column("corruption").to_pylist()))
    severities = np.asarray(pool.column("severity").to_numpy(zero_copy_only=False))
    corr_col = np.asarray(pool.column("corruption").to_pylist(), dtype=object)
    ids = pool.column("sample_id").to_pylist()
    indices: list[np.ndarray] = []
    new_ids: list[str] = []
    sequence: list[list[Any]] = []
    for k, corruption in enumerate(corruptions):
        rows = np.flatnonzero(corr_col == corruption)
        levels = gradual_severities(severities[rows].tolist(), first=k == 0, first_descending=first_descending)
        if len(set(levels)) < 2:
            raise SettingError(f"gradual needs at least two severities of {corruption!r}, found {sorted(set(levels))}")
        visits: dict[int, int] = {}
        for level in levels:
            block = rows[severities[rows] == level]
            repeat = visits.get(level, 0)
            visits[level] = repeat + 1
            indices.append(block)
            new_ids.extend(ids[i] if repeat == 0 else f"{ids[i]}~{repeat}" for i in block)
            sequence.append([corruption, int(level)])
    table = _finish(pool, np.concatenate(indices), new_ids)
    meta = _meta("gradual", table, first_descending=first_descending)
    meta["severity_sequence"] = sequence
    return table, meta


def mixed_domains(pool: pa.Table, *, seed: int = 0) -> tuple[pa.Table, dict[str, Any]]:
    """All domains' rows shuffled together by `seed`: consecutive samples likely come from
    different domains (mariodoebler's mixed_domains)."""
    _check_pool(pool)
    order = np.random.default_rng(seed).permutation(pool.num_rows)
    table = _finish(pool, order)
    return table, _meta("mixed_domains", table, seed=seed)


def dirichlet_order(labels: np.ndarray, delta: float, rng: np.random.Generator, slots: int | None = None) -> np.ndarray:
    """RoTTA's label-correlated order of one domain's rows (indices into `labels`).

    Each class's rows are cut into `slots` chunks by proportions ~ Dirichlet(delta * 1); slot by
    slot, the chunks of all classes follow one another in a random class order. delta = 0: sort
    by label (stable), as mariodoebler's `correlated` does without a Dirichlet value."""
    if delta == 0:
        return np.argsort(labels, kind="stable")
    classes = np.unique(labels)
    n_slots = slots if slots is not None else min(len(classes), 100)
    if n_slots < 1:
        raise SettingError(f"correlated: slots must be >= 1, got {n_slots}")
    class_rows = [np.flatnonzero(labels == c) for c in classes]
    proportions = rng.dirichlet([delta] * n_slots, len(classes))  # one row per class, as RoTTA
    slot_chunks: list[list[np.ndarray]] = [[] for _ in range(n_slots)]
    for rows, p in zip(class_rows, proportions):
        cuts = (np.cumsum(p)[:-1] * len(rows)).astype(int)
        for s, chunk in enumerate(np.split(rows, cuts)):
            slot_chunks[s].append(chunk)
    out: list[np.ndarray] = []
    for chunks in slot_chunks:
        for i in rng.permutation(len(chunks)):
            out.append(chunks[i])
    return np.concatenate(out)


def correlated(pool: pa.Table, *, delta: float = 0.1, seed: int = 0, slots: int | None = None,
               mix_domains: bool = False) -> tuple[pa.Table, dict[str, Any]]:
    """Label-correlated order by Dirichlet sampling with concentration `delta` (small delta: long
    runs of one class), within each domain in pool order (RoTTA's practical TTA stream), or over all
    domains shuffled together with `mix_domains` (mariodoebler's mixed_domains_correlated)."""
    _check_pool(pool, need_labels=True)
    if not np.isfinite(delta) or delta < 0:
        raise SettingError(f"correlated: delta must be a finite number >= 0, got {delta}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(pool.column("label").to_numpy(zero_copy_only=False))
    if mix_domains:
        groups = [rng.permutation(pool.num_rows)]
    else:
        groups = list(domain_blocks(pool).values())
    order = np.concatenate([g[dirichlet_order(labels[g], delta, rng, slots)] for g in groups])
    table = _finish(pool, order)
    return table, _meta("correlated", table, delta=delta, seed=seed, slots=slots, mix_domains=mix_domains)


def long_tail_counts(n_max: int, n_classes: int, ratio: float) -> list[int]:
    """The exponential long-tail profile: floor(n_max * ratio^(-i / (C - 1))) for ranks i = 0..C-1."""
    if not np.isfinite(ratio) or ratio < 1:
        raise SettingError(f"imbalanced: the imbalance ratio must be a finite number >= 1, got {ratio}")
    if n_classes == 1:
        return [n_max]
    return [int(np.floor(n_max * ratio ** (-i / (n_classes - 1)) + 1e-9)) for i in range(n_classes)]


def imbalanced(pool: pa.Table, *, ratio: float = 10.0, seed: int = 0) -> tuple[pa.Table, dict[str, Any]]:
    """A long-tailed label distribution per domain (module docstring): class of rank i keeps
    long_tail_counts(...)[i] rows, ranks a seeded permutation of the classes, rows shuffled within
    each domain; domains in pool order."""
    _check_pool(pool, need_labels=True)
    rng = np.random.default_rng(seed)
    labels = np.asarray(pool.column("label").to_numpy(zero_copy_only=False))
    classes = np.unique(labels)
    ranked = classes[rng.permutation(len(classes))]
    parts: list[np.ndarray] = []
    counts: dict[str, dict[int, int]] = {}
    for domain, rows in domain_blocks(pool).items():
        per_class = {int(c): rows[labels[rows] == c] for c in ranked}
        n_max = min(len(v) for v in per_class.values())
        if n_max == 0:
            raise SettingError(f"imbalanced: domain {domain!r} lacks a class (every class must be present)")
        keep = long_tail_counts(n_max, len(ranked), ratio)
        chosen = np.concatenate([per_class[int(c)][:k] for c, k in zip(ranked, keep)])
        parts.append(chosen[rng.permutation(len(chosen))])
        counts[domain] = {int(c): k for c, k in zip(ranked, keep)}
    table = _finish(pool, np.concatenate(parts))
    meta = _meta("imbalanced", table, ratio=ratio, seed=seed)
    meta["class_ranking"] = [int(c) for c in ranked]
    meta["class_counts"] = next(iter(counts.values()))
    return table, meta


def domain_orders(domains: list[str], n: int, seed: int = 0) -> list[list[str]]:
    """`n` distinct orders of `domains`: the given order first, then seeded random permutations
    (redrawn until new); fails when n exceeds the number of permutations."""
    if n < 1:
        raise SettingError(f"orders must be >= 1, got {n}")
    if n > math.factorial(len(domains)):
        raise SettingError(f"{n} distinct orders of {len(domains)} domains do not exist")
    rng = np.random.default_rng(seed)
    orders, seen = [list(domains)], {tuple(domains)}
    while len(orders) < n:
        order = [domains[i] for i in rng.permutation(len(domains))]
        if tuple(order) not in seen:
            seen.add(tuple(order))
            orders.append(order)
    return orders


def reorder_domains(pool: pa.Table, order: list[str], key: str = "domain") -> pa.Table:
    """The pool with its blocks of `key` (domain, or corruption for gradual) in `order`."""
    values = np.asarray(pool.column(key).to_pylist(), dtype=object)
    missing = sorted(set(values) - set(order))
    if missing or len(set(order)) != len(order):
        raise SettingError(f"a domain order must list every {key} once; missing {missing}")
    return pool.take(pa.array(np.concatenate([np.flatnonzero(values == d) for d in order]), pa.int64()))


SETTING_FUNCTIONS = {
    "reset_each_shift": reset_each_shift, "continual": continual, "gradual": gradual,
    "mixed_domains": mixed_domains, "correlated": correlated, "imbalanced": imbalanced,
}


def apply_setting(pool: pa.Table, setting: str, **params: Any) -> tuple[pa.Table, dict[str, Any]]:
    """Order `pool` by the named setting; params are that setting's keyword arguments."""
    if setting not in SETTING_FUNCTIONS:
        raise SettingError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
    try:
        return SETTING_FUNCTIONS[setting](pool, **params)
    except TypeError as exc:  # a parameter the setting does not take
        raise SettingError(f"setting {setting}: {exc}") from None
