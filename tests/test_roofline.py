"""Roofline: a measured peak for this machine, and each cell's fraction of it."""
from bench.roofline import annotate, paper_peaks, probe


def test_probe_measures_positive_peaks(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    peak = probe(1)
    assert peak["peak_flops_per_s"] > 1e8 and peak["peak_bytes_per_s"] > 1e8
    assert peak["threads"] == 1


def test_annotate_gives_fractions_of_the_peak_for_measured_cpu_cells():
    peak = {"peak_flops_per_s": 1e10, "peak_bytes_per_s": 1e10}
    cells = [{"variant": "v", "device": "cpu", "batch_size": 1, "flops": 1e8, "latency_ms": {"p50": 20.0}},
             {"variant": "v", "device": "cpu", "batch_size": 1, "status": "skipped"}]
    annotate(cells, [{"name": "v", "steps": [], "streamed_weight_bytes": 1e8}], peak)
    assert abs(cells[0]["roofline_fraction"] - 0.5) < 1e-9  # 1e8 FLOPs in 20 ms = 5e9 FLOP/s
    assert abs(cells[0]["bandwidth_fraction"] - 0.5) < 1e-9
    assert "roofline_fraction" not in cells[1]


def test_a_probe_that_read_low_is_measured_again_and_the_fraction_never_passes_1(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    # As if the copy probe had run while the machine was busy: 1 MB/s, far below any real copy.
    peak = {"peak_flops_per_s": 1e10, "peak_bytes_per_s": 1e6, "threads": 1}
    cells = [{"variant": "v", "device": "cpu", "batch_size": 1, "latency_ms": {"p50": 1000.0}},
             {"variant": "w", "device": "cpu", "batch_size": 1, "latency_ms": {"p50": 1.0}}]
    annotate(cells, [{"name": "v", "steps": [], "streamed_weight_bytes": 2e6},
                     {"name": "w", "steps": [], "streamed_weight_bytes": 1e12}], peak)
    assert peak["peak_bytes_per_s"] > 1e8 and "re_measured" in peak  # the probe ran again, now
    assert cells[0]["bandwidth_fraction"] < 0.01
    assert cells[1]["bandwidth_fraction"] == 1.0 and cells[1]["bandwidth_above_probe"] > 1  # said, not hidden


def test_paper_peaks_follow_the_vector_units_the_cpu_has():
    avx2 = paper_peaks(2, {"avx2", "fma"}, ghz=2.0)
    vnni = paper_peaks(2, {"avx512f", "avx512_vnni"}, ghz=2.0)
    amx = paper_peaks(2, {"avx512f", "avx512_vnni", "amx_int8", "amx_bf16"}, ghz=2.0)
    assert avx2["fp32"] == 2 * 2e9 * 32  # 8 lanes x FMA x 2 pipes per core
    assert vnni["fp32"] == 2 * avx2["fp32"] and vnni["int8"] == 8 * vnni["fp32"]
    assert amx["int8"] > vnni["int8"] and amx["bf16"] > amx["fp32"]


def test_int8_cells_count_against_the_int8_peak_with_their_parents_flops_and_stay_under_100_percent():
    variants = [{"name": "base", "steps": [], "flops": 1e9},
                {"name": "q", "parent": "base", "steps": [{"name": "onnx-quantize", "params": {"mode": "dynamic"}}]},
                {"name": "w4", "parent": "base", "steps": [{"name": "onnx-quantize", "params": {"mode": "int4"}}]}]
    # A measured fp32 probe far below what the int8 cell reaches: the int8 paper peak is its ceiling.
    peak = {"peak_flops_per_s": 1e10, "peak_bytes_per_s": 1e10, "paper": {"fp32": 4e10, "int8": 3.2e11}}
    cells = [{"variant": v, "device": "cpu", "batch_size": 8, "latency_ms": {"p50": ms}} for v, ms in (("q", 50.0),
                                                                                                     ("w4", 500.0))]
    annotate(cells, variants, peak)
    q, w4 = cells
    assert q["roofline_precision"] == "int8" and q["achieved_flops_per_s"] == 8e9 / 0.05
    assert q["roofline_fraction"] == round(1.6e11 / 3.2e11, 4) <= 1.0
    # Weight-only int4 dequantizes to fp32: it counts against the fp32 ceiling (paper 4e10 > probe 1e10).
    assert w4["roofline_precision"] == "fp32" and w4["roofline_fraction"] == round(1.6e10 / 4e10, 4)

