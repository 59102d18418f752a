"""Hardware-aware int8 presets, the kernel census of what ORT really runs, op-level profiles and the
report's "why isn't it faster?" diagnosis, on the digits CNN (a real, tiny model) and real runs."""
from __future__ import annotations

import json

import pytest

from reporting.diagnosis import diagnose, diagnoses
from conftest import the_run_dir, write_yaml
from export.onnx_quantize import OnnxQuantize
from export.quant_presets import PRESETS, detect, resolve
from workbench.cli import main


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma"}, "avx2"), ({"avx2", "avx512f"}, "avx512"), ({"avx2", "avx512f", "avx512_vnni"}, "avx512-vnni"),
    ({"avx2", "avx_vnni"}, "avx512-vnni"), ({"avx512_vnni", "amx_int8"}, "amx"), ({"asimd", "asimddp"}, "arm-dot"),
])
def test_auto_preset_reads_the_cpu_flags(flags, expected):
    name, flag = detect(flags)
    assert name == expected and flag
    preset, why = resolve("auto", flags)
    assert preset.name == expected and why.startswith("auto on this CPU")
    # Without VNNI the u8 x s8 product saturates: 7-bit weights, and no promise that int8 is faster.
    assert preset.reduce_range == (not preset.int8_pays) == (expected in ("avx2", "avx512"))


def test_a_preset_fills_only_what_the_recipe_left_unset_at_load_time():
    """Expanded when the recipe loads: the cache key and the lineage hold the concrete settings this
    machine gets (an AVX2 build and a VNNI build of `preset: auto` never share a cache entry)."""
    from export.onnx_quantize import OnnxQuantizeParams

    auto = OnnxQuantize.expand(OnnxQuantizeParams.model_validate({"preset": "auto"}))
    assert auto.reduce_range == resolve("auto")[0].reduce_range and auto.per_channel is True
    # The processor decides the int8 settings; the graph decides static or dynamic, when the step runs.
    assert auto.mode == "auto" and auto.op_types is None and auto.quant_format == "QDQ"
    dyn = OnnxQuantize.expand(OnnxQuantizeParams.model_validate({"preset": "auto", "mode": "dynamic"}))
    assert dyn.mode == "dynamic" and dyn.op_types == ["MatMul", "Gemm", "Attention"]
    mine = OnnxQuantize.expand(OnnxQuantizeParams.model_validate({"preset": "avx2", "per_channel": False}))
    assert mine.reduce_range is True and mine.per_channel is False  # the recipe's own value wins
    assert OnnxQuantize.expand(OnnxQuantizeParams.model_validate({})).reduce_range is False


