"""The weight-sync benchmark runs end to end on a small model and reports both kinds of sync."""
import pytest


@pytest.mark.ray
def test_weight_sync_benchmark_reports_both_kinds(tmp_path):
    from benchmarks.weight_sync import main

    rows = main(["--sizes", "1M", "--workers", "2", "--repeats", "1", "--out", str(tmp_path)])
    assert [r["model"] for r in rows] == ["1M"]
    row = rows[0]
    assert 2.5 < row["mbytes"] < 3.5                         # ~0.8 M float32 parameters
    assert row["collective_s"] > 0 and row["object_store_s"] > 0 and 0 < row["checksum_s"] < row["collective_s"]
    assert "| 1M |" in (tmp_path / "weight_sync.md").read_text()
