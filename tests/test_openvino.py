"""OpenVINO and NNCF on tiny real models: the `openvino` format (IR from the ONNX graph, parity in a
fresh process), the `openvino-cpu` backend (options read back, a bad option a failed cell, performance
counters per layer), `nncf-quantize` (plain and accuracy-controlled, reverting a layer) and
`nncf-compress-weights`, and a causal LM generating on OpenVINO's stateful model with the same tokens
as PyTorch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from conftest import make_reviews_csv, make_tiny_text_model, the_run_dir, write_yaml  # noqa: E402
from core.processes import default_threads  # noqa: E402
from workbench.cli import main  # noqa: E402

TIMING = {"warmup": 2, "min_iters": 5, "min_seconds": 0.05, "stability_threshold": 100.0}


def _classifier_recipe(**bench) -> dict:
    return {
        "name": "tiny-ov",
        "model": {"source": "hf", "path": "./bert", "head": "embedding"},
        "task": {"type": "embedding-fidelity", "data": {"source": "file", "path": "reviews.csv"}, "eval_size": 16,
                 "max_length": 16},
        "variants": {
            "baseline": {},
            # What OpenVINO's own defaults give: the IR compiled as read, the cell's threads only.
            "ov-defaults": {"reference": True, "backends": ["openvino-cpu"]},
            "nncf-int8": {"from": "baseline", "steps": [{"nncf-quantize": {"subset_size": 32}}]},
            # A drop of at most 1e-6 in mean cosine to the float model on 16 held-out training rows: int8
            # costs more than that, so NNCF must revert layers to float.
            "nncf-ac": {"from": "baseline", "steps": [{"nncf-quantize": {"subset_size": 24, "max_drop": 1.0e-6,
                                                                         "validation_rows": 16}}]},
        },
        "export": {"formats": ["onnx", "openvino"], "parity": {"max_abs_diff": 1.0e-4}},
        "bench": {"backends": ["ort-cpu", "openvino-cpu"], "batch_sizes": [2], "seq_len": 16, "repeats": 1, "profile": True,
                  "timing": TIMING, **bench},
    }


@pytest.fixture(scope="module")
def ov_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ov")
    make_tiny_text_model(tmp / "bert", "bert", head="embedding")
    make_reviews_csv(tmp / "reviews.csv")
    recipe = write_yaml(tmp / "ov.yaml", _classifier_recipe(options={"openvino-cpu": {"inference_precision": "f32"}}))
    assert main(["run", str(recipe), "--out", str(tmp / "out"), "--quick"]) == 0
    run_dir = the_run_dir(tmp / "out", "tiny-ov")
    return tmp, run_dir, json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
def test_the_ir_is_made_from_the_onnx_graph_with_parity_in_a_fresh_process(ov_run):
    _, run_dir, r = ov_run
    arts = {(a["variant"], a["format"]): a for a in r["artifacts"]}
    base = arts[("baseline", "openvino")]
    assert base["status"] == "ok", base
    assert base["made_from"] == "the variant's ONNX artifact" and base["parity"]["max_abs_diff"] < 1e-4
    assert (run_dir / base["path"]).exists() and (run_dir / base["path"]).with_suffix(".bin").exists()
    # An ONNX-only variant (NNCF's int8 graph) gets its IR too, its parity against the torch ancestor recorded.
    q = arts[("nncf-int8", "openvino")]
    assert q["status"] == "ok" and "not gated" in q["parity_note"] and q["parity"]["max_abs_diff"] > 0


@pytest.mark.slow
def test_openvino_cells_read_back_what_ran_and_int8_runs_int8_kernels(ov_run):
    _, _, r = ov_run
    cells = {(c["variant"], c["backend"]): c for c in r["cells"]}
    for v in ("baseline", "nncf-int8", "nncf-ac"):
        for b in ("ort-cpu", "openvino-cpu"):
            assert cells[(v, b)]["status"] in ("ok", "unstable"), cells[(v, b)]
    ov = cells[("baseline", "openvino-cpu")]
    assert ov["options"] == {"inference_precision": "f32", "static_shape": True, "properties": {}}
    ran = ov["threads"]["openvino"]
    assert ran["inference_precision_hint"] == "f32" and ran["execution_devices"] == ["CPU"]
    assert ran["num_streams"] == 1 and ov["threads"]["shape"]["input_ids"] == [2, 16]
    # The reference runs without bench.options and without the workbench's protocol (no static reshape).
    ref = cells[("ov-defaults", "openvino-cpu")]
    assert ref["status"] in ("ok", "unstable") and ref["engine_defaults"] and "options" not in ref
    # OpenVINO picks its own thread count (its cores among those this process may use).
    assert ref["threads"]["static_shape"] is False
    assert 0 < ref["threads"]["openvino"]["inference_num_threads"] <= default_threads()
    # The NNCF graph's matmuls run OpenVINO int8 kernels (the performance counters' exec types say so).
    census = json.dumps((cells[("nncf-int8", "openvino-cpu")].get("profile") or {}).get("kernels_by_op", {}))
    assert "I8" in census or "U8" in census, census
    # Accuracy is measured from the outputs each cell's backend produced.
    assert 0.9 < cells[("nncf-int8", "openvino-cpu")]["accuracy"]["cosine_mean"] < 1


@pytest.mark.slow
def test_nncf_steps_record_calibration_and_accuracy_control_reverts_a_layer(ov_run):
    _, _, r = ov_run
    variants = {v["name"]: v for v in r["variants"]}
    q = variants["nncf-int8"]
    assert q["status"] == "ok", q["error"]
    notes = q["notes"][-1]
    assert notes["step"] == "nncf-quantize" and notes["calibration"]["rows"] == 32
    assert notes["model_type"] == "transformer" and notes["kernels"]
    ac = variants["nncf-ac"]
    assert ac["status"] == "ok", ac["error"]
    control = ac["notes"][-1]["accuracy_control"]
    assert control["metric"] == "cosine_mean" and "16 training rows" in control["validated_on"]
    # The float graph's cosine to itself is 1 and int8's is below it by more than 1e-6: NNCF removed
    # quantizers (activations, or the layers listed under "reverted") until the drop fitted.
    assert control["groups_removed"] >= 1 and control["quantizers_removed"] and control["summary"].startswith(f"{len(control['reverted'])} out of")
    assert any("achieved required accuracy drop" in line for line in control["log"]), control


@pytest.mark.slow
def test_a_bad_openvino_option_is_a_failed_cell_and_the_run_goes_on(tmp_path):
    make_tiny_text_model(tmp_path / "bert", "bert", head="embedding")
    make_reviews_csv(tmp_path / "reviews.csv")
    recipe = _classifier_recipe(options={"openvino-cpu": {"properties": {"NOT_AN_OPENVINO_PROPERTY": 1}}})
    recipe["variants"] = {"baseline": {}}
    path = write_yaml(tmp_path / "bad.yaml", recipe)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quick"]) == 0
    r = json.loads((the_run_dir(tmp_path / "out", "tiny-ov") / "results.json").read_text())
    cells = {c["backend"]: c for c in r["cells"]}
    assert cells["openvino-cpu"]["status"] == "failed" and "NOT_AN_OPENVINO_PROPERTY" in cells["openvino-cpu"]["reason"]
    assert cells["ort-cpu"]["status"] in ("ok", "unstable")


def test_openvino_options_are_checked_at_recipe_load(tmp_path, capsys):
    make_tiny_text_model(tmp_path / "bert", "bert", head="embedding")
    make_reviews_csv(tmp_path / "reviews.csv")
    path = write_yaml(tmp_path / "r.yaml", _classifier_recipe(options={"openvino-cpu": {"inference_precision": "f8"}}))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bench.options.openvino-cpu.inference_precision" in err and "'f32'" in err and "Traceback" not in err
    path = write_yaml(tmp_path / "r2.yaml", _classifier_recipe(options={"ort-cpu": {"threads": 3}}))
    assert main(["validate", str(path)]) == 2
    assert "bench.options.ort-cpu" in capsys.readouterr().err


def test_a_causal_lm_generates_the_same_tokens_on_openvino_as_on_pytorch(tmp_path):
    from bench.openvino_backends import OpenvinoCPU
    from export.causal_lm_onnx import export_causal_lm
    from export.openvino_ir import convert_onnx
    from test_lm_onnx import _tiny

    model = _tiny("llama")
    export_causal_lm(model, tmp_path / "model.onnx")
    convert_onnx(tmp_path / "model.onnx", tmp_path / "model.xml")
    gen = OpenvinoCPU.load_generator(str(tmp_path / "model.xml"), 2, {"inference_precision": "f32"})
    ids = np.random.default_rng(0).integers(3, 100, (2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    tokens, times = gen.generate(ids, mask, 8)
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=8,
                             do_sample=False, pad_token_id=0)[:, 12:].numpy()
    assert np.array_equal(tokens, ref)
    assert len(times["decode_ms"]) == 7 and times["prefill_ms"] > 0
    assert gen.info["kv_cache"].startswith("OpenVINO state")
    # A second generation starts from an empty cache (the state is reset), so it gives the same tokens.
    assert np.array_equal(gen.generate(ids, mask, 8)[0], tokens)
    # Prefill logits match PyTorch's.
    with torch.no_grad():
        ref_logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert np.abs(gen.logits(ids, mask) - ref_logits).max() < 1e-3


def test_nncf_int4_weight_compression_makes_matmulnbits_that_openvino_and_ort_decode(tmp_path):
    import onnx

    from export.nncf_steps import NncfCompressWeights
    from core.model import VariantModel
    from core.steps import StepContext
    from export.causal_lm_onnx import export_causal_lm
    from export.openvino_ir import convert_onnx
    from runtime.decode import OrtLM
    from runtime.openvino_runner import OvLM
    from test_lm_onnx import _tiny

    model = _tiny("llama")
    export_causal_lm(model, tmp_path / "model.onnx")
    ids = np.random.default_rng(1).integers(3, 100, (4, 16)).astype(np.int64)

    class Task:  # the training text a data-aware method calibrates on
        train_batches = [{"input_ids": ids, "attention_mask": np.ones_like(ids)}]

    work = tmp_path / "work"
    work.mkdir()
    ctx = StepContext(work_dir=work, task=Task(), quick=True, seed=0, variant="int4", export=None)
    out = NncfCompressWeights().run(VariantModel(io=None, onnx_path=tmp_path / "model.onnx"),
                                    {"mode": "int4_sym", "group_size": 16, "awq": True, "scale_estimation": True}, ctx)
    notes = ctx.notes["weight_compression"]
    assert notes["matmul_nbits_nodes"] > 0 and notes["data_aware"] == ["awq", "scale_estimation"]
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(str(out.onnx_path)).graph.node)
    mask = np.ones((2, 8), np.int64)
    prompt = ids[:2, :8]
    ort_tokens = OrtLM(str(out.onnx_path)).generate(prompt, mask, 6)[0]
    convert_onnx(out.onnx_path, tmp_path / "int4.xml")
    ov_tokens = OvLM(str(tmp_path / "int4.xml"), options={"INFERENCE_PRECISION_HINT": "f32"}).generate(prompt, mask, 6)[0]
    # Two engines' int4 kernels round differently; most greedy tokens still agree on this tiny model.
    assert (ort_tokens == ov_tokens).mean() >= 0.5


def test_nncf_compresses_a_graph_whose_weights_are_external_data(tmp_path, monkeypatch):
    """A graph over protobuf's 2 GB (Qwen2-0.5B in fp32) keeps its weights in external data; loaded whole,
    NNCF cannot serialize it. Here the threshold is lowered so a tiny graph takes that path: NNCF reads
    the weights from their folder, the result decodes as the inline graph's int4 does, and the
    data-aware modes, which need one protobuf, are refused with the reason."""
    import onnx

    import export.nncf_steps as steps
    from core.model import VariantModel
    from core.steps import StepContext
    from export.causal_lm_onnx import export_causal_lm
    from runtime.decode import OrtLM
    from test_lm_onnx import _tiny

    model = _tiny("llama")
    export_causal_lm(model, tmp_path / "inline.onnx")
    (tmp_path / "ext").mkdir()
    onnx.save(onnx.load(str(tmp_path / "inline.onnx")), str(tmp_path / "ext" / "model.onnx"),
              save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    outs = {}
    for name, src in (("inline", tmp_path / "inline.onnx"), ("external", tmp_path / "ext" / "model.onnx")):
        monkeypatch.setattr(steps, "EXTERNAL_DATA_BYTES", 0 if name == "external" else 10 ** 12)
        work = tmp_path / f"work-{name}"
        work.mkdir()
        ctx = StepContext(work_dir=work, task=None, quick=True, seed=0, variant=name, export=None)
        outs[name] = steps.NncfCompressWeights().run(VariantModel(io=None, onnx_path=src),
                                                     {"mode": "int4_sym", "group_size": 16}, ctx).onnx_path
        assert ctx.notes["weight_compression"]["matmul_nbits_nodes"] > 0
    ids = np.random.default_rng(1).integers(3, 100, (2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    logits = {n: OrtLM(str(p)).logits(ids, mask) for n, p in outs.items()}
    assert np.abs(logits["inline"] - logits["external"]).max() < 1e-5  # the same int4 weights either way
    ctx = StepContext(work_dir=tmp_path, task=None, quick=True, seed=0, variant="awq", export=None)
    with pytest.raises(ValueError, match="data-free form"):
        steps.NncfCompressWeights().run(VariantModel(io=None, onnx_path=tmp_path / "ext" / "model.onnx"),
                                        {"mode": "int4_sym", "group_size": 16, "awq": True}, ctx)


@pytest.mark.slow
def test_a_decoder_lm_recipe_generates_on_openvino_beside_ort_with_nncf_int4(tmp_path):
    from conftest import make_tiny_causal_lm
    from test_lm_pipeline import lm_recipe

    spec = lm_recipe(make_tiny_causal_lm(tmp_path / "model", "llama"))
    spec["variants"] = {"baseline": {}, "nncf-int4": {"from": "baseline", "steps": [
        {"nncf-compress-weights": {"mode": "int4_sym", "group_size": 16, "awq": True, "subset_size": 8}}]}}
    spec["export"]["formats"] = ["onnx", "openvino"]
    spec["bench"].update(backends=["ort-cpu", "openvino-cpu"], profile=True,
                         options={"openvino-cpu": {"inference_precision": "f32"}})
    recipe = write_yaml(tmp_path / "lm.yaml", spec)
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quick"]) == 0
    r = json.loads((the_run_dir(tmp_path / "out", "tiny-lm") / "results.json").read_text())
    arts = {(a["variant"], a["format"]): a for a in r["artifacts"]}
    assert arts[("baseline", "openvino")]["status"] == "ok", arts[("baseline", "openvino")]
    assert arts[("baseline", "openvino")]["parity"]["top1_agreement"] >= 0.99
    cells = {(c["variant"], c["backend"]): c for c in r["cells"]}
    for key, c in cells.items():
        assert c["status"] in ("ok", "unstable"), (key, c["reason"])
        assert c["generation"]["ttft_ms"]["p50"] > 0 and c["accuracy"]["perplexity"] > 1
    # The fp32 graph decodes the same greedy tokens on both engines; OpenVINO keeps the cache as state.
    assert cells[("baseline", "openvino-cpu")]["generation"]["tokens"] == cells[("baseline", "ort-cpu")]["generation"]["tokens"]
    assert cells[("baseline", "openvino-cpu")]["threads"]["kv_cache"].startswith("OpenVINO state")
    notes = next(v for v in r["variants"] if v["name"] == "nncf-int4")["notes"][-1]
    assert notes["weight_compression"]["matmul_nbits_nodes"] > 0 and notes["weight_compression"]["data_aware"] == ["awq"]
    # The op-level profile of a generation cell comes from OpenVINO's performance counters.
    prof = cells[("nncf-int4", "openvino-cpu")].get("profile") or {}
    assert prof.get("tool", "").startswith("openvino") and prof["by_op_ms"], prof
