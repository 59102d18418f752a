"""Decoder LMs end to end: a local save_pretrained causal LM (Llama layout with grouped-query
attention, tiny and random) run through `workbench run --quick` with a language-modeling task, weight-only int4 and torch
int8 variants, and the generation benchmark on torch-cpu and ort-cpu."""
from __future__ import annotations

import json
import math

import pytest

from conftest import make_tiny_causal_lm, the_run_dir, write_yaml
from workbench.cli import main

pytestmark = pytest.mark.slow  # every test reads `lm_run`, an end-to-end run of a decoder LM


def lm_recipe(model_dir, **extra) -> dict:
    return {
        "name": "tiny-lm",
        "model": {"source": "hf", "path": str(model_dir), "head": "causal-lm"},
        "task": {"type": "language-modeling", "data": {"source": "builtin", "name": "stdlib-docstrings"},
                 "block_size": 32, "eval_blocks": 16},
        "variants": {
            "baseline": {},
            "torch-int8": {"from": "baseline", "steps": [{"quantize": {"method": "dynamic-int8"}}]},
            "ort-int4": {"from": "baseline", "steps": [{"onnx-quantize": {"mode": "weight-only", "bits": 4,
                                                                          "accuracy_level": 4}}]},
        },
        "export": {"formats": ["onnx"], "parity": {"max_abs_diff": 1.0e-3, "min_top1_agreement": 0.99}},
        "bench": {"backends": ["torch-cpu", "ort-cpu", "torch-compile-cpu"], "batch_sizes": [2], "seq_len": 16,
                  "new_tokens": 6, "profile": False, "repeats": 1,
                  "timing": {"warmup": 1, "min_iters": 5, "min_seconds": 0.05, "stability_threshold": 100.0}},
        "report": {"constraints": {"max_perplexity_increase": "5%"}},
        **extra,
    }


# Llama only: GPT-2's own paths (Conv1D layers, its head pruning, its cache export and generation) are
# covered in tests/test_lm_compress.py and tests/test_lm_onnx.py; a second end-to-end run would add a minute.
@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm-llama")
    spec = lm_recipe(make_tiny_causal_lm(folder / "model", "llama"))
    # Pruned key/value heads and FFN channels, distilled, exported with its cache; per-layer sensitivity.
    spec["variants"]["pruned"] = {"from": "baseline", "steps": [
        {"prune": {"method": "structured", "targets": ["ffn", "heads"], "ratio": 0.5, "importance": "activation"}},
        {"distill": {"teacher": "baseline", "loss": "kl", "alpha": 1.0, "temperature": 1.0, "max_batches": 4}}]}
    spec["variants"]["ort-int4-keep"] = {"from": "baseline", "steps": [{"onnx-quantize": {
        "mode": "weight-only", "bits": 4, "keep_fp32": {"top_k": 1, "batches": 1}}}]}
    # A search over weight-only bits: its candidates are generation cells, like the report's.
    spec["search"] = {"steps": [{"onnx-quantize": {"mode": "weight-only"}}], "space": {"steps[0].bits": [4, 8]},
                      "repeats": 1, "objective": {"backend": "ort-cpu"}, "constraints": {"max_accuracy_drop": 1000.0}}
    recipe = write_yaml(folder / "tiny-lm.yaml", spec)
    assert main(["run", str(recipe), "--out", str(folder / "out"), "--quick"]) == 0
    run_dir = the_run_dir(folder / "out", "tiny-lm")
    return run_dir, json.loads((run_dir / "results.json").read_text())


def cell(results, variant, backend):
    return next(c for c in results["cells"] if c["variant"] == variant and c["backend"] == backend)


def test_the_task_scores_perplexity_lower_is_better(lm_run):
    _, results = lm_run
    assert results["task"]["primary"] == "perplexity" and results["task"]["lower_is_better"]
    base = next(v for v in results["variants"] if v["name"] == "baseline")["accuracy"]
    # A random model over a 384-token vocabulary: perplexity near the vocabulary size, finite.
    assert 50 < base["perplexity"] < 2000
    assert base["top1_agreement"] == 1.0 and base["kl"] < 1e-6


def test_the_onnx_graph_with_a_kv_cache_matches_the_module(lm_run):
    _, results = lm_run
    art = next(a for a in results["artifacts"] if a["variant"] == "baseline" and a["format"] == "onnx")
    assert art["status"] == "ok", art.get("reason")
    assert art["parity"]["max_abs_diff"] < 1e-3 and art["parity"]["top1_agreement"] >= 0.99


@pytest.mark.parametrize("variant,backend", [("baseline", "torch-cpu"), ("baseline", "ort-cpu"),
                                             ("torch-int8", "torch-cpu"), ("ort-int4", "ort-cpu")])
