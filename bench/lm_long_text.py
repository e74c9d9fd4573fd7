"""Peak memory of scoring one long text on a causal LM: windows a few at a time (the adapter's
`forward`) against all of a text's windows in one forward (what it did before issue 26).

    .venv/bin/python bench/lm_long_text.py [--sizes-kb 64,256,1024,4096] [--whole-up-to-kb 256]

The model is a randomly initialised 2-layer GPT-2 (vocabulary 8,192, 256-token windows) with a
byte-level BPE trained on pydoc text: small enough to score megabytes on 2 cores, with logits as
wide as a real vocabulary makes them. Each measurement runs in a fresh process (peak RSS is a
per-process high-water mark) on pydoc text repeated to the size. Prints a markdown table: size,
windows, peak RSS chunked, peak RSS whole (where it fits this machine), scoring seconds.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(out: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.embedded.text import chunk_document, pydoc_documents
    from pipeline.embedded.tiny_lm import train_tokenizer

    torch.manual_seed(0)
    texts = [c for _, doc in pydoc_documents() for c in chunk_document(doc)]
    tokenizer = train_tokenizer(texts, vocab_size=8192)
    bos = tokenizer.bos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=bos, eos_token_id=bos, pad_token_id=bos)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def measure(model_dir: str, size_kb: int, whole: bool) -> dict:
    """One scoring in this process: peak RSS (MB) before and after, windows, seconds."""
    import torch

    from pipeline.embedded.text import pydoc_documents
    from workers.lm_adapter import CausalLMAdapter

    torch.set_num_threads(1)
    corpus = "\n".join(doc for _, doc in pydoc_documents())
    text = (corpus * (size_kb * 1024 // len(corpus) + 1))[:size_kb * 1024]
    adapter = CausalLMAdapter(model_dir)
    batch = next(iter(adapter.build_loader([{"sample_id": "long", "text": text}], batch_size=1)))
    windows = int(batch.inputs.input_ids.shape[0])
    if whole:
        adapter.windows_per_forward = windows
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    row = adapter.predict(batch)[0]
    return {"windows": windows, "per_forward": adapter.windows_per_forward, "rss_before_mb": before,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": time.perf_counter() - t0, "bits_per_byte": row["bits_per_byte"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-kb", default="64,256,1024,4096")
    ap.add_argument("--whole-up-to-kb", type=int, default=256, help="all windows at once only up to this size")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "KB", "WHOLE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.child[2] == "1")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp))
        print("| text | windows | peak RSS, chunked (windows/forward) | peak RSS, one forward | seconds chunked | "
              "seconds one forward | bits/byte equal |\n|---|---|---|---|---|---|---|")
        for kb in (int(s) for s in args.sizes_kb.split(",")):
            runs = {}
            for whole in (False, True):
                if whole and kb > args.whole_up_to_kb:
                    continue
                out = subprocess.run([sys.executable, __file__, "--child", tmp, str(kb), str(int(whole))],
                                     capture_output=True, text=True, check=True).stdout
                runs[whole] = json.loads(out.strip().splitlines()[-1])
            c, w = runs[False], runs.get(True)
            whole_mb = "" if w is None else f"{w['peak_mb']:,.0f} MB"
            whole_s = "" if w is None else f"{w['seconds']:.1f}"
            same = "" if w is None else ("yes" if abs(c["bits_per_byte"] - w["bits_per_byte"]) < 1e-6 else "NO")
            print(f"| {kb:,} KB | {c['windows']:,} | {c['peak_mb']:,.0f} MB ({c['per_forward']}) | {whole_mb} | "
                  f"{c['seconds']:.1f} | {whole_s} | {same} |", flush=True)


if __name__ == "__main__":
    main()
