"""workbench.api: the Python API for notebooks and CI. Real runs on tiny things (the built-in digits
CNN, a one-MatMul ONNX file); the argument errors and the matplotlib check run without a run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import RecipeError
from workbench import api

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "name": "api-digits",
    "model": {"source": "builtin", "name": "digits-cnn"},
    "task": {"type": "classification", "data": {"source": "builtin", "name": "digits"}},
    "variants": {"baseline": {}, "int8": {"from": "baseline", "steps": [{"quantize": {"method": "dynamic-int8"}}]}},
    "export": {"formats": []},
    "bench": {"backends": ["torch-cpu"], "batch_sizes": [1], "repeats": 2, "accuracy": False,
              # a smoke timing on a loaded machine: no cell may be set aside as unstable
              "timing": {"warmup": 2, "min_iters": 5, "min_seconds": 0.05, "stability_threshold": 100.0}},
}


def _tiny(**edit) -> dict:
    recipe = json.loads(json.dumps(TINY))
    recipe.update(edit)
    return recipe


# ----------------------------------------------------------------------------- no run
def test_a_bad_recipe_dict_raises_recipe_error_naming_the_field(tmp_path):
    bad = _tiny(bench={"backends": ["no-such-backend"]})
    with pytest.raises(RecipeError, match=r"bench\.backends"):
        api.run(bad, out=tmp_path)
    bad = _tiny(variants={"baseline": {}, "q": {"from": "nowhere"}})
    with pytest.raises(RecipeError, match=r"variants\.q\.from"):
        api.run(bad, out=tmp_path)
    assert not (tmp_path / "api-digits").exists()  # nothing was started


def test_bad_arguments_raise_recipe_error_not_system_exit(tmp_path):
    with pytest.raises(RecipeError, match="executor"):
        api.run(_tiny(), out=tmp_path, executor="slurm")
    with pytest.raises(RecipeError, match="--ray-address"):
        api.run(_tiny(), out=tmp_path, ray_address="127.0.0.1:6379")
    with pytest.raises(RecipeError, match="cannot read"):
        api.run(tmp_path / "missing.yaml", out=tmp_path)
    with pytest.raises(RecipeError, match="no such file"):
        api.bench_file(tmp_path / "missing.onnx", out=tmp_path / "b")
    with pytest.raises(RecipeError, match="no results.json"):
        api.compare(tmp_path, tmp_path)


def test_relative_paths_in_a_dict_resolve_against_the_current_directory(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "digits.npz").write_bytes(b"")  # only its existence is checked before a run
    recipe = _tiny(task={"type": "classification", "data": {"source": "file", "path": "data/digits.npz"}})
    monkeypatch.chdir(tmp_path)
    parsed = api._recipe_from_dict(recipe)
    assert parsed.resolve("data/digits.npz") == tmp_path / "data" / "digits.npz"
    assert parsed.path is None and len(parsed.sha256) == 64
    monkeypatch.chdir(data)  # made absolute when given: a later chdir does not move it
    assert parsed.resolve("data/digits.npz") == tmp_path / "data" / "digits.npz"
    with pytest.raises(RecipeError, match=r"task\.data\.path"):
        api._recipe_from_dict(recipe)  # from data/, there is no data/data/digits.npz


def test_importing_the_api_leaves_matplotlib_backend_alone_and_reports_still_draw(tmp_path):
    """workbench, workbench.api and the plotting modules switch no backend at import, and a committed
    example's report rebuilds from its results.json (every plot drawn on figures of their own)."""
    example = ROOT / "reports" / "examples" / "minilm-int8-cpu"
    run_dir = tmp_path / "minilm-int8-cpu"
    run_dir.mkdir()
    shutil.copy(example / "results.json", run_dir / "results.json")
    code = f"""
import matplotlib
matplotlib.use("svg")
import workbench, workbench.api
import reporting.plots, reporting.compare, reporting.lm_report, reporting.report
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
from reporting.report import write_report
write_report({str(run_dir)!r})
import reporting.compare as c
rows = [{{"variant": "a", "backend": "ort-cpu", "batch_size": 1, "change": 0.01, "change_ci95": [-0.02, 0.04],
         "verdict": "no significant difference"}}]
c.plot(rows, {str(tmp_path / "compare.png")!r}, 0.05)
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
import sys
assert "matplotlib.pyplot" not in sys.modules
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = sorted(p.name for p in (example / "plots").glob("*.png"))
    assert sorted(p.name for p in (run_dir / "plots").glob("*.png")) == expected
    for name in expected:
        assert (run_dir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "compare.png").stat().st_size > 1000
    result = api.load_run(run_dir)
    assert result.report.is_file() and result.report_md.is_file()
    assert result.recommendation is not None and result.recommendation.variant in {
        v["name"] for v in result.results["variants"]}


# ----------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def dict_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "out"
    before = {"sigint": signal.getsignal(signal.SIGINT), "sigterm": signal.getsignal(signal.SIGTERM),
              "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}}
    import torch

    threads = torch.get_num_threads()
    result = api.run(_tiny(), out=out, quick=True)
    after = {"sigint": signal.getsignal(signal.SIGINT), "sigterm": signal.getsignal(signal.SIGTERM),
             "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}}
    return result, before, after, threads, torch.get_num_threads()


@pytest.mark.slow
def test_run_a_dict_recipe_returns_cells_recommendation_and_report(dict_run):
    result, *_ = dict_run
    assert result.run_dir.parent.name == "api-digits"
    assert result.results["quick"] is True and result.results["recipe"]["path"] is None
    assert len(result.results["recipe"]["sha256"]) == 64
    df = result.cells
    assert len(df) == len(result.results["cells"]) == 2  # two variants x one backend x one batch size
    assert set(df["variant"]) == {"baseline", "int8"} and set(df["backend"]) == {"torch-cpu"}
    assert df["status"].isin(["ok", "unstable"]).all(), df[["variant", "status", "reason"]]
    assert (df["latency_ms.p50"] > 0).all()
    rec = result.recommendation
    assert rec is not None and rec.variant in TINY["variants"] and rec.backend == "torch-cpu" and rec.batch_size == 1
    assert rec.p50_ms > 0 and rec.metric == "accuracy"
    if rec.variant != "baseline":
        assert rec.speedup is not None and rec.speedup_ci95[0] <= rec.speedup <= rec.speedup_ci95[1]
    assert result.report == result.run_dir / "report.html" and result.report.is_file()
    assert result.report_md.is_file()
    assert json.loads((result.run_dir / "status.json").read_text())["state"] == "finished"


@pytest.mark.slow
def test_run_leaves_signal_handlers_environment_and_torch_threads_alone(dict_run):
    _, before, after, threads_before, threads_after = dict_run
    assert before == after
    assert threads_before == threads_after


@pytest.mark.slow
def test_compare_a_run_with_itself_says_same_recommendation(dict_run):
    result, *_ = dict_run
    d = api.compare(result, result.run_dir)
    assert d["verdict"]["same_recommendation"] is True
    assert d["verdict"]["recommendation_a"]["variant"] == result.recommendation.variant
    assert len(d["cells"]) == 2 and d["significant"] == []
    assert all(c["change"] == pytest.approx(0, abs=1e-9) for c in d["cells"])
    assert d["margin"] == pytest.approx(0.05) and api.compare(result, result, "10%")["margin"] == pytest.approx(0.1)
    assert not any(p.name.startswith("compare-vs") for p in result.run_dir.iterdir())  # the API writes nothing


def _tiny_onnx(path: Path) -> Path:
    """x [batch, 16] float -> x @ W [16, 4]: a one-MatMul graph with a symbolic batch dimension."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.mark.slow
def test_bench_file_of_an_onnx_file_returns_its_cells(tmp_path):
    onnx_file = _tiny_onnx(tmp_path / "tiny.onnx")
    result = api.bench_file(onnx_file, batch_sizes=(1, 4), quick=True, out=tmp_path / "bench")
    assert result.run_dir == tmp_path / "bench"
    df = result.cells
    assert list(df["batch_size"]) == [1, 4] and set(df["backend"]) == {"ort-cpu"}  # the default for .onnx here
    assert df["status"].isin(["ok", "unstable"]).all(), df[["status", "reason"]]
    assert (df["latency_ms.p50"] > 0).all()
    assert result.report_md.is_file() and result.report.is_file()
    with pytest.raises(RecipeError, match="Accepted"):
        api.bench_file(onnx_file, backends="torch-cpu", out=tmp_path / "wrong")
