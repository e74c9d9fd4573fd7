"""The first `make demo-lm`'s model build, before and after (issue: the LM demo in minutes): the
tiny GPT-2 of the earlier LM benchmarks (BENCH_SETTINGS: 4 layers, 192 wide, 600 steps) against the
demo's (DEMO_SETTINGS), side by side in one process, alternating, so machine load hits both.

    .venv/bin/python bench/tiny_lm_build.py [--steps 10] [--rounds 2] [--threads 2] [--cache /tmp/tiny_lm_bench]

Per settings: the tokenizer and token-stream time, then `--steps` training steps timed per round
(wall and this process's CPU seconds, which the machine's load inflates less), and the whole build
extrapolated from the median step: tokenizer + stream + steps x median step. Building a model to the
end (and its validation loss) is `train_tiny_lm(cache, **settings)`; BENCHMARKS.md records both.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.embedded.text import build_text_corpus
from pipeline.embedded.tiny_lm import BENCH_SETTINGS, DEMO_SETTINGS, _token_stream, train_step, train_tokenizer


def timed_steps(model, optimizer, stream: np.ndarray, settings: dict, steps: int, rng) -> tuple[float, float]:
    """(wall, CPU) seconds per training step over `steps` steps of the build's own loop body."""
    context, batch = settings["context"], settings["batch_size"]
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        train_step(model, optimizer, stream, context, batch, rng)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)  # train_tiny_lm's default
    ap.add_argument("--cache", default="/tmp/tiny_lm_bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts = pq.read_table(build_text_corpus(args.cache)["train"], columns=["text"]).column("text").to_pylist()
    variants = {"before (BENCH_SETTINGS)": BENCH_SETTINGS, "after (DEMO_SETTINGS)": DEMO_SETTINGS}
    built = {}
    for name, s in variants.items():
        t0, c0 = time.perf_counter(), time.process_time()
        tokenizer = train_tokenizer(texts, s["vocab_size"])
        stream = _token_stream(tokenizer, texts)
        prep = (time.perf_counter() - t0, time.process_time() - c0)
        torch.manual_seed(0)
        bos = tokenizer.bos_token_id
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=s["context"], n_embd=s["n_embd"],
                                           n_layer=s["n_layer"], n_head=s["n_head"], bos_token_id=bos,
                                           eos_token_id=bos, pad_token_id=bos, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0))
        optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], betas=(0.9, 0.95), weight_decay=0.0)
        built[name] = {"model": model, "optimizer": optimizer, "stream": stream, "prep": prep, "rounds": [],
                       "params": sum(p.numel() for p in model.parameters())}
    rng = np.random.default_rng(0)
    for _ in range(args.rounds):  # alternating: a load spike hits both variants
        for name, s in variants.items():
            b = built[name]
            b["rounds"].append(timed_steps(b["model"], b["optimizer"], b["stream"], s, args.steps, rng))
    load = os.getloadavg()[0]
    print(f"{args.threads} torch thread(s), {args.rounds} x {args.steps} steps each, load average {load:.1f}")
    print(f"{'variant':<24}{'params':>8}{'steps':>7}{'prep s':>8}{'s/step':>8}{'CPU s/step':>11}"
          f"{'build s':>9}{'build CPU s':>12}")
    for name, s in variants.items():
        b = built[name]
        wall = statistics.median(r[0] for r in b["rounds"])
        cpu = statistics.median(r[1] for r in b["rounds"])
        print(f"{name:<24}{b['params'] / 1e6:>7.2f}M{s['steps']:>7}{b['prep'][0]:>8.1f}{wall:>8.3f}{cpu:>11.3f}"
              f"{b['prep'][0] + s['steps'] * wall:>9.0f}{b['prep'][1] + s['steps'] * cpu:>12.0f}")


if __name__ == "__main__":
    main()