RECIPE = {
    "name": "int8-why",
    "model": {"source": "builtin", "name": "digits-cnn"},
    "task": {"type": "classification", "data": {"source": "builtin", "name": "digits"}},
    "variants": {
        "baseline": {},
        "int8-auto": {"from": "baseline", "steps": [{"onnx-quantize": {"preset": "auto"}}]},
        "int8-dyn": {"from": "baseline", "steps": [{"onnx-quantize": {"preset": "auto", "mode": "dynamic"}}]},
        "int8-avx2": {"from": "baseline", "steps": [{"onnx-quantize": {"preset": "avx2", "per_channel": False}}]},
        "int8-keep": {"from": "baseline", "steps": [{"onnx-quantize": {"preset": "auto", "mode": "dynamic", "keep_fp32": {
            "top_k": 1, "target": 0.9999999}}}]},
        "static-qop": {"from": "baseline", "steps": [{"onnx-quantize": {"mode": "static",
                                                                        "quant_format": "QOperator"}}]},
    },
    "export": {"formats": ["onnx"]},
    "bench": {"backends": ["ort-cpu", "torch-cpu"], "batch_sizes": [4], "repeats": 2, "profile": True,
              "timing": {"warmup": 2, "min_iters": 5, "min_seconds": 0.05, "stability_threshold": 100.0}},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("why")
    recipe = write_yaml(folder / "why.yaml", RECIPE)
    assert main(["run", str(recipe), "--out", str(folder / "out"), "--quick"]) == 0
    run_dir = the_run_dir(folder / "out", "int8-why")
    return run_dir, json.loads((run_dir / "results.json").read_text())


def _notes(results, name):
    out = {}
    for n in next(v for v in results["variants"] if v["name"] == name)["notes"]:
        out.update(n)
    return out


@pytest.mark.slow
def test_presets_are_applied_and_recorded_with_their_reason(run):
    _, r = run
    auto = _notes(r, "int8-auto")["preset"]
    assert auto["name"] == detect()[0] and "auto on this CPU" in auto["why"]
    steps = {v["name"]: v["steps"][0]["params"] for v in r["variants"] if v["steps"]}
    assert steps["int8-auto"]["per_channel"] is True and steps["int8-auto"]["mode"] == "auto"
    assert steps["int8-dyn"]["op_types"] == ["MatMul", "Gemm", "Attention"]
    # The digits CNN's convolutions do most of its work: auto chose static QDQ with Conv, and says why.
    chosen = _notes(r, "int8-auto")["auto_mode"]
    assert chosen["mode"] == "static" and "Conv" in chosen["op_types"] and chosen["conv_share"] > 0.5
    # What the recipe set explicitly wins over the preset.
    assert steps["int8-avx2"]["reduce_range"] is True and steps["int8-avx2"]["per_channel"] is False
    assert _notes(r, "int8-avx2")["preset"]["int8_pays_here"] is False


@pytest.mark.slow
def test_the_kernel_census_says_which_int8_kernels_ort_fused(run):
    _, r = run
    dynamic = _notes(r, "int8-dyn")["kernels"]
    assert set(dynamic["int8_kernels"]) & {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    assert dynamic["float_weight_matmuls"] == 0  # every Gemm quantized
    static = _notes(r, "static-qop")["kernels"]
    assert static["int8_kernels"].get("QLinearConv") and static["quant_ops"].get("QuantizeLinear")
    assert _notes(r, "int8-auto")["kernels"]["int8_kernels"].get("QLinearConv")  # no ConvInteger


@pytest.mark.slow
def test_profiles_are_taken_outside_the_timed_processes(run):
    _, r = run
    profiled = [c for c in r["cells"] if c.get("profile")]
    assert {c["backend"] for c in profiled} == {"ort-cpu", "torch-cpu"}
    for c in profiled:
        assert "error" not in c["profile"], c["profile"]
        assert c["profile"]["op_total_ms"] > 0 and c["profile"]["calls"] == 20
        assert c["profile"]["tool"] == ("onnxruntime profiler" if c["backend"] == "ort-cpu" else "torch.profiler")
    ort_int8 = next(c for c in profiled if c["variant"] == "int8-dyn" and c["backend"] == "ort-cpu")
    assert set(ort_int8["profile"]["by_op_ms"]) & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}


@pytest.mark.slow
def test_a_variant_that_is_not_faster_gets_a_diagnosis_in_the_report(run):
    run_dir, r = run
    found = diagnoses(r, 4)
    # Whatever this machine measured, every diagnosed cell is one that did not beat its parent, and
    # its findings come from the profile.
    for d in found:
        assert d["parent"] == "baseline" and d["findings"]
        assert any("op time" in f for f in d["findings"]), d
    report = (run_dir / "report.md").read_text()
    assert "## Why isn't it faster?" in report and "Op-level profiles" in report
    for d in found:
        assert f"`{d['variant']}` on `{d['backend']}`" in report


@pytest.mark.slow
def test_the_diagnosis_names_a_cpu_without_vnni_and_quantize_overhead(run):
    _, r = run
    variants = {v["name"]: v for v in r["variants"]}
    cell = next(c for c in r["cells"] if c["variant"] == "static-qop" and c["backend"] == "ort-cpu")
    parent = next(c for c in r["cells"] if c["variant"] == "baseline" and c["backend"] == "ort-cpu")
    findings = diagnose(cell, parent, variants, ["avx", "avx2", "fma"])
    assert any("no VNNI" in f for f in findings)
    assert any("most of its op time" in f for f in findings)
    # On a VNNI machine that sentence is not said.
    assert not any("no VNNI" in f for f in diagnose(cell, parent, variants, ["avx2", "avx512_vnni"]))


def test_every_preset_says_why():
    assert all(p.why and p.per_channel for p in PRESETS.values())


def test_calibration_batches_of_different_lengths_are_padded_to_stack():
    """Entropy / Percentile calibration stacks every batch's activations: text batches of different
    lengths are padded (padding tokens, zero mask), a short last batch is left out."""
    import numpy as np

    from export.onnx_quantize import _same_shape

    def batch(n, s):
        return {"input_ids": np.ones((n, s), np.int64), "attention_mask": np.ones((n, s), np.int64)}

    out = _same_shape([batch(4, 7), batch(4, 12), batch(2, 5)])
    assert [b["input_ids"].shape for b in out] == [(4, 12), (4, 12)]
    assert out[0]["attention_mask"][:, 7:].sum() == 0 and out[0]["input_ids"][:, :7].min() == 1


@pytest.mark.slow
def test_per_node_sensitivity_ranks_keeps_and_suggests(run):
    run_dir, r = run
    sens = _notes(r, "int8-keep")["sensitivity"]
    fids = [row["fidelity"] for row in sens["ranking"]]
    assert len(fids) == 2 and fids == sorted(fids)  # the digits CNN's two Linear layers, most sensitive first
    assert sens["kept_fp32"] == [sens["ranking"][0]["node"]]  # top_k: 1
    assert set(sens["suggestion"]["fidelity_by_kept"]) >= {"0"} and "measured_on" in sens
    # What was kept in float really stayed float in the graph ORT runs.
    assert _notes(r, "int8-keep")["kernels"]["float_weight_matmuls"] == 1
    report = (run_dir / "report.md").read_text()
    assert "## Quantization sensitivity" in report and (run_dir / "plots" / "sensitivity.png").is_file()


@pytest.mark.slow
def test_the_sensitivity_command_ranks_nodes_and_suggests_what_to_keep(tmp_path, capsys):
    recipe = write_yaml(tmp_path / "sens.yaml", {
        "name": "sens-digits", "model": {"source": "builtin", "name": "digits-cnn"},
        "task": {"type": "classification", "data": {"source": "builtin", "name": "digits"}},
        "variants": {"baseline": {}, "int8": {"from": "baseline", "steps": [
            {"onnx-quantize": {"op_types": ["Conv", "Gemm"]}}]}},
        "bench": {"backends": ["ort-cpu"]}})
    assert main(["sensitivity", str(recipe), "--variant", "int8", "--target", "0.99999999",
                 "--out", str(tmp_path / "out")]) == 0
    (run_dir,) = (tmp_path / "out" / "sens-digits-sensitivity").iterdir()
    sens = json.loads((run_dir / "sensitivity.json").read_text())
    assert [r["op_type"] for r in sens["ranking"]].count("Conv") == 3 and len(sens["ranking"]) == 5
    assert [r["fidelity"] for r in sens["ranking"]] == sorted(r["fidelity"] for r in sens["ranking"])
    assert sens["suggestion"]["target"] == 0.99999999 and "0" in sens["suggestion"]["fidelity_by_kept"]
    assert (run_dir / "sensitivity.png").is_file() and "keep_fp32" in (run_dir / "sensitivity.md").read_text()
    # A variant whose last step is not int8 onnx-quantize is refused with what is accepted.
    assert main(["sensitivity", str(recipe), "--variant", "baseline", "--out", str(tmp_path / "out")]) == 2
    assert "onnx-quantize (int8 or weight-only)" in capsys.readouterr().err
