"""`workbench bench MODEL_FILE`: a model file benchmarked without a recipe, and the backends that
the recipe tests do not reach (TorchScript, torch.compile)."""
import json

import pytest

from workbench.cli import main

pytestmark = pytest.mark.slow


def test_bench_an_onnx_file_at_two_batch_sizes(quick_run, tmp_path, capsys):
    onnx_file = quick_run.run_dir / "variants" / "baseline" / "model.onnx"
    out = tmp_path / "bench"
    assert main(["bench", str(onnx_file), "--backend", "ort-cpu", "--batch", "1", "8", "--quick",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [c["batch_size"] for c in results["cells"]] == [1, 8]
    for c in results["cells"]:
        assert c["status"] in ("ok", "unstable"), c["reason"]
        assert c["latency_ms"]["p50"] > 0 and c["threads"]["providers"][0] == "CPUExecutionProvider"
    assert (out / "report.md").is_file()
    assert "ort-cpu" in capsys.readouterr().out


def test_an_ort_cpu_cell_runs_without_importing_torch(quick_run, tmp_path):
    """An ONNX Runtime deployment on CPU does not load torch; its cell's process must not either
    (torch's import and thread pool would sit in its timings and memory)."""
    import subprocess
    import sys

    from bench.cells import cell_job

    onnx_file = quick_run.run_dir / "variants" / "baseline" / "model.onnx"
    io = json.loads(onnx_file.with_name("model.onnx.io.json").read_text())
    timing = {"warmup": 1, "min_iters": 3, "min_seconds": 0.01, "max_seconds": 5, "stability_threshold": 0.25}
    job = cell_job("ort-cpu", onnx_file, io, 2, 1, 1, timing)
    code = ("import json, sys; from bench.worker import run; "
            f"r = run(json.loads({json.dumps(json.dumps(job))})); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'p50': min(r['samples_ms'])}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["p50"] > 0 and out["torch"] is False


def test_bench_a_torchscript_file_reads_its_io_sidecar(quick_run, tmp_path):
    ts_file = quick_run.run_dir / "variants" / "baseline" / "model.torchscript.pt"
    out = tmp_path / "ts"
    assert main(["bench", str(ts_file), "--batch", "2", "--quick", "--out", str(out)]) == 0
    cell = json.loads((out / "results.json").read_text())["cells"][0]
    assert cell["backend"] == "torchscript-cpu" and cell["status"] in ("ok", "unstable"), cell["reason"]


def test_bench_a_torchscript_file_without_inputs_is_an_argument_error(quick_run, tmp_path, capsys):
    ts_file = quick_run.run_dir / "variants" / "baseline" / "model.torchscript.pt"
    lonely = tmp_path / "lonely.pt"
    lonely.write_bytes(ts_file.read_bytes())
    assert main(["bench", str(lonely)]) == 2
    assert "--input" in capsys.readouterr().err


def test_bench_with_a_backend_for_another_format_is_an_argument_error(quick_run, capsys):
    onnx_file = quick_run.run_dir / "variants" / "baseline" / "model.onnx"
    assert main(["bench", str(onnx_file), "--backend", "torch-cpu"]) == 2
    assert "Accepted" in capsys.readouterr().err


def test_torch_compile_cell_reports_compile_time_apart(write_recipe, tmp_out):
    recipe = write_recipe({
        "name": "compiled", "model": {"source": "builtin", "name": "digits-cnn"},
        "task": {"type": "classification", "data": {"source": "builtin", "name": "digits"}},
        "variants": {"baseline": {}}, "export": {"formats": []},
        "bench": {"backends": ["torch-compile-cpu"], "batch_sizes": [4],
                  "timing": {"warmup": 2, "min_iters": 5, "min_seconds": 0.05}}})
    assert main(["run", str(recipe), "--out", str(tmp_out), "--quick"]) == 0
    run = next(d for d in (tmp_out / "compiled").iterdir() if d.name != "cache")
    cell = json.loads((run / "results.json").read_text())["cells"][0]
    assert cell["status"] in ("ok", "unstable"), cell["reason"]
    assert cell["cold"]["compile_s"] > 0
    # The first (compiling) call is far slower than a warm one and is kept out of the samples.
    assert cell["cold"]["first_call_ms"] > cell["latency_ms"]["p50"]
    assert cell["accuracy"]["accuracy"] > 0.9


def test_bench_a_torch_export_program(quick_run, tmp_path):
    """A .pt2 written by export_pt2 runs on the torch-export-cpu backend and computes what its module does."""
    import numpy as np
    import torch

    from core.backends import BACKENDS
    from export.torch_export import export_pt2
    from core.model import ModelIO
    from core.modelfile import load_module

    variant_dir = quick_run.run_dir / "variants" / "baseline"
    module = load_module(variant_dir / "module.pt")
    io = ModelIO.from_json(json.loads((variant_dir / "model.onnx.io.json").read_text()))
    pt2 = tmp_path / "digits.pt2"
    assert export_pt2(module, io, pt2)["exporter"] == "torch.export"
    (tmp_path / "digits.pt2.io.json").write_text(json.dumps(io.to_json()))

    x = io.make(batch=3, seq=16, seed=1)  # a batch size the program was not traced at
    runner = BACKENDS["torch-export-cpu"].load(str(pt2), threads=1)
    with torch.no_grad():
        expected = module(**{k: torch.from_numpy(v) for k, v in x.items()}).numpy()
    np.testing.assert_allclose(runner.outputs(runner.prepare(x)), expected, atol=1e-5)

    out = tmp_path / "pt2"
    assert main(["bench", str(pt2), "--batch", "2", "--quick", "--out", str(out)]) == 0
    cell = json.loads((out / "results.json").read_text())["cells"][0]
    assert cell["backend"] == "torch-export-cpu" and cell["format"] == "torch-export"
    assert cell["status"] in ("ok", "unstable"), cell["reason"]


def test_a_cells_memory_does_not_depend_on_how_long_it_was_timed(quick_run, tmp_path):
    """The memory figure is read in its own phase before the timed loop, and no statistics are
    computed in the cell's process: 20 or 20,000 iterations give the same peak."""
    import subprocess
    import sys

    from bench.cells import cell_job

    onnx_file = quick_run.run_dir / "variants" / "baseline" / "model.onnx"
    io = json.loads(onnx_file.with_name("model.onnx.io.json").read_text())
    peaks = {}
    for iters in (20, 20000):
        timing = {"warmup": 1, "min_iters": iters, "min_seconds": 0.0, "max_seconds": 60, "stability_threshold": 0.25}
        job = cell_job("ort-cpu", onnx_file, io, 1, 1, 1, timing)
        code = ("import json; from bench.worker import run; "
                f"r = run(json.loads({json.dumps(json.dumps(job))})); "
                "print(json.dumps({'n': len(r['samples_ms']), 'peak': r['memory']['peak_rss_delta']}))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
        out = json.loads(proc.stdout.splitlines()[-1])
        assert out["n"] == iters
        peaks[iters] = out["peak"]
    assert abs(peaks[20000] - peaks[20]) < 4 * 1024 * 1024, peaks
    assert peaks[20] < 150 * 1024 * 1024  # a 10 KB CNN's cell is not charged for the tool
