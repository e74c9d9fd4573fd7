"""The shard stream's reading plan (pipeline/job/inputs.py), without Ray: block sizes, block ranges,
and reading a manifest's rows through cached Parquet row groups."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.job.inputs as inputs_module
from pipeline.job.inputs import InputSpec, block_ranges, block_rows, manifest_rows


@pytest.mark.parametrize("start,end,full", [(0, 7500, 1024), (3, 4, 1024), (100, 100, 64), (5, 1000, 1), (0, 50, 7)])
def test_block_ranges_cover_the_rows_in_order(start, end, full):
    ranges = block_ranges(start, end, full)
    rows = [i for r in ranges for i in range(r["lo"], r["hi"])]
    assert rows == list(range(start, end))
    assert all(r["hi"] > r["lo"] for r in ranges)
    sizes = [r["hi"] - r["lo"] for r in ranges]
    assert max(sizes, default=0) <= full and sorted(sizes[:-1]) == sizes[:-1]  # small blocks first


def test_block_rows_default_follows_the_decoded_image_size():
    spec = lambda shape, **kw: InputSpec(manifest="m", kind="image_classifier",  # noqa: E731
                                         model={"image_shape": shape}, num_classes=10, read_timeout_s=None, **kw)
    assert block_rows(spec([1, 28, 28])) == inputs_module.MAX_BLOCK_ROWS
    assert block_rows(spec([3, 224, 224])) == inputs_module.BLOCK_BYTES // (4 * 3 * 224 * 224)
    assert block_rows(spec([3, 224, 224], rows_per_block=10)) == 10


def _manifest(path, n, label=0, row_group_size=None):
    pq.write_table(pa.table({"sample_id": [f"s{i}" for i in range(n)], "label": [label] * n,
                             "pixels": [[i % 256] * 4 for i in range(n)]}), path, row_group_size=row_group_size)


def test_blocks_of_one_big_row_group_read_it_once(tmp_path):
    """A manifest written as one row group is read once per process, not once per block."""
    _manifest(tmp_path / "m.parquet", 3000)
    inputs_module._row_group.cache_clear()
    rows = manifest_rows(str(tmp_path / "m.parquet"))
    got = pa.concat_tables([rows.read(r["lo"], r["hi"]) for r in block_ranges(0, 3000, 100)])
    assert got.equals(pq.read_table(tmp_path / "m.parquet"))
    assert inputs_module._row_group.cache_info().misses == 1


def test_reads_across_row_groups_and_files(tmp_path):
    (tmp_path / "parts").mkdir()
    _manifest(tmp_path / "parts" / "a.parquet", 250, row_group_size=64)
    _manifest(tmp_path / "parts" / "b.parquet", 130, label=1, row_group_size=50)
    rows = manifest_rows(str(tmp_path / "parts"))
    whole = pa.concat_tables([pq.read_table(tmp_path / "parts" / f) for f in ("a.parquet", "b.parquet")])
    assert rows.num_rows == 380
    assert rows.read(200, 300).equals(whole.slice(200, 100))
    with pytest.raises(IndexError):
        rows.read(300, 381)


def test_manifest_rewritten_in_place_is_read_again(tmp_path):
    """Decode processes outlive a run: a manifest rewritten at the same path is not served from cache."""
    path = tmp_path / "m.parquet"
    _manifest(path, 40, label=3)
    assert set(manifest_rows(str(path)).read(0, 40).column("label").to_pylist()) == {3}
    _manifest(path, 40, label=5)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # coarse clocks: make the rewrite visible
    assert set(manifest_rows(str(path)).read(0, 40).column("label").to_pylist()) == {5}


def test_duplicate_sample_ids_are_named(tmp_path):
    from pipeline.manifest import ManifestError, check_manifest

    pq.write_table(pa.table({"sample_id": ["b", "a", "c", "a", "b", "a"], "pixels": [[1]] * 6}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"sample_id 'a' appears more than once \(2 duplicated ids\)"):
        check_manifest(tmp_path / "m.parquet")
    pq.write_table(pa.table({"sample_id": [3, 1, 2], "pixels": [[1]] * 3}), tmp_path / "n.parquet")
    assert check_manifest(tmp_path / "n.parquet") == 3  # integer ids are fine


def _invalid_utf8(values: list[bytes | None]) -> pa.Array:
    """A string column holding bytes that are not UTF-8: Parquet writes it without a word."""
    return pa.array(values, pa.binary()).view(pa.string())


def test_invalid_utf8_in_a_column_becomes_that_rows_error_and_sample_ids_are_checked_at_start(tmp_path):
    from pipeline.manifest import ManifestError, check_manifest

    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"sample_id": ["a", "b", "c"], "label": [0, 1, 2],
                             "path": _invalid_utf8([b"x.png", b"\xc3(.png", b"y.png"]),
                             "domain": _invalid_utf8([b"fog", b"fog", b"f\xffg"])}), path)
    assert check_manifest(path) == 3
    table, errors = inputs_module.utf8_checked(pq.read_table(path))
    assert errors[0] is None
    assert errors[1] == "row 'path' is not valid UTF-8 (byte 0xc3 at offset 0)"
    assert errors[2] == "row 'domain' is not valid UTF-8 (byte 0xff at offset 1)"
    assert table.to_pylist()[0] == {"sample_id": "a", "label": 0, "path": "x.png", "domain": "fog"}
    assert table.column("path")[1].as_py() is None and table.column("domain")[2].as_py() is None
    # through the block decoder: both rows are error rows, the good one is read (and fails on its missing file)
    spec = InputSpec(manifest=str(path), kind="image_classifier", model={"image_shape": [1, 28, 28]},
                     num_classes=10, read_timeout_s=None)
    block = inputs_module.prepare_block({"lo": [0], "hi": [3]}, inputs=spec).to_pylist()
    assert "not valid UTF-8" in block[1]["_error"] and "not valid UTF-8" in block[2]["_error"]
    assert "x.png" in block[0]["_error"]

    pq.write_table(pa.table({"sample_id": _invalid_utf8([b"a", b"\xffb"]), "path": ["x", "y"]}), path)
    with pytest.raises(ManifestError, match=r"row 1's sample_id is not valid UTF-8 \(byte 0xff at offset 0\)"):
        check_manifest(path)
