"""GPU paths: run only where CUDA is visible; elsewhere they skip with the reason."""
import json
from pathlib import Path

import pytest
import torch

from workbench.cli import main

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")]

RECIPE = """
name: gpu-smoke
model: {source: builtin, name: digits-cnn}
task: {type: classification, data: {source: builtin, name: digits}}
variants:
  baseline: {}
export: [onnx, torchscript]
bench:
  backends: [torch-cuda, torchscript-cuda, ort-cuda]
  batch_sizes: [1, 32]
  timing: {warmup: 3, min_iters: 10, min_seconds: 0.1}
"""


def test_cuda_backends_measure_the_digits_cnn(tmp_path: Path):
    recipe = tmp_path / "gpu.yaml"
    recipe.write_text(RECIPE)
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quick"]) == 0
    run = next(p for p in (tmp_path / "out" / "gpu-smoke").iterdir() if p.name != "cache")
    results = json.loads((run / "results.json").read_text())
    assert results["environment"].get("gpu")
    cells = {(c["backend"], c["batch_size"]): c for c in results["cells"]}
    torch_cell = cells[("torch-cuda", 32)]
    assert torch_cell["status"] in ("ok", "unstable"), torch_cell["reason"]
    assert torch_cell["memory"]["cuda_max_allocated"] > 0
    assert torch_cell["accuracy"]["accuracy"] > 0.9
    ort_cell = cells[("ort-cuda", 32)]
    # Either it really ran on CUDA, or it says why (provider missing): never a silent CPU number.
    if ort_cell["status"] in ("ok", "unstable"):
        assert ort_cell["threads"]["providers"][0] == "CUDAExecutionProvider"
    else:
        assert ort_cell["reason"]
