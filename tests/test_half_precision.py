"""fp16 / bf16 variants: every floating weight in half precision, inputs and outputs float32, so the
variant exports, reloads and scores like the fp32 model (on CPU here; tests/test_gpu.py on CUDA)."""
import json

import pytest

from workbench.cli import main

pytestmark = pytest.mark.slow


def test_half_precision_variants_halve_the_weights_and_keep_accuracy(write_recipe, tmp_out):
    recipe = write_recipe({
        "name": "half",
        "model": {"source": "builtin", "name": "digits-cnn"},
        "task": {"type": "classification", "data": {"source": "builtin", "name": "digits"}},
        "variants": {"baseline": {},
                     # A variant's own `backends` replaces bench.backends for it, adding one or leaving one out.
                     "fp16": {"from": "baseline", "steps": [{"quantize": {"method": "fp16"}}],
                              "backends": ["torch-cpu", "torchscript-cpu", "ort-cpu"]},
                     "bf16": {"from": "baseline", "steps": [{"quantize": {"method": "bf16"}}],
                              "backends": ["torch-cpu"]}},
        "export": {"formats": ["onnx", "torchscript"], "parity": {"max_abs_diff": 0.05}},
        "bench": {"backends": ["torch-cpu", "torchscript-cpu"], "batch_sizes": [4],
                  "timing": {"warmup": 1, "min_iters": 5, "min_seconds": 0.01}}}, "half.yaml")
    assert main(["run", str(recipe), "--out", str(tmp_out), "--quick"]) == 0
    run = next(d for d in (tmp_out / "half").iterdir() if d.name != "cache")
    results = json.loads((run / "results.json").read_text())
    v = {x["name"]: x for x in results["variants"]}
    for name in ("fp16", "bf16"):
        assert v[name]["weight_bytes"] == pytest.approx(v["baseline"]["weight_bytes"] / 2, rel=0.01)
        assert v[name]["params"] == v["baseline"]["params"]
        assert abs(v[name]["accuracy_delta"]["accuracy"]) <= 0.02
        assert v[name]["notes"][0]["dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[name]
    arts = {(a["variant"], a["format"]): a for a in results["artifacts"]}
    # The fp16 graph keeps float32 inputs and outputs, and matches the fp16 module it came from
    # within fp16's rounding (ORT and PyTorch accumulate half-precision sums in different orders).
    assert arts[("fp16", "onnx")]["status"] == "ok", arts[("fp16", "onnx")]
    import onnx

    graph = onnx.load(run / arts[("fp16", "onnx")]["path"]).graph
    assert {i.type.tensor_type.elem_type for i in list(graph.input) + list(graph.output)} == {onnx.TensorProto.FLOAT}
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    cells = {(c["variant"], c["backend"]): c for c in results["cells"]}
    assert set(cells) == {("baseline", "torch-cpu"), ("baseline", "torchscript-cpu"), ("fp16", "torch-cpu"),
                          ("fp16", "torchscript-cpu"), ("fp16", "ort-cpu"), ("bf16", "torch-cpu")}
    for name, backend in [("fp16", "torch-cpu"), ("fp16", "torchscript-cpu"), ("fp16", "ort-cpu"), ("bf16", "torch-cpu")]:
        c = cells[(name, backend)]
        assert c["status"] in ("ok", "unstable"), c["reason"]
        assert c["accuracy"]["accuracy"] > 0.9
