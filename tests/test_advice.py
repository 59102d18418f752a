"""Advice that acts: every finding of "why isn't it faster?" names its cause and the change to try
(a recipe line, and the steps of a variant that tries it), `workbench suggest` writes those variants
into a recipe, and the next run's report says what they gave. The CPU's flags are faked where a
finding depends on them (no VNNI, no AMX / AVX-512 BF16)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import the_run_dir, write_yaml
from reporting.diagnosis import diagnose, diagnoses, dispatch_floor
from workbench.cli import main

ROOT = Path(__file__).resolve().parent.parent
AVX2 = ["avx", "avx2", "fma"]
VNNI = ["avx", "avx2", "avx512f", "avx512_vnni"]
AMX = VNNI + ["amx_int8", "amx_bf16", "avx512_bf16"]


def _cell(variant, p50, batch=8, backend="ort-cpu", profile=None, **extra):
    return {"variant": variant, "backend": backend, "device": "cpu", "batch_size": batch, "format": "onnx",
            "latency_ms": {"p50": p50, "ci95": [p50 * 0.99, p50 * 1.01]}, "status": "ok",
            **({"profile": {"by_op_ms": profile}} if profile else {}), **extra}


def _variants(**steps):
    out = {"baseline": {"name": "baseline", "parent": None, "steps": []}}
    for name, s in steps.items():
        out[name] = {"name": name, "parent": "baseline", "steps": s}
    return out


def test_dynamic_int8_convolutions_are_diagnosed_with_static_qdq_to_try():
    variants = _variants(q=[{"name": "onnx-quantize", "params": {"mode": "dynamic", "per_channel": True}}])
    found = diagnose(_cell("q", 5.0, profile={"ConvInteger": 4.0, "Gemm": 0.5}), _cell("baseline", 1.0), variants,
                     VNNI)
    f = next(f for f in found if f.kind == "int8-reference-kernel")
    assert "ConvInteger" in f and f.steps == [{"onnx-quantize": {"preset": "auto", "mode": "static",
                                                                 "quant_format": "QDQ",
                                                                 "op_types": ["Conv", "MatMul", "Gemm"]}}]
    assert f.fix.startswith("from: baseline, steps: [{onnx-quantize: {preset: auto, mode: static")


def test_without_vnni_int8_is_said_to_save_memory_not_time_and_the_preset_that_fits_is_offered():
    variants = _variants(q=[{"name": "onnx-quantize", "params": {"mode": "dynamic", "reduce_range": False}}])
    cell = _cell("q", 1.0, profile={"MatMulInteger": 1.0})
    found = diagnose(cell, _cell("baseline", 1.0), variants, AVX2)
    f = next(f for f in found if f.kind == "int8-no-dot-product")
    assert "memory, not latency" in f and f.steps == [{"onnx-quantize": {"preset": "auto"}}]
    assert not any(f.kind == "int8-no-dot-product" for f in diagnose(cell, _cell("baseline", 1.0), variants, VNNI))


def test_bf16_without_amx_or_avx512_bf16_is_said_to_be_emulated_with_int8_to_try():
    variants = _variants(half=[{"name": "quantize", "params": {"method": "bf16"}}])
    cell = _cell("half", 2.0, backend="torch-cpu", profile={"aten::addmm": 2.0})
    f = next(f for f in diagnose(cell, _cell("baseline", 1.0), variants, VNNI) if f.kind == "bf16-emulated")
    assert "emulated" in f and f.steps == [{"quantize": {"method": "dynamic-int8"}}]
    assert not any(f.kind == "bf16-emulated" for f in diagnose(cell, _cell("baseline", 1.0), variants, AMX))


def test_unfused_attention_gets_the_fusion_added_before_the_variants_own_steps():
    variants = _variants(w4=[{"name": "onnx-quantize", "params": {"mode": "weight-only", "bits": 4}}])
    variants["w4"]["notes"] = [{"kernels": {"int8_kernels": {"MatMulNBits": 12}, "softmax": 6,
                                            "attention_fused": False}}]
    found = diagnose(_cell("w4", 2.0, profile={"MatMulNBits": 2.0}), _cell("baseline", 1.0), variants, VNNI)
    f = next(f for f in found if f.kind == "attention-float")
    assert f.steps == [{"onnx-optimize": {"fusion": "bert"}}, {"onnx-quantize": {"mode": "weight-only"}}]


def test_unfused_attention_is_not_told_to_add_a_fusion_it_has_nor_a_graph_step_before_a_module_step():
    """A packed model's per-token mask is not the pattern ORT's BERT fusion matches: the variant already has
    the fusion, so the advice does not repeat it. Where a graph step is added, it goes after the module steps."""
    from reporting.diagnosis import _insert

    variants = _variants(packed=[{"name": "pack-sequences", "params": {}},
                                 {"name": "onnx-optimize", "params": {"fusion": "bert"}}])
    variants["packed"]["notes"] = [{"kernels": {"softmax": 6, "attention_fused": False}}]
    found = diagnose(_cell("packed", 2.0, profile={"MatMul": 2.0}), _cell("baseline", 1.0), variants, VNNI)
    f = next(f for f in found if f.kind == "attention-float")
    assert not f.steps and "onnx-optimize" not in (f.fix or "")
    assert _insert([{"onnx-optimize": {"fusion": "bert"}}], ["pack-sequences", "onnx-quantize"]) == \
        ["pack-sequences", {"onnx-optimize": {"fusion": "bert"}}, "onnx-quantize"]


def test_a_model_too_small_to_pay_is_called_dispatch_bound_with_the_per_call_floor_measured():
    # latency = 0.05 ms per call + 0.001 ms per item: at batch 1 nearly all of it is the call.
    b1, b32 = _cell("p", 0.051, batch=1), _cell("p", 0.082, batch=32)
    floor, big = dispatch_floor(b1, [b32])
    assert abs(floor - 0.05) < 1e-9 and big == 32
    variants = _variants(p=[{"name": "prune", "params": {"method": "structured", "ratio": 0.5}}])
    f = next(f for f in diagnose(b1, _cell("baseline", 0.05, batch=1), variants, VNNI, None, [b32])
             if f.kind == "dispatch-bound")
    assert "0.050 ms" in f and f.bench == {"batch_sizes": [32, 64]} and "batch_sizes" in f.fix


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "reports" / "examples").iterdir()
                                           if (p / "results.json").is_file()))
def test_every_finding_in_the_committed_reference_reports_carries_a_fix(example):
    results = json.loads((ROOT / "reports" / "examples" / example / "results.json").read_text())
    from reporting.analysis import recommend

    for d in diagnoses(results, recommend(results).batch_size):
        for f in d["findings"]:
            assert f.kind == "fact" or f.fix, (example, d["variant"], str(f))


def test_conv_share_tells_a_cnn_from_a_graph_of_matmuls(tmp_path):
    import torch

    from export.quant_presets import conv_share
    from workbench.sources.models import DigitsCNN

    cnn, mlp = tmp_path / "cnn.onnx", tmp_path / "mlp.onnx"
    torch.onnx.export(DigitsCNN().eval(), (torch.zeros(1, 1, 8, 8),), str(cnn), dynamo=False)
    torch.onnx.export(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)),
                      (torch.zeros(1, 64),), str(mlp), dynamo=False)
    assert conv_share(cnn) > 0.8 and conv_share(mlp) == 0.0


RECIPE = {
    "name": "advice",
    "model": {"source": "builtin", "name": "digits-cnn"},
    "task": {"type": "classification", "data": {"source": "builtin", "name": "digits"}},
    "variants": {"baseline": {},
                 "dyn-int8": {"from": "baseline", "steps": [{"onnx-quantize": {"mode": "dynamic",
                                                                              "per_channel": True}}]}},
    "export": {"formats": ["onnx"]},
    "bench": {"backends": ["ort-cpu"], "batch_sizes": [8], "repeats": 2, "profile": True,
              "timing": {"warmup": 2, "min_iters": 20, "min_seconds": 0.05, "stability_threshold": 100.0}},
}


@pytest.mark.slow
@pytest.mark.serial  # judges a latency: run alone (make test)
def test_a_finding_becomes_a_suggested_variant_that_the_next_run_measures(tmp_path):
    """Dynamic int8 makes the digits CNN's convolutions ConvInteger; the report says so with static QDQ
    to try, `workbench suggest` writes that variant, and its run says what it gave."""
    recipe = write_yaml(tmp_path / "advice.yaml", RECIPE)
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quick"]) == 0
    first = the_run_dir(tmp_path / "out", "advice")
    assert "Try: `from: baseline, steps: [{onnx-quantize:" in (first / "report.md").read_text()
    assert main(["suggest", str(first)]) == 0
    suggested = yaml.safe_load((first / "suggested.yaml").read_text())
    new = {n: v for n, v in suggested["variants"].items() if v.get("suggested")}
    assert new and all(v["suggested"]["for"] == "dyn-int8" for v in new.values())
    name, spec = next((n, v) for n, v in new.items() if v["suggested"]["kind"] == "int8-reference-kernel")
    assert spec["steps"][0]["onnx-quantize"]["mode"] == "static"
    assert Path(suggested["base_dir"]) == tmp_path.resolve()

    assert main(["run", str(first / "suggested.yaml"), "--out", str(tmp_path / "out"), "--quick"]) == 0
    second = max((p for p in (tmp_path / "out" / "advice").iterdir() if p.name != "cache"), key=lambda p: p.name)
    results = json.loads((second / "results.json").read_text())
    tried = next(v for v in results["variants"] if v["name"] == name)
    assert tried["status"] == "ok" and tried["suggested"]["for"] == "dyn-int8"
    cell = next(c for c in results["cells"] if c["variant"] == name)
    old = next(c for c in results["cells"] if c["variant"] == "dyn-int8")
    assert cell["status"] in ("ok", "unstable") and cell["latency_ms"]["p50"] < old["latency_ms"]["p50"]
    report = (second / "report.md").read_text()
    assert "## Suggestions tested" in report and f"`{name}`" in report


def test_an_onnx_runtime_cell_scores_a_causal_lms_outputs_without_loading_torch():
    """The per-token summaries are NumPy: an ORT generation cell's process never imports torch (whose
    thread pool and memory would sit beside ORT's in its figures)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from runtime.infer import reduce_outputs\n"
            "import bench.generate, bench.worker\n"
            "ids = np.arange(12).reshape(2, 6) % 50\n"
            "out = reduce_outputs(np.random.default_rng(0).standard_normal((2, 6, 50)).astype('float32'),"
            " {'input_ids': ids, 'attention_mask': np.ones_like(ids)})\n"
            "assert out.shape == (2, 6, 3 + 2 * 32), out.shape\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_numpy_summary_matches_torch_log_softmax_and_topk():
    import numpy as np
    import torch

    from core.lm_summary import ARGMAX, IDS, NEXT_LOGP, TOP_K, summarize

    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 7, 300)).astype(np.float32)
    ids = rng.integers(0, 300, (2, 7))
    s = summarize(logits, ids, np.ones_like(ids))
    logp = torch.log_softmax(torch.from_numpy(logits), -1)
    top = logp.topk(TOP_K, -1)
    np.testing.assert_allclose(s[..., IDS + TOP_K:], top.values.numpy(), atol=1e-5)
    assert (s[..., IDS:IDS + TOP_K] == top.indices.numpy()).all()
    assert (s[..., ARGMAX] == logp.argmax(-1).numpy()).all()
    np.testing.assert_allclose(s[:, :-1, NEXT_LOGP], logp[:, :-1].gather(-1, torch.from_numpy(ids[:, 1:, None]))
                               .squeeze(-1).numpy(), atol=1e-5)
