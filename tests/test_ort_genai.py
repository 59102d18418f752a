"""ONNX Runtime GenAI beside the workbench's own ORT decode loop: a tiny Llama-layout model through ORT
GenAI's own model builder (ort-genai-build) generates, with onnxruntime-genai's own generator, the same
greedy tokens as PyTorch, and its logits match."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.ort_genai_runner import missing

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))


def _tiny_lm():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.lm import CausalLM
    from workbench.sources.docstring_gpt import lm_corpus, train_tokenizer

    tok = train_tokenizer(lm_corpus()[0][:200])
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, vocab_size=len(tok),
                      tie_word_embeddings=False, initializer_range=0.3)
    return CausalLM(LlamaForCausalLM(cfg).eval(), tok)


def test_ort_genai_builds_and_generates_the_same_greedy_tokens_as_pytorch(tmp_path):
    import torch

    from export.ort_genai import CONFIG, build
    from runtime.ort_genai_runner import GenaiLM

    module = _tiny_lm()
    rec = build(module, tmp_path / "fp32", "fp32", {})
    assert "-p fp32" in rec["builder"] and (tmp_path / "fp32" / CONFIG).exists()
    prompt = np.random.default_rng(0).integers(3, 1000, (2, 12)).astype(np.int64)
    lm = GenaiLM(tmp_path / "fp32" / CONFIG, threads=1)
    tokens, t = lm.generate(prompt, np.ones_like(prompt), 6)
    ids = torch.from_numpy(prompt)
    with torch.inference_mode():
        for step in range(6):
            nxt = module(ids, torch.ones_like(ids))[:, -1].argmax(-1)
            assert tokens[:, step].tolist() == nxt.tolist(), step
            ids = torch.cat([ids, nxt[:, None]], 1)
        ref = module(torch.from_numpy(prompt), torch.ones_like(torch.from_numpy(prompt))).numpy()
    assert len(t["decode_ms"]) == 5 and t["prefill_ms"] > 0
    assert lm.info["ort_genai"]["session_options"]["intra_op_num_threads"] == 1
    assert np.abs(lm.logits(prompt, np.ones_like(prompt)) - ref).max() < 1e-3

    import onnx

    build(module, tmp_path / "int4", "int4", {"block_size": "32"})
    graph = onnx.load(str(next((tmp_path / "int4").glob("*.onnx"))), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulNBits" in ops and "GroupQueryAttention" in ops  # the builder's own int4 decode graph


def test_a_model_the_builder_cannot_take_is_a_reason_not_a_crash(tmp_path):
    import torch.nn as nn

    from export.ort_genai import build

    with pytest.raises(RuntimeError, match="Hugging Face causal LM"):
        build(nn.Linear(2, 2), tmp_path / "x", "int4", {})