def test_generation_cells_measure_ttft_and_per_token_decode(lm_run, variant, backend):
    _, results = lm_run
    c = cell(results, variant, backend)
    assert c["status"] in ("ok", "unstable"), c.get("reason")
    g = c["generation"]
    assert g["prompt_len"] == 16 and g["new_tokens"] == 6 and g["deterministic"]
    assert g["ttft_ms"]["p50"] > 0 and c["latency_ms"]["p50"] > 0
    # 5 decode steps per generation: the samples are decode steps, not generations.
    assert c["latency_ms"]["n"] % 5 == 0
    assert c["throughput"] == pytest.approx(2 * 1e3 / c["latency_ms"]["p50"], rel=1e-3)
    assert g["kv_cache_bytes"] > 0 and g["context"] == 22
    assert math.isfinite(c["accuracy"]["perplexity"])


def test_ort_and_torch_score_the_same_perplexity_for_the_same_weights(lm_run):
    _, results = lm_run
    torch_ppl = cell(results, "baseline", "torch-cpu")["accuracy"]["perplexity"]
    ort_ppl = cell(results, "baseline", "ort-cpu")["accuracy"]["perplexity"]
    assert ort_ppl == pytest.approx(torch_ppl, rel=1e-4)
    assert cell(results, "ort-int4", "ort-cpu")["accuracy"]["top1_agreement"] > 0.5


def test_backends_that_do_not_generate_are_skipped_with_the_reason(lm_run):
    _, results = lm_run
    c = cell(results, "baseline", "torch-compile-cpu")
    assert c["status"] == "skipped" and "generation benchmark" in c["reason"]


def test_the_report_has_the_generation_table_and_plots(lm_run):
    run_dir, results = lm_run
    md = (run_dir / "report.md").read_text()
    assert "## Generation" in md and "TTFT p50 ms" in md and "perplexity <= baseline x 1.05" in md
    for png in ("perplexity_vs_tokens_per_s.png", "ttft_and_decode_latency.png", "memory_vs_context.png"):
        assert (run_dir / "plots" / png).is_file(), png


def test_a_pruned_decoder_exports_with_its_smaller_cache_and_generates(lm_run):
    _, results = lm_run
    pruned = next(v for v in results["variants"] if v["name"] == "pruned")
    assert pruned["status"] == "ok" and pruned["params_ratio"] < 1
    art = next(a for a in results["artifacts"] if a["variant"] == "pruned" and a["format"] == "onnx")
    assert art["status"] == "ok", art.get("reason")
    c, base = cell(results, "pruned", "ort-cpu"), cell(results, "baseline", "ort-cpu")
    assert c["status"] in ("ok", "unstable"), c.get("reason")
    # One of the two key/value heads went: the cache at the same context is half the baseline's.
    assert c["generation"]["kv_cache_bytes"] == base["generation"]["kv_cache_bytes"] // 2


def test_weight_only_sensitivity_ranks_layers_by_kl_and_keeps_the_worst_in_float(lm_run):
    _, results = lm_run
    keep = next(v for v in results["variants"] if v["name"] == "ort-int4-keep")
    int4 = next(v for v in results["variants"] if v["name"] == "ort-int4")
    notes = {k: v for n in keep["notes"] for k, v in n.items()}
    sens = notes["sensitivity"]
    assert "KL" in sens["metric"] and len(sens["kept_fp32"]) == 1
    assert all(0 < r["fidelity"] <= 1 for r in sens["ranking"])
    assert sens["ranking"][0]["fidelity"] == min(r["fidelity"] for r in sens["ranking"])
    count = {k: v for n in int4["notes"] for k, v in n.items()}["matmul_nbits_nodes"]
    assert notes["matmul_nbits_nodes"] == count - 1


def test_a_search_over_a_decoder_ranks_candidates_by_per_token_decode_latency(lm_run):
    """The search plans its cells with the report's planner: a decoder's candidates are generation
    cells, so the objective is the per-token decode latency the report ranks by."""
    _, results = lm_run
    search = results["search"]
    assert search["objective"]["statistic"] == "p50 per decoded token"
    measured = [c for c in search["candidates"] if c["status"] == "measured"]
    assert len(measured) == 2 and all(c["per"] == "decoded token" for c in measured)
    assert search["best"]["candidate"] == min(measured, key=lambda c: c["p50_ms"])["name"]
    # The winner, measured again in the main bench, is a generation cell too: the same statistic.
    c = cell(results, "search-best", "ort-cpu")
    assert "generation" in c and c["generation"]["ttft_ms"]["p50"] > 0

