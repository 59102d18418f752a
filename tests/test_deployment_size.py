"""Decoder LMs at deployment size, offline: `weights: random` builds an architecture from a folder holding
only its config.json (seeded, no download; the built-in tokenizer when the folder has none) and ranks
variants by KL to that random fp32 model; and ORT's data-free (HQQ) and data-aware (GPTQ) 4-bit weight
quantizers beside its default round-to-nearest blocks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import the_run_dir, write_yaml
from workbench.cli import main

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "vocab_size": 9000, "tie_word_embeddings": True}


def _config_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    return folder


def test_random_weights_build_the_config_with_seeded_weights_and_the_builtin_tokenizer(tmp_path):
    from workbench.sources.models import random_hf_model

    folder = _config_folder(tmp_path)
    a = random_hf_model(str(folder), "causal-lm", "mean", seed=3)
    b = random_hf_model(str(folder), "causal-lm", "mean", seed=3)
    c = random_hf_model(str(folder), "causal-lm", "mean", seed=4)
    wa, wb, wc = (next(m.module.parameters()).detach().numpy() for m in (a, b, c))
    assert np.array_equal(wa, wb) and not np.array_equal(wa, wc)  # seeded: a rerun builds the same model
    assert a.random_weights and "random weights (seed 3)" in a.description
    assert a.io.inputs["input_ids"]["high"] == 9000
    ids = a.tokenizer("def f(x): return x")["input_ids"]
    assert ids and max(ids) < 9000  # the built-in BPE's ids fit the config's vocabulary


def test_a_config_with_a_vocabulary_smaller_than_the_builtin_tokenizer_asks_for_one(tmp_path):
    from workbench.sources.models import random_hf_model

    folder = tmp_path / "small-vocab"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY_LLAMA, "vocab_size": 500}))
    with pytest.raises(ValueError, match="put a tokenizer in the folder"):
        random_hf_model(str(folder), "causal-lm", "mean", seed=0)


@pytest.mark.slow
def test_a_random_weights_recipe_ranks_by_kl_and_says_perplexity_means_nothing(tmp_path):
    folder = _config_folder(tmp_path)
    recipe = write_yaml(tmp_path / "r.yaml", {
        "name": "tiny-random",
        "model": {"source": "hf", "path": folder.name, "head": "causal-lm", "weights": "random"},
        "task": {"type": "language-modeling", "data": {"source": "builtin", "name": "stdlib-docstrings"},
                 "block_size": 32, "eval_blocks": 8},
        "variants": {
            "baseline": {},
            "int4": {"from": "baseline", "steps": [{"onnx-quantize": {"mode": "int4", "block_size": 32,
                                                                      "accuracy_level": 4}}]},
            "int4-fused": {"from": "baseline", "steps": [{"onnx-optimize": {"fusion": "decoder"}},
                                                         {"onnx-quantize": {"mode": "int4", "block_size": 32,
                                                                            "accuracy_level": 4,
                                                                            "op_types": ["MatMul", "Gather"]}}]},
            "int4-hqq": {"from": "baseline", "steps": [{"onnx-quantize": {"mode": "int4", "block_size": 32,
                                                                          "algorithm": "hqq"}}]},
            "int4-gptq": {"from": "baseline", "steps": [{"onnx-quantize": {"mode": "int4", "block_size": 32,
                                                                           "algorithm": "gptq",
                                                                           "calibration_batches": 2}}]},
        },
        "export": {"formats": ["onnx"], "parity": {"max_abs_diff": 1.0e-3, "min_top1_agreement": 0.99}},
        "bench": {"backends": ["ort-cpu"], "batch_sizes": [1], "seq_len": 16, "new_tokens": 4, "repeats": 1,
                  "timing": {"warmup": 1, "min_iters": 5, "min_seconds": 0.05, "stability_threshold": 100.0}},
        "report": {"constraints": {"max_accuracy_drop": 1.0}},
    })
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quick"]) == 0
    run_dir = the_run_dir(tmp_path / "out", "tiny-random")
    r = json.loads((run_dir / "results.json").read_text())
    assert r["model"]["random_weights"] and r["task"]["primary"] == "kl" and r["task"]["lower_is_better"]
    variants = {v["name"]: v for v in r["variants"]}
    for name in ("int4", "int4-hqq", "int4-gptq"):
        assert variants[name]["status"] == "ok", variants[name]["error"]
        assert variants[name]["accuracy"]["kl"] > 0
    # The fused decoder graph: 4 MatMulNBits per layer and the (tied) output projection quantized too,
    # against 7 per layer in the traced graph; its cell decodes through the same loop.
    fused = variants["int4-fused"]["notes"]
    assert fused[0]["exporter"].startswith("workbench decoder graph")
    assert fused[1]["fusions"] == {"GroupQueryAttention": 2, "SkipSimplifiedLayerNormalization": 4}
    assert fused[-1]["matmul_nbits_nodes"] == 2 * 4 + 1 < variants["int4"]["notes"][-1]["matmul_nbits_nodes"]
    # ... and with op_types [MatMul, Gather] the embeddings too (GatherBlockQuantized): a smaller file.
    assert variants["int4-fused"]["size_bytes"] < 0.6 * variants["int4"]["size_bytes"]
    cell = next(c for c in r["cells"] if c["variant"] == "int4-fused")
    assert cell["status"] == "ok" and cell["generation"]["new_tokens"] == 4
    assert variants["int4-gptq"]["notes"][-1]["algorithm"] == "gptq"
    assert variants["int4-gptq"]["notes"][-1]["calibration"]["batches"] == 2
    assert r["recommendation"] is not None
    assert "perplexity and top-1 agreement mean little" in (run_dir / "report.md").read_text()


def test_the_algorithm_needs_4_bit_weight_only(tmp_path, capsys):
    folder = _config_folder(tmp_path)
    recipe = write_yaml(tmp_path / "bad.yaml", {
        "name": "bad", "model": {"source": "hf", "path": folder.name, "head": "causal-lm", "weights": "random"},
        "task": {"type": "language-modeling", "data": {"source": "builtin", "name": "stdlib-docstrings"}},
        "variants": {"baseline": {}, "q": {"from": "baseline", "steps": [{"onnx-quantize": {"algorithm": "gptq"}}]}},
    })
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "variants.q.steps[0].onnx-quantize.algorithm" in err and "'gptq'" in err and "Traceback" not in err
