"""An end-to-end quick run (the session's `quick_run`) against the outside of the tool: the run
directory layout and the results.json schema of shared/CONTRACT.md, the report made from
results.json alone, export parity, and the variant cache that lets a re-run resume."""
from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser

import pandas as pd
import pytest

from workbench.cli import main

pytestmark = pytest.mark.slow

TOP_LEVEL = ["schema_version", "recipe", "environment", "started", "finished", "quick", "variants", "cells"]
CELL_KEYS = ["variant", "format", "backend", "device", "batch_size", "shape", "status", "reason"]
LATENCY_KEYS = ["p50", "p90", "p95", "p99", "mean", "std", "n", "ci95"]
VARIANT_KEYS = ["name", "parent", "steps", "params", "size_bytes", "sparsity", "accuracy", "accuracy_delta",
                "status", "error"]
MEASURED = ("ok", "unstable")


def cells_of(results, variant=None, backend=None):
    return [c for c in results["cells"]
            if (variant is None or c["variant"] == variant) and (backend is None or c["backend"] == backend)]


def variant(results, name):
    return next(v for v in results["variants"] if v["name"] == name)


# ----------------------------------------------------------------------------- results.json
def test_run_exits_0(quick_run):
    # The fixture asserted the 0; what backs it is a status.json that says finished, for this recipe.
    status = json.loads((quick_run.run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["quick"] is True
    assert status["recipe"]["sha256"] == quick_run.results["recipe"]["sha256"]
    assert status["recipe"]["path"] == str(quick_run.recipe_path.resolve())


def test_results_json_has_the_contract_top_level_keys(quick_run):
    r = quick_run.results
    for key in TOP_LEVEL:
        assert key in r, key
    assert r["schema_version"] == 1
    assert r["recipe"]["name"] == quick_run.recipe["name"]
    assert len(r["recipe"]["sha256"]) == 64
    assert r["recipe"]["parsed"]["bench"]["batch_sizes"] == [1, 4]
    assert r["started"] <= r["finished"]


def test_environment_names_libraries_and_cores(quick_run):
    env = quick_run.results["environment"]
    text = json.dumps(env).lower()
    for lib in ("python", "torch", "onnxruntime"):
        assert lib in text, lib


def test_quick_flag_is_recorded_and_reported(quick_run):
    assert quick_run.results["quick"] is True
    assert "QUICK" in (quick_run.run_dir / "report.md").read_text()
    assert "QUICK" in (quick_run.run_dir / "report.html").read_text()


def test_every_variant_is_recorded_with_its_lineage(quick_run):
    vs = {v["name"]: v for v in quick_run.results["variants"]}
    assert set(vs) == set(quick_run.recipe["variants"])
    for v in vs.values():
        for key in VARIANT_KEYS:
            assert key in v, (v["name"], key)
        assert v["status"] == "ok", v["error"]
        assert v["size_bytes"] > 0 and v["params"] > 0
        assert 0.0 <= v["sparsity"] <= 1.0
    assert vs["baseline"]["parent"] is None and vs["baseline"]["steps"] == []
    assert vs["torch-int8"]["parent"] == "baseline"
    assert vs["torch-int8"]["steps"][0]["name"] == "quantize"
    assert vs["torch-int8"]["steps"][0]["params"]["method"] == "dynamic-int8"  # defaults filled in
    assert vs["ort-int8"]["steps"][0]["name"] == "onnx-quantize"


def test_variant_accuracy_and_delta_against_baseline(quick_run):
    vs = {v["name"]: v for v in quick_run.results["variants"]}
    assert vs["baseline"]["accuracy"]["accuracy"] > 0.9
    assert vs["baseline"]["accuracy_delta"]["accuracy"] == 0.0
    for name in ("torch-int8", "ort-int8"):
        acc = vs[name]["accuracy"]["accuracy"]
        assert vs[name]["accuracy_delta"]["accuracy"] == pytest.approx(acc - vs["baseline"]["accuracy"]["accuracy"],
                                                                      abs=1e-6)


def test_one_cell_per_variant_backend_and_batch(quick_run):
    cells = quick_run.results["cells"]
    plan = {(v, b, n) for v in quick_run.recipe["variants"] for b in quick_run.recipe["bench"]["backends"]
            for n in quick_run.recipe["bench"]["batch_sizes"]}
    assert {(c["variant"], c["backend"], c["batch_size"]) for c in cells} == plan
    assert len(cells) == len(plan)


def test_every_cell_has_the_contract_keys(quick_run):
    for c in quick_run.results["cells"]:
        for key in CELL_KEYS:
            assert key in c, (c["variant"], c["backend"], key)
        assert c["status"] in ("ok", "failed", "skipped", "unstable")
        assert c["device"] == "cpu"
        assert c["format"] == {"torch-cpu": "torch", "ort-cpu": "onnx"}[c["backend"]]


def test_cells_that_did_not_run_say_why(quick_run):
    for c in quick_run.results["cells"]:
        if c["status"] in ("failed", "skipped"):
            assert isinstance(c["reason"], str) and c["reason"].strip(), c
            assert "latency_ms" not in c


def test_measured_cells_have_latency_throughput_memory_and_accuracy(quick_run):
    measured = [c for c in quick_run.results["cells"] if c["status"] in MEASURED]
    # baseline on both backends and both batches, torch-int8 on torch, ort-int8 on ORT at least
    assert len(measured) >= 8
    for c in measured:
        lat = c["latency_ms"]
        for key in LATENCY_KEYS:
            assert key in lat, key
        assert lat["n"] >= 5  # bench.timing.min_iters
        # p50 is the median of the processes' medians; the tail percentiles are over all samples.
        assert 0 < lat["p50"] and 0 < lat["p90"] <= lat["p95"] <= lat["p99"]
        assert lat["ci95"][0] <= lat["p50"] <= lat["ci95"][1]
        assert c["throughput"] == pytest.approx(c["batch_size"] * 1e3 / lat["p50"], rel=1e-3)
        # peak_rss_delta is clamped at 0, so `>= 0` could not fail: a load and a few calls raise the peak
        # (tens of MB even for this 10 KB CNN), under a bound; the idle figure is the backend's libraries'.
        mem = c["memory"]
        assert isinstance(mem["peak_rss_delta"], int) and 0 < mem["peak_rss_delta"] < 150 * 2**20, mem
        assert mem["rss_idle_baseline"] > 20 * 2**20, mem
        assert 0.0 <= c["accuracy"]["accuracy"] <= 1.0
        # Measured in two processes (--quick), one per interleaved round; their raw samples are kept.
        assert [r["round"] for r in sorted(c["repeats"], key=lambda r: r["round"])] == [0, 1]
        assert sum(r["n"] for r in c["repeats"]) == lat["n"] and lat["processes"] == 2
        # A fast cell keeps every k-th raw sample (k = samples_stride) beyond bench.rounds.KEEP_SAMPLES.
        assert all(len(r["samples_ms"]) == -(-r["n"] // r["samples_stride"]) for r in c["repeats"])
        assert min(r["p50"] for r in c["repeats"]) <= lat["p50"] <= max(r["p50"] for r in c["repeats"])


def test_baseline_is_measured_on_every_backend_and_batch(quick_run):
    for c in cells_of(quick_run.results, variant="baseline"):
        assert c["status"] in MEASURED, c["reason"]
        assert c["accuracy"]["accuracy"] > 0.9


def test_onnx_quantize_variant_is_an_onnx_graph_and_skips_torch(quick_run):
    r = quick_run.results
    assert variant(r, "ort-int8")["format"] == "onnx"
    assert variant(r, "torch-int8")["format"] == "torch"
    torch_cells = cells_of(r, variant="ort-int8", backend="torch-cpu")
    assert len(torch_cells) == 2
    for c in torch_cells:
        assert c["status"] == "skipped"
        assert "onnx" in c["reason"].lower()
    for c in cells_of(r, variant="ort-int8", backend="ort-cpu"):
        assert c["status"] in MEASURED, c["reason"]


def test_torch_int8_variant_is_measured_on_torch(quick_run):
    for c in cells_of(quick_run.results, variant="torch-int8", backend="torch-cpu"):
        assert c["status"] in MEASURED, c["reason"]


# ----------------------------------------------------------------------------- export parity
def test_baseline_exports_match_the_source_module(quick_run):
    arts = [a for a in quick_run.results["artifacts"]
            if a["variant"] == "baseline" and a["format"] in ("onnx", "torchscript")]
    assert {a["format"] for a in arts} == {"onnx", "torchscript"}
    for a in arts:
        assert a["status"] == "ok", a["reason"]
        assert a["parity"]["max_abs_diff"] < 1e-4
        assert a["parity"]["top1_agreement"] == 1.0
        assert (quick_run.run_dir / a["path"]).is_file()


def test_measured_cells_carry_their_artifact_parity(quick_run):
    for c in cells_of(quick_run.results, variant="baseline", backend="ort-cpu"):
        assert c["parity"]["max_abs_diff"] < 1e-4


# ----------------------------------------------------------------------------- run directory
def test_run_directory_layout(quick_run):
    d = quick_run.run_dir
    for name in ("results.json", "results.csv", "report.md", "report.html", "run.log"):
        assert (d / name).is_file(), name
        assert (d / name).stat().st_size > 0, name
    assert len(list((d / "plots").glob("*.png"))) >= 2
    for v in quick_run.recipe["variants"]:
        assert (d / "variants" / v).is_dir(), v
        assert any((d / "variants" / v).iterdir()), v
    assert (d / "variants" / "ort-int8" / "model.onnx").is_file()
    assert (d / "variants" / "baseline" / "model.torchscript.pt").is_file()
    status = json.loads((d / "status.json").read_text())
    assert status["state"] == "finished" and status["finished"] >= status["started"]
    assert "run finished" in (d / "run.log").read_text()


def test_variant_files_listed_in_results_exist(quick_run):
    for v in quick_run.results["variants"]:
        assert v["files"], v["name"]
        for f in v["files"]:
            assert (quick_run.run_dir / f).is_file(), f


def test_no_scratch_files_are_left_behind(quick_run):
    work = quick_run.run_dir / ".work"
    leftovers = list(work.rglob("*")) if work.exists() else []
    assert leftovers == []


def test_run_log_records_the_run(quick_run):
    log = (quick_run.run_dir / "run.log").read_text()
    assert "variant baseline" in log
    assert "cell baseline torch-cpu b1" in log


def test_results_csv_has_one_row_per_cell(quick_run):
    df = pd.read_csv(quick_run.run_dir / "results.csv")
    assert len(df) == len(quick_run.results["cells"])
    for col in ("variant", "backend", "batch_size", "status", "latency_ms.p50", "throughput",
                "memory.peak_rss_delta"):
        assert col in df.columns, col
    assert "samples_ms" not in df.columns
    ok = df[df.status.isin(MEASURED)]
    assert ok["latency_ms.p50"].notna().all()


def test_cells_load_as_a_dataframe(quick_run):
    df = pd.read_json(io.StringIO(json.dumps(quick_run.results["cells"])))
    assert len(df) == len(quick_run.results["cells"])
    assert set(CELL_KEYS) <= set(df.columns)


# ----------------------------------------------------------------------------- report
class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src"))


def test_report_html_is_self_contained(quick_run):
    parser = _Images()
    parser.feed((quick_run.run_dir / "report.html").read_text())
    assert len(parser.srcs) >= 2
    prefix = "data:image/png;base64,"
    for src in parser.srcs:
        assert src.startswith(prefix), src[:60]
        assert base64.b64decode(src[len(prefix):], validate=True).startswith(b"\x89PNG\r\n\x1a\n")


def test_report_md_has_the_sections_a_person_reads(quick_run):
    md = (quick_run.run_dir / "report.md").read_text()
    for heading in ("## Recommendation", "## Variants", "## Exported artifacts and parity", "## Lineage",
                    "## Environment"):
        assert heading in md, heading
    for v in quick_run.recipe["variants"]:
        assert f"`{v}`" in md


def test_report_rebuilds_from_results_json_alone(quick_run, tmp_path, capsys):
    fresh = tmp_path / "copy"
    fresh.mkdir()
    shutil.copy2(quick_run.run_dir / "results.json", fresh / "results.json")

    assert main(["report", str(fresh)]) == 0
    assert "report.md" in capsys.readouterr().out
    for name in ("report.md", "report.html", "results.csv"):
        assert (fresh / name).is_file(), name
    assert len(list((fresh / "plots").glob("*.png"))) >= 2
    assert sorted(p.name for p in (fresh / "plots").glob("*.png")) == \
        sorted(p.name for p in (quick_run.run_dir / "plots").glob("*.png"))
    # The same results give the same document.
    assert (fresh / "report.md").read_text() == (quick_run.run_dir / "report.md").read_text()
    parser = _Images()
    parser.feed((fresh / "report.html").read_text())
    assert parser.srcs and all(s.startswith("data:image/png;base64,") for s in parser.srcs)


def test_report_rebuilds_deleted_files_in_place(quick_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(quick_run.run_dir, d)
    for name in ("report.md", "report.html", "results.csv"):
        (d / name).unlink()
    shutil.rmtree(d / "plots")

    assert main(["report", str(d)]) == 0
    assert (d / "report.md").read_text() == (quick_run.run_dir / "report.md").read_text()
    assert (d / "report.html").is_file() and (d / "results.csv").is_file()
    assert len(list((d / "plots").glob("*.png"))) >= 2


def test_report_of_a_folder_without_results_json_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "results.json" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the cache (resume)
def test_rerun_reuses_every_variant_from_the_cache(quick_run):
    """What makes an interrupted run resumable: finished variants are in the cache, so running the
    same recipe into the same --out builds nothing again."""
    first = quick_run.results
    assert all(v["cached"] is False for v in first["variants"])  # the session run built them

    rc = main(["run", str(quick_run.recipe_path), "--out", str(quick_run.out_root), "--quick"])
    assert rc == 0
    base = quick_run.out_root / quick_run.recipe["name"]
    dirs = [d for d in base.iterdir() if d.is_dir() and d.name != "cache" and d != quick_run.run_dir]
    assert len(dirs) == 1
    second = json.loads((dirs[0] / "results.json").read_text())

    assert [v["name"] for v in second["variants"]] == [v["name"] for v in first["variants"]]
    for v in second["variants"]:
        assert v["status"] == "ok", v["error"]
        assert v["cached"] is True, v["name"]
    # Reused, not rebuilt differently: the same models give the same accuracy and size.
    for a, b in zip(first["variants"], second["variants"]):
        assert a["accuracy"] == b["accuracy"]
        assert a["size_bytes"] == b["size_bytes"]
    assert "reused from cache" in (dirs[0] / "report.md").read_text()


def test_every_cell_is_also_compared_with_one_reference_across_backends(quick_run):
    """Same-backend speedups cannot say how much faster ONNX Runtime is than PyTorch; a second column
    compares every cell with the baseline on the recipe's first backend, paired by round."""
    from reporting.analysis import reference_speedups

    backend, ref = reference_speedups(quick_run.results)
    assert backend == "torch-cpu"
    cells = quick_run.results["cells"]
    ort_base = next(i for i, c in enumerate(cells) if c["variant"] == "baseline" and c["backend"] == "ort-cpu")
    point, lo, hi = ref[ort_base]
    assert lo <= point <= hi and point > 0
    torch_base = next(i for i, c in enumerate(cells) if c["variant"] == "baseline" and c["backend"] == "torch-cpu")
    assert ref[torch_base][0] == 1.0
    assert "vs baseline on torch-cpu" in (quick_run.run_dir / "report.md").read_text()
