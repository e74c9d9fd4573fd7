"""summary.json's figures (pipeline/job/outputs.py: summarise_run), aggregated part by part, equal the
same figures computed on the whole results table at once."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.job.outputs import summarise_run


def _parts(tmp_path, lm: bool) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    (tmp_path / "results").mkdir()
    frames = []
    for part in range(3):
        k = 50 + 10 * part
        df = pd.DataFrame({
            "sample_id": [f"p{part}-{i}" for i in range(k)],
            "domain": rng.choice(["fog", "snow", None], size=k),
            "correct": pd.array(rng.choice([True, False, None], size=k), dtype="boolean"),
            "error": [None if rng.random() > 0.1 else "bad row" for _ in range(k)],
        })
        if lm:
            df["correct"] = pd.array([None] * k, dtype="boolean")
            df["nll"] = rng.random(k) * 10
            df["n_bytes"] = rng.integers(1, 40, size=k)
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "results" / f"part-{part}.parquet")
        frames.append(df)
    (tmp_path / "results" / "_COMMIT-00000.json").write_text("{}")  # markers are not parts
    return pd.concat(frames, ignore_index=True)


def test_classifier_summary_equals_whole_table(tmp_path):
    df = _parts(tmp_path, lm=False)
    got = summarise_run(tmp_path)
    scored = df[df["correct"].notna()]
    assert got["overall"]["n"] == len(df) and got["overall"]["scored"] == len(scored)
    assert got["overall"]["errors_rows"] == int(df["error"].notna().sum())
    assert math.isclose(got["overall"]["error"], 1 - scored["correct"].astype(bool).mean())
    for domain, group in scored.groupby("domain"):
        assert got["per_domain"][domain]["n"] == len(group)
        assert math.isclose(got["per_domain"][domain]["error"], 1 - group["correct"].astype(bool).mean())
    assert set(got["per_domain"]) == {"fog", "snow"}  # rows without a domain count overall only


def test_lm_bits_per_byte_pool_over_bytes_across_parts(tmp_path):
    df = _parts(tmp_path, lm=True)
    got = summarise_run(tmp_path)
    ok = df[df["error"].isna()]
    assert math.isclose(got["overall"]["bits_per_byte"], ok["nll"].sum() / (ok["n_bytes"].sum() * math.log(2)))
    for domain, group in ok.groupby("domain"):
        assert got["per_domain"][domain]["error"] is None
        assert math.isclose(got["per_domain"][domain]["bits_per_byte"],
                            group["nll"].sum() / (group["n_bytes"].sum() * math.log(2)))
