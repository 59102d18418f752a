"""ONNX export of a Hugging Face causal LM with its key/value cache: one graph whose inputs are
input_ids, attention_mask, position_ids (when the family takes them) and past_key_values.{i}.key/value,
and whose outputs are logits then present.{i}.key/value. The past may be 0 tokens long, so the same
graph serves the prefill and every decode step (runtime.decode.OrtLM runs it).

optimum's exporter (task text-generation-with-past, no merged If-graph) knows each family's inputs
and patches the model for tracing; if it fails, torch.onnx traces a wrapper that takes the past as
explicit tensors, and the record says why."""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
import warnings
from pathlib import Path

from core.formats import EXTERNAL_DATA_BYTES, needs_external_data
from core.lm_summary import cache_shape

PAST, PRESENT = "past_key_values.", "present."


def export_causal_lm(hf_model, path: Path, *, opset: int = 18, exporter: str = "auto") -> dict:
    """Write `path` (and `path.data` for large models); return what happened, for the results.
    exporter: "auto" (optimum, then torch.onnx), "optimum" or "torch" (no fallback), or "decoder":
    export.decoder_graph's fused graph for a Llama-layout model, else "auto" with the reason recorded."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hf_model = hf_model.eval()
    large = needs_external_data(hf_model)
    record = {"exporter": None, "opset": opset, "fallback_reason": None}
    t0 = time.perf_counter()
    graph = None
    if exporter == "decoder":  # the workbench's own fused graph, built from the weights
        from export.decoder_graph import build_decoder_graph, fused_op_counts, unsupported

        why = unsupported(hf_model)
        if why is None:
            graph = build_decoder_graph(hf_model)
            record["exporter"] = "workbench decoder graph (GroupQueryAttention, SkipSimplifiedLayerNormalization)"
            record["opset"] = 18  # what the builder writes (Split's num_outputs needs it)
            # A tied output projection gets its own copy: the graph can pass 2 GB where the model did not.
            large = large or sum(len(i.raw_data) for i in graph.graph.initializer) > EXTERNAL_DATA_BYTES
        else:
            record["fallback_reason"] = f"the fused decoder graph does not fit this model: {why}"
    with _quiet():
        if graph is None and exporter in ("auto", "optimum", "decoder"):
            try:
                graph = _with_optimum(hf_model, path.parent, opset)
                record["exporter"] = "optimum (text-generation-with-past)"
            except Exception as e:  # any failure: recorded, then torch.onnx
                if exporter == "optimum":
                    raise
                record["fallback_reason"] = "; ".join(filter(None, [
                    record["fallback_reason"], f"optimum exporter failed: {type(e).__name__}: {str(e)[:300]}"]))
        if record["exporter"] is None:
            graph = _with_torch_onnx(hf_model, path.parent, opset)
            record["exporter"] = "torch.onnx (dynamo, explicit past)"
    fused = record["exporter"].startswith("workbench decoder")
    record["folded_transposes"] = _fold_transposed_weights(graph)
    record["gemm_to_matmul"] = _gemm_to_matmul(graph)
    onnx.save(graph, str(path), save_as_external_data=large, location=path.name + ".data" if large else None)
    record["seconds"] = round(time.perf_counter() - t0, 3)
    if fused:  # ORT's contrib ops (SimplifiedLayerNormalization in the default domain) are unknown to
        record["fused_ops"] = fused_op_counts(graph)
    else:      # onnx's checker; the parity check in a fresh ORT process is that graph's test
        onnx.checker.check_model(str(path))  # path form: works for external data too
    record["inputs"] = [i.name for i in graph.graph.input]
    record["outputs"] = [o.name for o in graph.graph.output]
    record["external_data"] = large
    return record


@contextlib.contextmanager
def _quiet():
    """The exporters print progress, tracer warnings and 'install accelerate' notices; the run log
    gets the pipeline's own lines."""
    for name in ("optimum", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _with_optimum(hf_model, workdir: Path, opset: int):
    import onnx
    from optimum.exporters.onnx import onnx_export_from_model

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        # Validation is ours (parity of prefill logits and greedy decoding), so optimum's is skipped.
        # No post-processing: with accelerate installed it would "deduplicate" tied embeddings into
        # MatMul(x, Transpose(embedding)), and ONNX Runtime's weight quantizers (MatMulNBits,
        # dynamic int8) only quantize a MatMul whose B is a constant: the lm_head, the largest
        # matrix of a small LM, would stay float. Without it, B is its own transposed initializer.
        onnx_export_from_model(hf_model, tmp, task="text-generation-with-past", opset=opset,
                               do_validation=False, no_post_process=True)
        return onnx.load(str(Path(tmp) / "model.onnx"))  # loads external data too, if any


def _with_explicit_past(hf_model):
    """(ids, mask, positions, *past) -> (logits, *present): the cache as plain tensors in and out."""
    import torch
    from transformers import DynamicCache

    class WithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = hf_model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache.from_legacy_cache(tuple(zip(past[0::2], past[1::2])))
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True, return_dict=True)
            return (out.logits, *[t for kv in out.past_key_values.to_legacy_cache() for t in kv])

    return WithPast().eval()


