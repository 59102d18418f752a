"""The workbench's own fused decoder graph (export.decoder_graph): built from a Llama-layout model's
weights with ONNX Runtime's GroupQueryAttention and SkipSimplifiedLayerNormalization, it gives the
PyTorch model's logits and greedy tokens, left-padded rows included, through the same decode loop as
the traced graph; a model of another layout is exported the traced way, with the reason recorded."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest


def _tiny(family: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3)
    if family == "qwen2":  # Q / K / V biases, tied embeddings
        return Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True)).eval()
    # Llama 3's rope scaling (frequencies rescaled by the model's own rotary module), untied output
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    return LlamaForCausalLM(LlamaConfig(**shape, rope_scaling=rope, tie_word_embeddings=False)).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_fused_graph_gives_pytorchs_logits_and_greedy_tokens_left_padding_included(tmp_path, family):
    import onnx
    import torch

    from export.causal_lm_onnx import export_causal_lm
    from runtime.decode import OrtLM

    model = _tiny(family)
    rec = export_causal_lm(model, tmp_path / "model.onnx", exporter="decoder")
    assert rec["exporter"].startswith("workbench decoder graph") and rec["fallback_reason"] is None
    assert rec["fused_ops"] == {"GroupQueryAttention": 2, "SkipSimplifiedLayerNormalization": 4}
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node)
    assert ops["MatMul"] == 2 * 4 + 1  # Q|K|V, output, gate|up, down per layer, and the output projection

    lm = OrtLM(tmp_path / "model.onnx", config=model.config.to_dict())
    ids = np.random.default_rng(0).integers(0, 300, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row: its pads are neither attended to nor counted as positions
    with torch.inference_mode():
        ref = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        want = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=6,
                              min_new_tokens=6, do_sample=False, pad_token_id=0)[:, 12:].numpy()
    got = lm.logits(ids, mask)
    assert np.abs(got[0] - ref[0]).max() < 1e-4 and np.abs(got[1, 3:] - ref[1, 3:]).max() < 1e-4
    # A generation's prefill projects the last position only (logits_to_keep = 1): the same logits.
    last = lm.session.run(["logits"], {**lm.prefill_feeds(ids, mask), "logits_to_keep": np.array(1)})[0]
    assert last.shape == (2, 1, 300) and np.abs(last[:, 0] - got[:, -1]).max() < 1e-5
    tokens, timings = lm.generate(ids, mask, 6)
    assert tokens.tolist() == want.tolist()
    assert len(timings["decode_ms"]) == 5


def test_a_model_of_another_layout_is_traced_with_the_reason_recorded(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from export.causal_lm_onnx import export_causal_lm
    from export.decoder_graph import unsupported

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    assert "not a Llama-layout decoder" in unsupported(gpt2)
    rec = export_causal_lm(gpt2, tmp_path / "model.onnx", exporter="decoder")
    assert not rec["exporter"].startswith("workbench") and "does not fit this model" in rec["fallback_reason"]


def test_a_per_head_qk_norm_is_named_as_the_reason():
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from export.decoder_graph import unsupported

    torch.manual_seed(0)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    assert "q_norm" in unsupported(qwen3)


def test_the_decode_loop_writes_the_fused_graphs_cache_in_place_through_optimize_and_int4(tmp_path):
    """The fused graph's attention appends the cache inside the op, so the decode loop binds one buffer per layer as
    past and present, once (as ORT GenAI does) instead of ~100 values a step and a copy of the whole past per layer.
    The graph says so in its metadata, which ORT's optimiser and the int4 quantizer keep; the logits are the
    step-by-step loop's, bit for bit, a left-padded row included."""
    from core.model import ModelIO, VariantModel
    from core.steps import StepContext
    from export.causal_lm_onnx import export_causal_lm
    from export.onnx_optimize import OnnxOptimize
    from export.onnx_quantize import OnnxQuantize
    from runtime.decode import OrtLM

    model = _tiny("qwen2")
    export_causal_lm(model, tmp_path / "model.onnx", exporter="decoder")
    io = ModelIO(inputs={"input_ids": {"shape": ["batch", "seq"], "dtype": "int64", "low": 0, "high": 300}},
                 kind="causal-lm")
    path = tmp_path / "model.onnx"
    for step, params in ((OnnxOptimize(), {"level": "extended"}), (OnnxQuantize(), {"mode": "int4", "block_size": 32})):
        work = tmp_path / type(step).__name__
        work.mkdir()
        ctx = StepContext(work_dir=work, task=None, quick=True, seed=0, variant="v", export=None)
        path = step.run(VariantModel(io=io, onnx_path=path), params, ctx).onnx_path
    lm = OrtLM(path, config=model.config.to_dict())
    assert lm.in_place
    ids = np.random.default_rng(1).integers(0, 300, (2, 10))
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    fast, slow = [], []
    tokens, timings = lm.generate(ids, mask, 8, step_logits=fast)
    lm.in_place = False  # the step-by-step loop: presents bound anew each step
    tokens_slow, _ = lm.generate(ids, mask, 8, step_logits=slow)
    assert tokens.tolist() == tokens_slow.tolist() and len(timings["decode_ms"]) == 7
    assert all(np.array_equal(a, b) for a, b in zip(fast, slow))
