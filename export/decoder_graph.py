"""The workbench's own ONNX graph of a Llama-layout decoder (Llama, Qwen2, Mistral and the families
that share their modules), built from the model's weights rather than traced.

Why: the traced graph (optimum / torch.onnx) spells attention, rotary embedding and the cache update
as hundreds of small ops (Shape / Gather / Unsqueeze / Concat chains, an explicit mask, a KV Concat per
layer); at batch 1 a decode step is a few milliseconds of matrix work and those ops cost a third of it.
This graph uses ONNX Runtime's fused kernels instead, the ones its LLM engines run:

- GroupQueryAttention (com.microsoft) per layer: the cache is appended inside (so a decode loop may keep
  it in one buffer: runtime.decode.KV_IN_PLACE) and the causal mask is implicit. Q, K and V come from
  one MatMul, packed into the op, which turns Q and K itself (do_rotary) with cos / sin caches made from
  the model's own rotary module (any rope scaling it applies is kept): no Split, no RotaryEmbedding.
- SkipSimplifiedLayerNormalization (com.microsoft): each residual add and the RMSNorm after it, one op.
- one MatMul for Q|K|V and one for gate|up, so a weight-only quantizer makes 4 MatMulNBits per layer
  instead of 7, and the output projection reads its own (transposed) weight, so it is quantized too.

Its inputs and outputs are export.causal_lm_onnx's (input_ids, attention_mask, position_ids,
past_key_values.{i}.key / value -> logits, present.{i}.key / value; the past may be 0 tokens long), so
runtime.decode.OrtLM, parity and every quantization step treat it like the traced graph. One input
more, `logits_to_keep` (a scalar, as transformers calls it): logits come for that many last positions,
so a generation's prefill skips the output projection of every earlier prompt position.

`unsupported(model)` says why a model is not of this layout (the export then falls back to tracing,
with that reason recorded)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from runtime.decode import KV_IN_PLACE, PAST, PRESENT  # the cache names every LM graph here uses

MS = "com.microsoft"
FUSED_OPS = ("GroupQueryAttention", "SkipSimplifiedLayerNormalization")  # what says a graph is this one


def fused_op_counts(model) -> dict[str, int]:
    """How many of each fused op an onnx.ModelProto holds (the export record and the step's notes)."""
    ops = [n.op_type for n in model.graph.node]
    return {op: ops.count(op) for op in FUSED_OPS}


def unsupported(hf_model) -> Optional[str]:
    """None when the model has the layout this builder knows, else why not (in words)."""
    cfg = getattr(hf_model, "config", None)
    base = getattr(hf_model, "model", None)
    if cfg is None or base is None or not hasattr(hf_model, "lm_head"):
        return "not a Llama-layout decoder (a Hugging Face *ForCausalLM with .model and .lm_head)"
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(base, name):
            return f"the model has no model.{name} (not a Llama-layout decoder)"
    layer = base.layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    for obj, names, where in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj"), "self_attn"),
                              (mlp, ("gate_proj", "up_proj", "down_proj"), "mlp"),
                              (layer, ("input_layernorm", "post_attention_layernorm"), "layer")):
        if obj is None or not all(hasattr(obj, n) for n in names):
            return f"its {where} lacks one of {', '.join(names)} (not a Llama-layout decoder)"
    for extra in ("q_norm", "k_norm"):
        if hasattr(attn, extra):
            return f"its attention has {extra} (a per-head norm before rotary), which this graph does not build"
    act = getattr(cfg, "hidden_act", None)
    if act not in ("silu", "swish"):
        return f"hidden_act {act!r}: this graph builds the SiLU-gated MLP only"
    scaling = getattr(cfg, "rope_scaling", None) or {}
    rope = scaling.get("rope_type") or scaling.get("type")
    if rope in ("dynamic", "longrope"):
        return f"rope_type {rope!r} changes its frequencies with the length; the graph's rotary caches are fixed"
    if not hasattr(base.rotary_emb, "inv_freq"):
        return "its rotary module has no inv_freq"
    if 2 * base.rotary_emb.inv_freq.numel() != _head_dim(cfg):
        return "partial rotary embedding (rotary dims != head size)"
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "layer_types", None) and any(
            t != "full_attention" for t in cfg.layer_types):
        return "sliding-window attention layers"
    return None


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def build_decoder_graph(hf_model, max_positions: Optional[int] = None):
    """The onnx.ModelProto of `hf_model` (fp32 weights as initializers). max_positions: the longest
    sequence the rotary caches cover (default: the config's max_position_embeddings)."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    why = unsupported(hf_model)
    if why:
        raise ValueError(why)
    cfg, base = hf_model.config, hf_model.model
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads, _head_dim(cfg)
    eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
    positions = int(max_positions or getattr(cfg, "max_position_embeddings", 4096))

    nodes, inits = [], []

    def arr(t) -> np.ndarray:
        return t.detach().to(torch.float32).cpu().numpy()

    def init(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list, outputs: list, name: str, domain: str = "", **attrs):
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def linear(x: str, layers: list, name: str) -> str:
        """x @ [W1.T | W2.T ...] (+ the biases, if any): one MatMul whose B is an initializer."""
        w = np.concatenate([arr(m.weight).T for m in layers], axis=1)
        y = node("MatMul", [x, init(f"{name}.weight", w)], [f"{name}/out"], name)
        if any(m.bias is not None for m in layers):
            b = np.concatenate([arr(m.bias) if m.bias is not None else np.zeros(m.out_features, np.float32)
                                for m in layers])
            y = node("Add", [y, init(f"{name}.bias", b)], [f"{name}/biased"], f"{name}/bias")
        return y

    # Inputs: ids, the mask over past + new tokens, the cache (batch, kv heads, past tokens, head size).
    graph_inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                    helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                  ["batch_size", "total_sequence_length"]),
                    helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                    helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [])]
    graph_outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                   ["batch_size", "logits_to_keep", cfg.vocab_size])]
    for i in range(cfg.num_hidden_layers):
        for kv in ("key", "value"):
            graph_inputs.append(helper.make_tensor_value_info(
                f"{PAST}{i}.{kv}", TensorProto.FLOAT, ["batch_size", kv_heads, "past_sequence_length", hd]))
            graph_outputs.append(helper.make_tensor_value_info(
                f"{PRESENT}{i}.{kv}", TensorProto.FLOAT, ["batch_size", kv_heads, "total_sequence_length", hd]))

    # What GroupQueryAttention needs: the total length, and per row the index of the last token. Its
    # kernel takes rows as right-padded (tokens past seqlens_k + 1 are padding); our rows are
    # left-padded, so every row counts as full (total - 1) and the pads are masked by the bias below.
    # The bias (batch, 1, new, total) puts a large negative on the pads' keys. The rotary positions are the
    # op's own (seqlens_k); position_ids stays an input, unused, so that every LM graph takes the same feeds.
    node("Shape", ["attention_mask"], ["mask/shape"], "mask/shape", start=1, end=2)
    node("Squeeze", ["mask/shape"], ["mask/total"], "mask/total")
    node("Cast", ["mask/total"], ["total_sequence_length"], "total_sequence_length", to=TensorProto.INT32)
    node("Shape", ["input_ids"], ["ids/shape"], "ids/shape")
    node("Split", ["ids/shape"], ["ids/b", "ids/s"], "ids/split", axis=0, num_outputs=2)
    node("Sub", ["mask/shape", init("one_i64", np.array([1], np.int64))], ["mask/last"], "mask/last")
    node("Expand", ["mask/last", "ids/b"], ["mask/last_per_row"], "mask/last_per_row")
    node("Cast", ["mask/last_per_row"], ["seqlens_k"], "seqlens_k", to=TensorProto.INT32)
    node("Cast", ["attention_mask"], ["mask/float"], "mask/float", to=TensorProto.FLOAT)
    node("Sub", [init("one_f32", np.array(1, np.float32)), "mask/float"], ["mask/pads"], "mask/pads")
    node("Mul", ["mask/pads", init("big_negative", np.array(np.finfo(np.float32).min / 2, np.float32))],
         ["mask/negative"], "mask/negative")
    node("Unsqueeze", ["mask/negative", init("axes_1_2", np.array([1, 2], np.int64))], ["mask/b11t"], "mask/b11t")
    node("Concat", ["ids/b", init("one_dim", np.array([1], np.int64)), "ids/s", "mask/shape"], ["bias/shape"],
         "bias/shape", axis=0)
    node("Expand", ["mask/b11t", "bias/shape"], ["attention_bias"], "attention_bias")

    # Rotary caches from the model's own module: its inv_freq and attention scaling (llama3 / yarn
    # scaling included), positions 0 .. max_positions - 1.
    rot = base.rotary_emb
    freqs = np.outer(np.arange(positions, dtype=np.float64), rot.inv_freq.detach().double().cpu().numpy())
    scale = float(getattr(rot, "attention_scaling", 1.0))
    init("cos_cache", (np.cos(freqs) * scale).astype(np.float32))
    init("sin_cache", (np.sin(freqs) * scale).astype(np.float32))

    x = node("Gather", [init("embed_tokens.weight", arr(base.embed_tokens.weight)), "input_ids"], ["embed"], "embed")
    residual = None  # the running sum of the residual stream, as SkipSimplifiedLayerNormalization returns it
    pending = None  # the last block's output, added to the residual by the next norm
    for i, layer in enumerate(base.layers):
        p = f"layers.{i}"
        gamma = init(f"{p}.input_layernorm.weight", arr(layer.input_layernorm.weight))
        if pending is None:
            h = node("SimplifiedLayerNormalization", [x, gamma], [f"{p}/norm_in"], f"{p}/norm_in", axis=-1,
                     epsilon=eps)
            residual = x
        else:
            h, _, _, residual = node("SkipSimplifiedLayerNormalization", [pending, residual, gamma],
                                     [f"{p}/norm_in", "", "", f"{p}/residual_in"], f"{p}/norm_in", domain=MS,
                                     epsilon=eps)
        a = layer.self_attn
        # Q|K|V packed into the attention op, which turns Q and K itself (do_rotary) with the graph's cos / sin
        # caches: no Split and no RotaryEmbedding per layer. Its positions count a left-padded row's pads;
        # that shifts every position of the row alike, which rotary attention does not see (relative angles).
        qkv = linear(h, [a.q_proj, a.k_proj, a.v_proj], f"{p}/qkv_proj")
        attn = node("GroupQueryAttention", [qkv, "", "", f"{PAST}{i}.key", f"{PAST}{i}.value", "seqlens_k",
                                            "total_sequence_length", "cos_cache", "sin_cache", "", "attention_bias"],
                    [f"{p}/attn", f"{PRESENT}{i}.key", f"{PRESENT}{i}.value"], f"{p}/attn", domain=MS,
                    num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
                    scale=float(getattr(a, "scaling", hd ** -0.5)))[0]
        out = linear(attn, [a.o_proj], f"{p}/o_proj")
        gamma = init(f"{p}.post_attention_layernorm.weight", arr(layer.post_attention_layernorm.weight))
        h, _, _, residual = node("SkipSimplifiedLayerNormalization", [out, residual, gamma],
                                 [f"{p}/norm_post", "", "", f"{p}/residual_post"], f"{p}/norm_post", domain=MS,
                                 epsilon=eps)
        m = layer.mlp
        gate_up = linear(h, [m.gate_proj, m.up_proj], f"{p}/gate_up_proj")
        gate, up = node("Split", [gate_up, init(f"{p}/split", np.array([m.gate_proj.out_features,
                                                                        m.up_proj.out_features], np.int64))],
                        [f"{p}/gate", f"{p}/up"], f"{p}/split", axis=-1)
        sig = node("Sigmoid", [gate], [f"{p}/sigmoid"], f"{p}/sigmoid")
        silu = node("Mul", [gate, sig], [f"{p}/silu"], f"{p}/silu")
        prod = node("Mul", [silu, up], [f"{p}/swiglu"], f"{p}/swiglu")
        pending = linear(prod, [m.down_proj], f"{p}/down_proj")
    final = node("SkipSimplifiedLayerNormalization", [pending, residual, init("norm.weight", arr(base.norm.weight))],
                 ["final_norm"], "final_norm", domain=MS, epsilon=eps)
    # Logits for the last `logits_to_keep` positions only: a generation's prefill needs the last one, and
    # the output projection over every prompt position is most of a long prefill's work at a large
    # vocabulary (transformers' generate keeps only the last too); evaluation asks for all of them.
    node("Neg", ["logits_to_keep"], ["keep/neg"], "keep/neg")
    node("Unsqueeze", ["keep/neg", init("axis_0", np.array([0], np.int64))], ["keep/start"], "keep/start")
    kept = node("Slice", [final, "keep/start", init("keep/end", np.array([np.iinfo(np.int64).max], np.int64)),
                          init("keep/axis", np.array([1], np.int64))], ["final_norm/kept"], "keep/slice")
    # The output projection reads its own transposed copy even when tied to the embeddings, so a
    # weight-only quantizer (MatMul with a constant B) quantizes it too.
    logits = node("MatMul", [kept, init("lm_head.weight", arr(hf_model.lm_head.weight).T)], ["lm_head/out"], "lm_head")
    if getattr(hf_model.lm_head, "bias", None) is not None:
        logits = node("Add", [logits, init("lm_head.bias", arr(hf_model.lm_head.bias))], ["lm_head/biased"],
                      "lm_head/bias")
    node("Identity", [logits], ["logits"], "logits")

    graph = helper.make_graph(nodes, "decoder", graph_inputs, graph_outputs, initializer=inits)
    model = helper.make_model(graph, producer_name="model-workbench decoder_graph",
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)])
    # GroupQueryAttention appends the cache inside: runtime.decode binds one buffer as past and present.
    helper.set_model_props(model, {KV_IN_PLACE: "1"})
    return model

