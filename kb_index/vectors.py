"""Vector helpers shared by embedders and search, kept free of torch so that loading and
searching a KB (the retrieval actor) never pays for importing it."""
from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, float32, C-contiguous (what faiss wants); all-zero rows stay
    zero rather than becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)
