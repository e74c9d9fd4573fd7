"""What compared runs must share: one warning line per protocol property in which they differ.

A comparison is only as good as its protocol: runs made of a different number of independent
streams (shards of an order-dependent stream), in different settings, on different domain sets,
with other models, manifests, batch sizes or prediction protocols are not the same experiment.
`report` (several runs), `runs compare` and campaigns (per setting and seed) print these lines
on stderr and into report.md.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COMPARED_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("manifest", ("config.data.manifest", "inputs_fingerprint.manifest")),
    ("model", ("model", "config.model.checkpoint", "config.model.path", "inputs_fingerprint.model")),
    ("batch size", ("config.ttt.batch_size",)),
    ("setting", ("protocol.setting", "manifest_meta.setting")),
    ("independent streams (shards of an order-dependent stream)", ("protocol.independent_streams",)),
    ("shard count", ("config.workers.num_shards",)),
    ("predict_from", ("predict_from",)),
)


def lookup(meta: dict[str, Any], dotted: str) -> Any:
    node: Any = meta
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _groups(values: Sequence[Any], labels: Sequence[str]) -> dict[Any, list[str]]:
    groups: dict[Any, list[str]] = {}
    for v, label in zip(values, labels):
        groups.setdefault(v, []).append(label)
    return groups


def comparison_warnings(metas: list[dict[str, Any]], labels: list[str],
                        domains: Sequence[set[str]] | None = None) -> list[str]:
    """One line per property in which the compared runs differ, naming which run has what.
    `domains`: each run's set of scored domains (a different set makes a different `mean`)."""
    out = []
    for name, keys in COMPARED_FIELDS:
        values = [tuple(str(lookup(m, k)) for k in keys) for m in metas]
        if all(v == ("None",) * len(keys) for v in values):
            continue  # recorded by none of them (runs from before the field existed)
        if name == "shard count" and any(lookup(m, "protocol.order_matters") is False for m in metas):
            continue  # order-free runs: shards change nothing but speed
        if len(set(values)) > 1:
            shown = "; ".join(f"{', '.join(labs)}: {next((x for x in v if x != 'None'), '?')}"
                              for v, labs in _groups(values, labels).items())
            out.append(f"compared runs differ in {name} ({shown})")
    if domains is not None and len({frozenset(d) for d in domains if d}) > 1:
        every = set.intersection(*[set(d) for d in domains if d])
        shown = "; ".join(f"{', '.join(labs)}: {', '.join(sorted(v - every)) or 'only the shared ones'}"
                          for v, labs in _groups([frozenset(d) for d in domains], labels).items() if v)
        out.append(f"compared runs differ in their domains, so their means average different sets "
                   f"(beyond the {len(every)} shared: {shown})")
    return out
