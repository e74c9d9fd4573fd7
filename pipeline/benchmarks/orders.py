"""`manifest --orders N`: N manifests of one benchmark, each with its domains in another order
(settings.domain_orders: the layout's order first, then seeded distinct permutations), written as
`<out stem>-order<k>.parquet`; each file's metadata records `domain_order` and `order_index`, so
a campaign (or `runs compare`) can aggregate a method's error over orders with intervals."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.benchmarks.layouts import build_pool
from pipeline.benchmarks.settings import apply_setting, domain_orders, reorder_domains
from pipeline.manifest import write_manifest


def order_paths(out: str | Path, n: int) -> list[Path]:
    out = Path(out)
    return [out.with_name(f"{out.stem}-order{k}{out.suffix or '.parquet'}") for k in range(n)]


def build_order_manifests(layout: str, root: str | Path, out: str | Path, n_orders: int, *, order_seed: int = 0,
                          setting: str = "continual", setting_params: dict[str, Any] | None = None,
                          **options: Any) -> list[tuple[Path, dict[str, Any]]]:
    """One manifest per domain order (gradual orders its corruptions; every other setting its domains)."""
    pool = build_pool(layout, root, **options)
    key = "corruption" if setting == "gradual" else "domain"
    names = list(dict.fromkeys(pool.column(key).to_pylist()))
    written = []
    for k, (order, path) in enumerate(zip(domain_orders(names, n_orders, order_seed), order_paths(out, n_orders))):
        table, meta = apply_setting(reorder_domains(pool, order, key), setting, **(setting_params or {}))
        source = {k2: v for k2, v in options.items() if k2 != "subset_keys"}
        source.update(layout=layout, root=str(Path(root).resolve()))
        meta.update(source=source, rows=table.num_rows, domain_order=order, order_index=k, order_seed=order_seed)
        written.append((write_manifest(table, meta, path), meta))
    return written
