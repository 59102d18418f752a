"""GPU paths: run only where CUDA is visible; elsewhere they skip with the reason.

On the digits CNN: CUDA-event timing on torch-cuda and TorchScript, ONNX Runtime's CUDA provider
with IOBinding (proven by reading the session's providers back), fp16 / bf16 and bitsandbytes nf4
on CUDA, distillation on the GPU, the CUDA allocator's figures, and torch.compile on CUDA."""
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
  fp16: {from: baseline, steps: [{quantize: {method: fp16}}]}
  bf16: {from: baseline, steps: [{quantize: {method: bf16}}]}
  nf4: {from: baseline, steps: [{quantize: {method: bnb-nf4, compute_dtype: float16}}]}
  pruned-kd: {from: baseline, steps: [{prune: {method: structured, ratio: 0.5}},
                                      {distill: {teacher: baseline, epochs: 3, device: cuda}}]}
export: {formats: [onnx, torchscript], parity: {max_abs_diff: 0.05}}
bench:
  backends: [torch-cuda, torchscript-cuda, ort-cuda]
  batch_sizes: [32]
  timing: {warmup: 3, min_iters: 10, min_seconds: 0.1}
"""


def _run(tmp_path: Path, text: str, name: str) -> dict:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(text)
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quick"]) == 0
    run = next(p for p in (tmp_path / "out" / name).iterdir() if p.name != "cache")
    return json.loads((run / "results.json").read_text())


def test_cuda_backends_precisions_and_distillation_on_the_digits_cnn(tmp_path: Path):
    results = _run(tmp_path, RECIPE, "gpu-smoke")
    assert results["environment"].get("gpu")
    variants = {v["name"]: v for v in results["variants"]}
    assert all(v["status"] == "ok" for v in variants.values()), [(v["name"], v["error"]) for v in variants.values()]
    assert variants["pruned-kd"]["notes"][1]["device"] == torch.cuda.get_device_name(0)
    cells = {(c["variant"], c["backend"]): c for c in results["cells"]}
    for name in ("baseline", "fp16", "bf16", "nf4", "pruned-kd"):
        c = cells[(name, "torch-cuda")]
        assert c["status"] in ("ok", "unstable"), (name, c["reason"])
        assert c["memory"]["cuda_max_allocated"] >= c["memory"]["cuda_allocated_after_load"] > 0
        assert c["accuracy"]["accuracy"] > 0.9, name
    loaded = {n: cells[(n, "torch-cuda")]["memory"]["cuda_allocated_after_load"] for n in ("baseline", "fp16", "nf4")}
    assert loaded["nf4"] < loaded["baseline"] and loaded["fp16"] < loaded["baseline"], loaded
    assert cells[("baseline", "torchscript-cuda")]["status"] in ("ok", "unstable")
    ort_cell = cells[("baseline", "ort-cuda")]
    # Either it really ran on CUDA, or it says why (provider missing): never a silent CPU number.
    if ort_cell["status"] in ("ok", "unstable"):
        assert ort_cell["threads"]["providers"][0] == "CUDAExecutionProvider"
        assert ort_cell["threads"]["io_binding"] is True
        assert ort_cell["accuracy"]["accuracy"] > 0.9
    else:
        assert ort_cell["reason"]


def test_torch_compile_on_cuda_keeps_compile_time_apart(tmp_path: Path):
    text = RECIPE.replace("name: gpu-smoke", "name: gpu-compile").replace(
        "backends: [torch-cuda, torchscript-cuda, ort-cuda]", "backends: [torch-compile-cuda]")
    text = text[:text.index("  fp16:")] + text[text.index("export:"):]
    cell = _run(tmp_path, text, "gpu-compile")["cells"][0]
    assert cell["status"] in ("ok", "unstable"), cell["reason"]
    assert cell["cold"]["compile_s"] > 0 and cell["latency_ms"]["p50"] < cell["cold"]["first_call_ms"]
    assert cell["accuracy"]["accuracy"] > 0.9


def test_causal_lm_generation_on_cuda_matches_the_cpu(tmp_path: Path):
    """A tiny Llama on torch-cuda and ort-cuda: generation cells with TTFT and per-token decode latency,
    the ORT cache bound on the device, and the same greedy tokens as the CPU cells."""
    from conftest import make_tiny_causal_lm, the_run_dir, write_yaml

    model = make_tiny_causal_lm(tmp_path / "model", "llama")
    recipe = write_yaml(tmp_path / "lm-gpu.yaml", {
        "name": "lm-gpu", "model": {"source": "hf", "path": str(model), "head": "causal-lm"},
        "task": {"type": "language-modeling", "data": {"source": "builtin", "name": "stdlib-docstrings"},
                 "block_size": 32, "eval_blocks": 8},
        "variants": {"baseline": {}},
        "bench": {"backends": ["torch-cpu", "torch-cuda", "ort-cuda"], "batch_sizes": [2], "seq_len": 16,
                  "new_tokens": 8, "profile": False, "timing": {"warmup": 1, "min_iters": 5, "min_seconds": 0.05}}})
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quick"]) == 0
    results = json.loads((the_run_dir(tmp_path / "out", "lm-gpu") / "results.json").read_text())
    cells = {c["backend"]: c for c in results["cells"]}
    for backend in ("torch-cuda", "ort-cuda"):
        c = cells[backend]
        assert c["status"] in ("ok", "unstable"), c.get("reason")
        assert c["generation"]["ttft_ms"]["p50"] > 0
        # The first greedy tokens; later ones may flip on near-ties of a random model's logits.
        first = [t[:2] for t in c["generation"]["tokens"]]
        assert first == [t[:2] for t in cells["torch-cpu"]["generation"]["tokens"]]
    assert cells["ort-cuda"]["threads"]["providers"][0] == "CUDAExecutionProvider"
