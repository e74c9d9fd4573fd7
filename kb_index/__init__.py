"""Knowledge bases for retrieval: embed a corpus, build / save / load a faiss index, search it.

No Ray and no `pipeline` imports: workers/ wraps this in a shared actor, pipeline/ exposes
`python -m pipeline build-kb`. Names resolve lazily, so a process that only loads and
searches a KB (the retrieval actor) never imports torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "INDEX_TYPES": "build", "IndexSpec": "build", "build_kb": "build", "make_index": "build",
    "Embedder": "embedders", "ImagePreprocess": "embedders", "SentenceEmbedder": "embedders",
    "TorchFeatureEmbedder": "embedders", "VectorEmbedder": "embedders", "torch_checkpoint_name": "embedders",
    "KnowledgeBase": "index", "get_threads": "index", "load_kb": "index", "set_threads": "index",
    "l2_normalize": "vectors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kb_index' has no attribute '{name}'")
    return getattr(importlib.import_module(f"kb_index.{_EXPORTS[name]}"), name)
