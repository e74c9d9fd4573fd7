"""Retrieval TTT on SmolLM2-135M over three text domains: bits per byte per domain for k
neighbours, the learning rate chosen on a validation split of queries first.

    .venv/bin/python bench/lm_domains.py [--per-domain 6] [--val-per-domain 2] [--lrs 5e-4,2e-3]
                                         [--ks 0,5,20,50] [--procs 2] [--out FILE.json]

Phase 1 (validation): `--val-per-domain` queries of each domain from the corpus's validation split
(`text_domains_val`), every lr of `--lrs` at k = the largest k <= 20; the lr with the lowest
pooled bits per byte there is kept. Phase 2 (report): `--per-domain` held-out queries per domain
(`text_domains`, the first ones of each domain: the same for every k), that lr, every k of `--ks`.

The method is TTT-NN as `nn` runs it on a causal LM (configs/lm_nn_smollm2.yaml: LoRA in the last
4 blocks, fresh Adam per query, one step per neighbour nearest first, grad clip 1.0, the query
scored after the steps, LoRA reset after). One pass per query serves every k: the model after
the first 5 steps of a 50-neighbour pass *is* the k=5 model (same neighbours in the same order,
same fresh optimiser, so the same Adam state), so the query is scored at each k on the way and
the cost is that of the largest k alone. Queries are spread over `--procs` processes (1 torch
thread each). Prints markdown tables: per domain and k, pooled bits per byte (sum of nll over
sum of bytes), relative change against k=0, and the cumulative fine-tuning seconds per query.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "lm_nn_smollm2.yaml"
_STATE: dict = {}


def _init(lora: dict, model_path: str, max_length: int, kb_dir: str) -> None:
    import torch

    from ttt import lm
    from workers.kb_actor import KBRetrievalActor
    from workers.lm_adapter import CausalLMAdapter

    torch.set_num_threads(1)
    adapter = CausalLMAdapter(model_path, lora=lora, max_length=max_length, embedder_threads=1)
    _STATE.update(adapter=adapter, kb=KBRetrievalActor(kb_dir, threads=1), base=lm.lora_state(adapter.get_model()))


def _score(adapter, row: dict) -> tuple[float, int]:
    batch = next(iter(adapter.build_loader([row], batch_size=1)))
    pred = adapter.predict(batch)[0]
    return pred["nll"], pred["n_bytes"]


def run_query(row: dict, lr: float, ks: list[int]) -> list[dict]:
    """One query: retrieve max(ks) neighbours, step through them nearest first, scoring at each k."""
    import numpy as np
    import torch

    from kb_index.embedders import SENTENCE_MODEL_NAME
    from ttt import lm

    adapter, kb = _STATE["adapter"], _STATE["kb"]
    model = adapter.get_model()
    lm.load_lora_state(model, _STATE["base"])
    params = [p for p in model.parameters() if p.requires_grad]
    batch = next(iter(adapter.build_loader([row], batch_size=1)))
    emb = adapter.embed(batch.inputs).numpy().astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    _, _, payload = kb.search(emb, max(ks), embedder=SENTENCE_MODEL_NAME, payload=["text"])
    texts = [r["text"] for r in payload[0] if r is not None]
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))  # build_optimizer's Adam
    out, done, ft = [], 0, 0.0
    for k in sorted(ks):
        t = time.perf_counter()
        with torch.enable_grad():
            res = lm.finetune_on_texts(model, adapter.lm_loss, texts[done:k], grad_clip=1.0,
                                       params=params, optimizer=optimizer)
        if res.stop_reason != "steps_done":
            raise RuntimeError(f"{row['sample_id']}: fine-tuning stopped ({res.stop_reason})")
        ft += time.perf_counter() - t
        done = k
        with torch.no_grad():
            nll, n_bytes = _score(adapter, row)
        out.append({"sample_id": row["sample_id"], "domain": row["domain"], "lr": lr, "k": k, "nll": nll,
                    "n_bytes": n_bytes, "fine_tune_s": ft, "neighbours": min(k, len(texts))})
    lm.load_lora_state(model, _STATE["base"])
    return out


def pick(path: Path, per_domain: int) -> list[dict]:
    rows = pq.read_table(path).to_pylist()
    by_domain: dict[str, list[dict]] = {}
    for r in rows:
        by_domain.setdefault(r["domain"], []).append(r)
    return [r for d in sorted(by_domain) for r in by_domain[d][:per_domain]]


def sweep(pool: ProcessPoolExecutor, rows: list[dict], lrs: list[float], ks: list[int]) -> pd.DataFrame:
    jobs = [pool.submit(run_query, r, lr, ks) for lr in lrs for r in rows]
    results = []
    for i, job in enumerate(jobs, 1):
        results += job.result()
        print(f"[bench] {i}/{len(jobs)} queries done", flush=True)
    return pd.DataFrame(results)


def pooled(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    g = frame.groupby(by)
    return pd.DataFrame({"queries": g["sample_id"].nunique(),
                         "bits/byte": g["nll"].sum() / (math.log(2) * g["n_bytes"].sum()),
                         "fine-tune s/query": g["fine_tune_s"].mean()}).reset_index()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-domain", type=int, default=6)
    parser.add_argument("--val-per-domain", type=int, default=2)
    parser.add_argument("--lrs", default="5e-4,2e-3")
    parser.add_argument("--ks", default="0,5,20,50")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--cache-dir", default=".cache")
    parser.add_argument("--out", default=None, help="write every per-query row as JSON here")
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.embedded.smollm2 import ensure_smollm2
    from pipeline.embedded.text import ensure_text_manifest

    cfg = load_config(CONFIG, [f"data.cache_dir={args.cache_dir}"])
    model_path = str(ensure_smollm2(args.cache_dir))
    text_cache = Path(args.cache_dir) / "text"
    val = pick(ensure_text_manifest(text_cache, "text_domains_val"), args.val_per_domain)
    queries = pick(ensure_text_manifest(text_cache, "text_domains"), args.per_domain)
    kb_dir = str(text_cache / "domains" / "kb")
    ks = [int(k) for k in args.ks.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    val_ks = [k for k in ks if k <= 20]
    lora = cfg.model.lora.model_dump()
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.procs, initializer=_init,
                             initargs=(lora, model_path, cfg.model.max_length, kb_dir)) as pool:
        print(f"[bench] validation: {len(val)} queries x lrs {lrs} at k {val_ks}", flush=True)
        v = sweep(pool, val, lrs, val_ks)
        table = pooled(v, ["lr", "k"])
        best = table[table["k"] == max(val_ks)].sort_values("bits/byte").iloc[0]["lr"]
        print(f"\nvalidation split ({len(val)} queries, pooled over domains); chosen lr {best:g}\n")
        print(table.to_markdown(index=False, floatfmt=".4f"))
        print(f"\n[bench] report: {len(queries)} queries x k {ks} at lr {best:g}", flush=True)
        r = sweep(pool, queries, [best], ks)
    per = pooled(r, ["domain", "k"])
    overall = pooled(r, ["k"]).assign(domain="all")
    table = pd.concat([per, overall], ignore_index=True)
    base = table[table["k"] == 0].set_index("domain")["bits/byte"]
    table["change vs k=0 %"] = [100 * (b / base[d] - 1) for d, b in zip(table["domain"], table["bits/byte"])]
    q = r.pivot_table(index="sample_id", columns="k", values="nll")
    improved = {k: 100 * float((q[k] < q[0] - 1e-9).mean()) for k in ks if k}
    print(f"\nheld-out queries ({len(queries)}: {args.per_domain} per domain), lr {best:g}, "
          f"wall {time.perf_counter() - t0:.0f}s, {args.procs} processes\n")
    print(table[["domain", "k", "queries", "bits/byte", "change vs k=0 %", "fine-tune s/query"]]
          .to_markdown(index=False, floatfmt=".4f"))
    print("\nqueries whose nll went down vs k=0: " + ", ".join(f"k={k}: {v:.0f}%" for k, v in improved.items()))
    if args.out:
        Path(args.out).write_text(json.dumps({"lr": float(best), "validation": v.to_dict("records"),
                                              "report": r.to_dict("records")}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
