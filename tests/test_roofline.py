"""Roofline: a measured peak for this machine, and each cell's fraction of it."""
from bench.roofline import annotate, probe


def test_probe_measures_positive_peaks(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    peak = probe(1)
    assert peak["peak_flops_per_s"] > 1e8 and peak["peak_bytes_per_s"] > 1e8
    assert peak["threads"] == 1


def test_annotate_gives_fractions_of_the_peak_for_measured_cpu_cells():
    peak = {"peak_flops_per_s": 1e10, "peak_bytes_per_s": 1e10}
    cells = [{"variant": "v", "device": "cpu", "flops": 1e8, "latency_ms": {"p50": 20.0}},
             {"variant": "v", "device": "cpu", "status": "skipped"}]
    annotate(cells, {"v": 1e8}, peak)
    assert abs(cells[0]["roofline_fraction"] - 0.5) < 1e-9  # 1e8 FLOPs in 20 ms = 5e9 FLOP/s
    assert abs(cells[0]["bandwidth_fraction"] - 0.5) < 1e-9
    assert "roofline_fraction" not in cells[1]