def _with_torch_onnx(hf_model, workdir: Path, opset: int):
    """torch.export traces transformers' vmap-built attention masks, which the TorchScript-based
    exporter cannot (optimum patches them out for it)."""
    import onnx
    import torch

    cfg = hf_model.config
    layers, kv_heads, head_dim = cache_shape(cfg)
    batch, seq, past_len = 2, 3, 4  # a non-empty past while tracing: the concat path that 0 also takes
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    pos = torch.arange(past_len, past_len + seq).expand(batch, seq)
    dtype = next(hf_model.parameters()).dtype
    past = tuple(torch.zeros(batch, kv_heads, past_len, head_dim, dtype=dtype) for _ in range(2 * layers))
    past_names = [f"{PAST}{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    b, s, p, t = (torch.export.Dim(n) for n in ("batch_size", "sequence_length", "past_sequence_length",
                                                "total_sequence_length"))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        f = str(Path(tmp) / "model.onnx")
        torch.onnx.export(_with_explicit_past(hf_model), (ids, mask, pos, *past), f, dynamo=True,
                          input_names=["input_ids", "attention_mask", "position_ids", *past_names],
                          output_names=["logits", *[n.replace(PAST, PRESENT) for n in past_names]],
                          dynamic_shapes=({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in past)),
                          opset_version=opset, external_data=needs_external_data(hf_model))
        return onnx.load(f)


def _fold_transposed_weights(model) -> int:
    """MatMul(x, Transpose(W)), W an initializer -> MatMul(x, W') with W' = W transposed, stored.
    torch.export keeps tied embeddings as one tensor, so the lm_head reads Transpose(embedding);
    ONNX Runtime's weight quantizers (MatMulNBits, dynamic int8) only quantize a MatMul whose B is
    an initializer, and the lm_head, the largest matrix of a small LM, would stay float. Costs a
    second copy of the embedding in the float graph (optimum's graphs already have one). Returns
    how many MatMuls were changed."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    folds = [(n, producer[n.input[1]]) for n in g.node if n.op_type == "MatMul" and n.input[1] in producer]
    folds = [(n, t) for n, t in folds if t.op_type == "Transpose" and t.input[0] in inits]
    for n, t in folds:
        name = t.output[0] + "_folded"
        if name not in inits:
            perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
            inits[name] = numpy_helper.from_array(numpy_helper.to_array(inits[t.input[0]]).transpose(perm).copy(), name)
            g.initializer.append(inits[name])
        n.input[1] = name
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for t in {id(t): t for _, t in folds}.values():
        if t.output[0] not in read:
            g.node.remove(t)  # nothing else reads the transposed tensor
    return len(folds)


def _gemm_to_matmul(model) -> int:
    """Gemm(A, B, C), B an initializer -> Add(MatMul(A, B'), C), writing the Gemm's output tensor.
    GPT-2's Conv1D layers export as Gemm on the flattened input, and ONNX Runtime's MatMulNBits
    quantizer only quantizes a MatMul whose B is an initializer: a GPT-2 graph would get only its
    lm_head quantized. Only Gemms that are a plain product are rewritten: alpha 1, transA 0, and
    beta 1 or no C. With transB 1, B' is B transposed, stored as a new initializer (once per B; B
    is dropped if nothing else reads it). A is 2-D (Gemm's rule), so MatMul gives the (M, N) that
    C broadcasts to, as in the Gemm. Subgraphs (If/Loop bodies) are left alone. Returns how many
    Gemms were rewritten."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    graph_inputs = {i.name for i in g.input}  # an initializer that is also an input can be fed
    names = {n.name for n in g.node}
    tensors = (set(inits) | graph_inputs | {o.name for o in g.output}
               | {t for n in g.node for t in (*n.input, *n.output)})

    def unique(base: str, taken: set) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    def attrs(node) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    transposed: dict[str, str] = {}
    nodes, changed = [], 0
    for n in g.node:
        a = attrs(n) if n.op_type == "Gemm" and n.domain in ("", "ai.onnx") else None
        has_c = a is not None and len(n.input) > 2 and n.input[2] != ""
        if (a is None or n.input[1] not in inits or n.input[1] in graph_inputs or a.get("transA", 0) != 0
                or a.get("alpha", 1.0) != 1.0 or (has_c and a.get("beta", 1.0) != 1.0)):
            nodes.append(n)
            continue
        b = n.input[1]
        if a.get("transB", 0):
            if b not in transposed:
                transposed[b] = unique(b + "_transposed", tensors)
                w = numpy_helper.to_array(inits[b]).T.copy()
                inits[transposed[b]] = numpy_helper.from_array(w, transposed[b])
                g.initializer.append(inits[transposed[b]])
            b = transposed[b]
        base = n.name or n.output[0]
        out = n.output[0]
        mm_out = unique(f"{base}_MatMul_output_0", tensors) if has_c else out
        nodes.append(helper.make_node("MatMul", [n.input[0], b], [mm_out], name=unique(f"{base}_MatMul", names)))
        if has_c:
            nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [out], name=unique(f"{base}_Add", names)))
        changed += 1
    if changed:
        old = len(g.node)
        g.node.extend(nodes)  # copies, while the nodes it copies from are still in the graph
        del g.node[:old]
        read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        for b in transposed:
            if b not in read:
                g.initializer.remove(inits[b])  # only its transposed copy is read now
    return changed
