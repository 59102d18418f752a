"""Causal LMs exported with their key/value cache (export.causal_lm_onnx) and decoded greedily by
ONNX Runtime (runtime.decode.OrtLM): prefill logits and every decode step match transformers, on
tiny random GPT-2 and Llama models; a Llama with a pruned MLP width and a 4-bit MatMulNBits graph
export and decode too. GPT-2's Conv1D layers (Gemm in the export) become MatMul + Add, so the 4-bit
quantizer reaches every layer, not only the lm_head."""
import numpy as np
import onnx
import pytest
import torch

from core.lm import CausalLM
from runtime.decode import OrtLM, torch_generate
from export.causal_lm_onnx import export_causal_lm

VOCAB, STEPS = 512, 16


def _tiny(family: str, **overrides):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, **overrides)
    else:  # grouped-query attention and tied embeddings, as in the small Llama/Qwen2 checkpoints
        base = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 128,
                "tie_word_embeddings": True}
        cfg = LlamaConfig(**{**base, **overrides})
    return AutoModelForCausalLM.from_config(cfg).eval()


def _batch(left_pad: int = 0):
    """Two rows of 7 tokens; the second left-padded by `left_pad` (generation pads on the left)."""
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 7))
    mask = np.ones_like(ids)
    mask[1, :left_pad] = 0
    return ids, mask


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def exported(request, tmp_path_factory):
    model = _tiny(request.param)
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    return model, path, export_causal_lm(model, path)


def test_the_graph_takes_and_gives_the_cache(exported):
    model, path, record = exported
    layers = model.config.num_hidden_layers
    assert record["exporter"].startswith("optimum") and record["fallback_reason"] is None
    assert {"input_ids", "attention_mask", "position_ids"} <= set(record["inputs"])
    assert {f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")} <= set(record["inputs"])
    assert record["outputs"] == ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert OrtLM(path).past_dims["past_key_values.0.key"] == (
        getattr(model.config, "num_key_value_heads", 4), 16)


def test_prefill_logits_match_torch(exported):
    model, path, _ = exported
    ids, mask = _batch()
    want = CausalLM(model)(torch.from_numpy(ids), torch.from_numpy(mask)).detach().numpy()
    got = OrtLM(path, threads=1).logits(ids, mask)
    assert got.shape == (2, 7, VOCAB)
    assert np.abs(got - want).max() < 1e-4


def test_greedy_decoding_matches_transformers_step_by_step(exported):
    model, path, _ = exported
    ids, mask = _batch(left_pad=3)
    ort_logits, torch_logits = [], []
    got, timings = OrtLM(path, threads=1).generate(ids, mask, STEPS, step_logits=ort_logits)
    want, torch_timings = torch_generate(model, ids, mask, STEPS, step_logits=torch_logits)
    assert got.shape == want.shape == (2, STEPS)
    np.testing.assert_array_equal(got, want)
    assert len(ort_logits) == len(torch_logits) == STEPS
    for step, (a, b) in enumerate(zip(ort_logits, torch_logits)):
        assert np.abs(a - b).max() < 1e-4, f"step {step}"
    for t in (timings, torch_timings):
        assert t["prefill_ms"] > 0 and len(t["decode_ms"]) == STEPS - 1 and min(t["decode_ms"]) > 0


def test_a_llama_with_a_pruned_mlp_exports_and_decodes(tmp_path):
    model = _tiny("llama", intermediate_size=40)  # the width a channel pruner leaves, config to match
    path = tmp_path / "pruned.onnx"
    export_causal_lm(model, path)
    ids, mask = _batch(left_pad=2)
    got, _ = OrtLM(path).generate(ids, mask, STEPS)
    np.testing.assert_array_equal(got, torch_generate(model, ids, mask, STEPS)[0])


# Linear layers per block: GPT-2 c_attn, attn c_proj, c_fc, mlp c_proj; Llama q, k, v, o, gate, up, down.
LINEAR_PER_LAYER = {"gpt2": 4, "llama": 7}


def _gemms_with_a_constant_weight(graph):
    inits = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "Gemm" and n.input[1] in inits]


def test_no_gemm_with_a_constant_weight_is_left(exported):
    """GPT-2's Conv1D layers export as Gemm; each becomes MatMul(x, W) + Add(bias), the MatMul named
    after its Gemm (the parity tests above run on this rewritten graph)."""
    model, path, record = exported
    graph = onnx.load(str(path)).graph
    assert _gemms_with_a_constant_weight(graph) == []
    if model.config.model_type == "gpt2":
        assert record["gemm_to_matmul"] == 4 * model.config.num_hidden_layers
        names = [n.name for n in graph.node]
        assert len(names) == len(set(names))
        assert sum(n.endswith("c_attn/Gemm_MatMul") for n in names) == model.config.num_hidden_layers


