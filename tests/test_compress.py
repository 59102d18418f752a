"""Compression steps on the built-in digits CNN: pruning shrinks or sparsifies it, distillation
recovers what pruning cost, and recipe checks catch a teacher that cannot be computed first."""
import json

import pytest

from workbench.cli import main

pytestmark = pytest.mark.slow

DIGITS = {"model": {"source": "builtin", "name": "digits-cnn"},
          "task": {"type": "classification", "data": {"source": "builtin", "name": "digits"}},
          "export": {"formats": []},
          "bench": {"backends": ["torch-cpu"], "batch_sizes": [1],
                    "timing": {"warmup": 1, "min_iters": 5, "min_seconds": 0.01}}}


def _run(write_recipe, tmp_out, name, variants, *flags):
    recipe = write_recipe({"name": name, **DIGITS, "variants": variants}, f"{name}.yaml")
    assert main(["run", str(recipe), "--out", str(tmp_out), *flags]) == 0
    run = next(d for d in (tmp_out / name).iterdir() if d.name != "cache")
    return {v["name"]: v for v in json.loads((run / "results.json").read_text())["variants"]}


def test_distillation_recovers_accuracy_lost_to_channel_pruning(write_recipe, tmp_out):
    v = _run(write_recipe, tmp_out, "kd", {
        "baseline": {},
        "pruned": {"from": "baseline", "steps": [{"prune": {"method": "structured", "ratio": 0.7}}]},
        "pruned-kd": {"from": "pruned", "steps": [{"distill": {"teacher": "baseline", "epochs": 8}}]}})
    base, pruned, kd = (v[n]["accuracy"]["accuracy"] for n in ("baseline", "pruned", "pruned-kd"))
    assert v["pruned"]["params"] < 0.5 * v["baseline"]["params"]
    assert pruned < base - 0.01  # pruning 70% of the channels costs accuracy...
    assert kd > pruned + 0.01 and kd >= base - 0.02  # ...and distillation wins it back
    notes = v["pruned-kd"]["notes"][0]
    assert notes["teacher"] == "baseline" and notes["epochs_run"] >= 1 and notes["val_best"] >= notes["val_before"]


