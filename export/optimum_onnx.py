"""ONNX export of Hugging Face models through optimum's exporter, which knows each architecture's
inputs, dynamic axes and quirks. optimum exports the bare transformer (last_hidden_state or
logits, with token_type_ids as an input); the workbench's model also pools and takes only
input_ids and attention_mask, so the graph is completed here: token_type_ids become zeros made
inside the graph, and the same pooling as core.encoders.EmbeddingModel is appended."""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

from core.model import ModelIO


def hf_inside(module):
    """(Hugging Face model, optimum task, pooling) for the workbench's wrappers; None otherwise."""
    from core.encoders import EmbeddingModel, SequenceClassifier

    if isinstance(module, EmbeddingModel) and hasattr(module.encoder, "config"):
        return module.encoder, "feature-extraction", module.pooling
    if isinstance(module, SequenceClassifier) and hasattr(module.model, "config"):
        return module.model, "text-classification", None
    return None


def export_with_optimum(module, io_spec: ModelIO, path: Path, *, opset: int, external_data: bool) -> str:
    """Write `path`; return a description of the exporter for the results."""
    import onnx
    from optimum.exporters.onnx import onnx_export_from_model

    found = hf_inside(module)
    if found is None:
        raise ValueError(f"optimum exports Hugging Face models; this is a {type(module).__name__}")
    hf, task, pooling = found
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
        logging.getLogger("optimum").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Validation is ours (fresh-process parity on real inputs), so optimum's own is skipped.
            onnx_export_from_model(hf, tmp, task=task, opset=opset, do_validation=False)
        graph = onnx.load(str(Path(tmp) / "model.onnx"))
    _complete(graph, io_spec, pooling)
    onnx.save(graph, str(path), save_as_external_data=external_data,
              location=Path(path).name + ".data" if external_data else None)
    return f"optimum ({task})"


def _complete(model, io_spec: ModelIO, pooling) -> None:
    """Make optimum's graph take the workbench's inputs and give its one output."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    nodes = []
    for inp in list(g.input):
        if inp.name not in io_spec.inputs:
            if inp.name != "token_type_ids":
                raise ValueError(f"optimum's graph needs input '{inp.name}', which the model does not declare")
            g.input.remove(inp)  # one segment: zeros of the input_ids' shape, as the tokenizer would give
            nodes += [helper.make_node("Shape", ["input_ids"], ["wb_ids_shape"]),
                      helper.make_node("ConstantOfShape", ["wb_ids_shape"], ["token_type_ids"],
                                       value=helper.make_tensor("zero", TensorProto.INT64, [1], [0]))]
    produced = g.output[0].name
    del g.output[:]
    if pooling is None:  # logits already
        tail = [helper.make_node("Identity", [produced], [io_spec.output])]
    elif pooling == "cls":
        g.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.int64), "wb_first"))
        tail = [helper.make_node("Gather", [produced, "wb_first"], [io_spec.output], axis=1)]
    else:  # mean over the real tokens, as EmbeddingModel does
        g.initializer.extend([numpy_helper.from_array(np.array([1], dtype=np.int64), "wb_seq_axis"),
                              numpy_helper.from_array(np.array([-1], dtype=np.int64), "wb_last_axis"),
                              numpy_helper.from_array(np.array(1e-9, dtype=np.float32), "wb_eps")])
        tail = [helper.make_node("Cast", ["attention_mask"], ["wb_mask"], to=TensorProto.FLOAT),
                helper.make_node("Unsqueeze", ["wb_mask", "wb_last_axis"], ["wb_mask3"]),
                helper.make_node("Mul", [produced, "wb_mask3"], ["wb_masked"]),
                helper.make_node("ReduceSum", ["wb_masked", "wb_seq_axis"], ["wb_sum"], keepdims=0),
                helper.make_node("ReduceSum", ["wb_mask3", "wb_seq_axis"], ["wb_count"], keepdims=0),
                helper.make_node("Max", ["wb_count", "wb_eps"], ["wb_count_safe"]),
                helper.make_node("Div", ["wb_sum", "wb_count_safe"], [io_spec.output])]
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old + tail)  # topological order: the zeros first, the pooling last
    g.output.append(helper.make_tensor_value_info(io_spec.output, TensorProto.FLOAT, ["batch", None]))