def test_gemm_to_matmul_keeps_the_result_and_leaves_what_it_cannot_rewrite():
    """transB 0 and 1 (one transposed copy for two readers, the original dropped), with and without C;
    a Gemm with transA 1 or alpha != 1 stays. ONNX Runtime gives the same outputs before and after."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.causal_lm_onnx import _gemm_to_matmul

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)  # (N, K): read with transB=1
    v = rng.standard_normal((6, 3)).astype(np.float32)  # (K=6, N=3): read with transB=0
    c = rng.standard_normal(6).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y1"], name="g1", transB=1),
             helper.make_node("Gemm", ["x", "w"], ["y2"], name="g2", transB=1, beta=0.5),  # no C: beta unused
             helper.make_node("Gemm", ["y1", "v"], ["y3"], name="g3"),
             helper.make_node("Gemm", ["xt", "w", "c"], ["y4"], name="g4", transA=1, transB=1),
             helper.make_node("Gemm", ["x", "w", "c"], ["y5"], name="g5", transB=1, alpha=2.0)]
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["m", 3 if i == 3 else 6]) for i in range(1, 6)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 4]),
                                           helper.make_tensor_value_info("xt", TensorProto.FLOAT, [4, "m"])],
                              outs, [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (v, "v"), (c, "c"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((5, 4)).astype(np.float32)

    def run(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x, "xt": x.T.copy()})

    want = run(model)
    assert _gemm_to_matmul(model) == 3
    onnx.checker.check_model(model)
    assert [(n.op_type, n.name) for n in model.graph.node] == [
        ("MatMul", "g1_MatMul"), ("Add", "g1_Add"), ("MatMul", "g2_MatMul"), ("MatMul", "g3_MatMul"),
        ("Gemm", "g4"), ("Gemm", "g5")]
    assert [n.output[0] for n in model.graph.node if n.name in ("g1_Add", "g2_MatMul", "g3_MatMul")] == [
        "y1", "y2", "y3"]  # each Gemm's output tensor keeps its name
    assert sorted(i.name for i in model.graph.initializer) == ["c", "v", "w", "w_transposed"]  # g4, g5 read w
    for a, b in zip(run(model), want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _lm_head(graph):
    """The node that makes the logits (the last MatMul-like node before them)."""
    producer = {o: n for n in graph.node for o in n.output}
    node = producer["logits"]
    while node.op_type not in ("MatMul", "MatMulNBits", "Gemm"):
        node = producer[node.input[0]]
    return node


def test_a_4bit_matmulnbits_graph_loads_and_decodes(exported, tmp_path):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model, path, _ = exported
    quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), bits=4, block_size=32, is_symmetric=True,
                                     accuracy_level=4)
    quantizer.process()
    q_path = tmp_path / "q4.onnx"
    quantizer.model.save_model_to_file(str(q_path))
    onnx.checker.check_model(str(q_path))
    # The lm_head (tied to the embedding) is quantized too: its B was a constant in the export.
    q_graph = onnx.load(str(q_path)).graph
    assert _lm_head(q_graph).op_type == "MatMulNBits"
    # So is every linear layer of every block (GPT-2's too: they were Gemms before the rewrite).
    cfg = model.config
    assert sum(n.op_type == "MatMulNBits" for n in q_graph.node) >= (
        LINEAR_PER_LAYER[cfg.model_type] * cfg.num_hidden_layers + 1)
    ids, mask = _batch(left_pad=3)
    got, timings = OrtLM(q_path).generate(ids, mask, STEPS)
    # Its greedy tokens against the fp32 module's: all 32 agree on these models (measured; the 4-bit
    # logits move by < 0.1), a broken quantization or decode agrees on about 1 in VOCAB.
    want = torch_generate(model, ids, mask, STEPS)[0]
    assert got.shape == want.shape == (2, STEPS)
    assert (got == want).mean() >= 0.5, (got, want)
    assert len(timings["decode_ms"]) == STEPS - 1


@pytest.mark.slow
def test_the_torch_onnx_fallback_decodes_and_keeps_the_lm_head_constant(tmp_path):
    """torch.export keeps a tied lm_head as Transpose(embedding); the export stores it transposed."""
    model = _tiny("llama")
    path = tmp_path / "fallback.onnx"
    record = export_causal_lm(model, path, exporter="torch")
    assert record["exporter"].startswith("torch.onnx") and record["folded_transposes"] >= 1
    graph = onnx.load(str(path)).graph
    assert _lm_head(graph).input[1] in {i.name for i in graph.initializer}
    ids, mask = _batch(left_pad=3)
    lm = OrtLM(path)
    np.testing.assert_array_equal(lm.generate(ids, mask, STEPS)[0], torch_generate(model, ids, mask, STEPS)[0])