def test_unstructured_and_2_4_pruning_report_their_sparsity(write_recipe, tmp_out):
    v = _run(write_recipe, tmp_out, "sparse", {
        "baseline": {},
        "unstructured": {"from": "baseline", "steps": [{"prune": {"method": "unstructured", "ratio": 0.6}}]},
        "semi": {"from": "baseline", "steps": [{"prune": {"method": "2:4"}}]}}, "--quick")
    assert v["unstructured"]["notes"][0]["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert v["semi"]["notes"][0]["achieved_sparsity"] > 0.4
    assert v["unstructured"]["params"] == v["baseline"]["params"]  # zeros, not a smaller model


@pytest.mark.parametrize("teacher, expected", [("nobody", "names no variant"), ("child", "descendants")])
def test_a_teacher_that_cannot_come_first_is_a_recipe_error(write_recipe, capsys, teacher, expected):
    recipe = write_recipe({"name": "bad-kd", **DIGITS, "variants": {
        "baseline": {},
        "student": {"from": "baseline", "steps": [{"distill": {"teacher": teacher}}]},
        "child": {"from": "student"}}})
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "variants.student.steps[0].distill.teacher" in err and expected in err


def test_bitsandbytes_variants_run_on_cpu_with_their_real_latency_and_memory(write_recipe, tmp_out):
    name = "bnb"
    recipe = write_recipe({"name": name, **DIGITS, "export": {"formats": ["onnx", "torchscript"]},
                           "bench": {**DIGITS["bench"], "backends": ["torch-cpu", "ort-cpu"]},
                           "variants": {"baseline": {},
                                        "int8": {"from": "baseline", "steps": [{"quantize": {"method": "bnb-int8"}}]},
                                        "nf4": {"from": "baseline", "steps": [{"quantize": {"method": "bnb-nf4"}}]}}},
                          f"{name}.yaml")
    assert main(["run", str(recipe), "--out", str(tmp_out), "--quick"]) == 0
    run = next(d for d in (tmp_out / name).iterdir() if d.name != "cache")
    results = json.loads((run / "results.json").read_text())
    v = {x["name"]: x for x in results["variants"]}
    assert v["nf4"]["weight_bytes"] < 0.5 * v["baseline"]["weight_bytes"]
    assert v["nf4"]["params"] == v["baseline"]["params"]  # counted from the 4-bit layers' logical shapes
    cells = {(c["variant"], c["backend"]): c for c in results["cells"]}
    for q in ("int8", "nf4"):
        c = cells[(q, "torch-cpu")]
        assert c["status"] in ("ok", "unstable") and c["memory"]["peak_rss_delta"] > 0
        assert c["accuracy"]["accuracy"] > 0.9
        assert cells[(q, "ort-cpu")]["status"] == "skipped" and "bitsandbytes" in cells[(q, "ort-cpu")]["reason"]
    # No export form is a skipped artifact with its reason, in every format, never a failure.
    for a in results["artifacts"]:
        if a["variant"] in ("int8", "nf4") and a["format"] != "torch":
            assert a["status"] == "skipped" and "bitsandbytes" in a["reason"], a


@pytest.mark.parametrize("method", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_weights_keep_their_class_and_state_through_the_variant_file(tmp_path, method):
    """A reloaded bnb layer must still move its quantization state with its weight (.to(device)):
    without that, CUDA kernels read absmax / SCB from host memory (an illegal memory access)."""
    import bitsandbytes as bnb
    import torch

    from compress.quantize import QuantizeParams, _bitsandbytes
    from workbench.sources.models import DigitsCNN
    from core.steps import StepContext
    from core.modelfile import load_module, save_module

    ctx = StepContext(work_dir=tmp_path, task=None, quick=True, seed=0, variant="q", export=None)
    module = _bitsandbytes(DigitsCNN().eval(), QuantizeParams(method=method), ctx)
    save_module(module, tmp_path / "module.pt")
    loaded = load_module(tmp_path / "module.pt")
    layer = loaded.classifier[1]
    if method == "bnb-nf4":
        assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.bnb_quantized
        moved = layer.weight.to("cpu")
        assert isinstance(moved, bnb.nn.Params4bit) and moved.quant_state is layer.weight.quant_state
    else:
        assert isinstance(layer.weight, bnb.nn.Int8Params) and layer.weight.SCB is not None
        assert isinstance(layer.weight.to("cpu"), bnb.nn.Int8Params) and layer.weight.to("cpu").SCB is not None
    x = torch.randn(4, 1, 8, 8)
    with torch.inference_mode():
        # The reloaded copy computes what the layer it came from computes (to within 1e-3 of logits
        # near 10: the in-memory and reloaded layers do not take bit-identical CPU paths).
        torch.testing.assert_close(loaded(x), module(x), atol=5e-3, rtol=1e-2)


def test_a_variants_own_formats_narrow_the_export_and_its_cells_say_why(write_recipe, tmp_out):
    """`variants.NAME.formats`: only those are exported (and parity-checked) for it; the run's other formats
    are skipped artifacts naming the field, and a backend of a format left out is a skipped cell."""
    name = "formats"
    recipe = write_recipe({"name": name, **DIGITS, "export": {"formats": ["onnx", "torchscript"]},
                           "bench": {**DIGITS["bench"], "backends": ["ort-cpu", "torchscript-cpu"]},
                           "variants": {"baseline": {},
                                        "int8": {"from": "baseline", "formats": ["onnx"],
                                                 "steps": [{"onnx-quantize": {"mode": "dynamic"}}]},
                                        "slim": {"from": "baseline", "formats": ["torchscript"]}}},
                          f"{name}.yaml")
    assert main(["run", str(recipe), "--out", str(tmp_out), "--quick"]) == 0
    run = next(d for d in (tmp_out / name).iterdir() if d.name != "cache")
    results = json.loads((run / "results.json").read_text())
    arts = {(a["variant"], a["format"]): a for a in results["artifacts"]}
    assert arts[("baseline", "onnx")]["status"] == arts[("baseline", "torchscript")]["status"] == "ok"
    assert arts[("slim", "torchscript")]["status"] == "ok"
    assert arts[("slim", "onnx")]["status"] == "skipped" and "variants.slim.formats" in arts[("slim", "onnx")]["reason"]
    # An ONNX-only variant's graph is its artifact whatever its list; what it leaves out is skipped.
    assert arts[("int8", "onnx")]["status"] == "ok"
    assert arts[("int8", "torchscript")]["status"] == "skipped"
    cells = {(c["variant"], c["backend"]): c for c in results["cells"]}
    assert cells[("slim", "torchscript-cpu")]["status"] in ("ok", "unstable")
    assert cells[("slim", "ort-cpu")]["status"] == "skipped" and "variants.slim.formats" in cells[("slim", "ort-cpu")]["reason"]
