"""What ONNX Runtime will really run for a graph: the node types of the graph after ORT's own
optimisations on the CPU provider (what a cell gets), so a quantized model's int8 kernels, the
MatMuls that stayed fp32 and a fused attention can be verified, not assumed."""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

INT8_KERNELS = ("MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat", "QAttention",
                "QGemm", "QLinearConv", "ConvInteger", "MatMulNBits")
FLOAT_MATMULS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")
QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
ATTENTION = ("Attention", "MultiHeadAttention", "QAttention", "GroupQueryAttention")


def kernel_census(path: Path) -> dict:
    """Counts of the node types that decide int8 speed, in the graph ORT runs; the names of the
    MatMuls left in float (candidates for a look: were they excluded, or did fusion miss them?)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    initializers = {i.name for i in graph.initializer}
    # A float MatMul with a constant operand is a layer's weight product; activation x activation
    # products (attention scores) have no int8 form in a dynamic graph and are not counted.
    weight_matmuls = [n.name for n in graph.node if n.op_type in FLOAT_MATMULS
                      and any(i in initializers for i in n.input)]
    return {"int8_kernels": {k: ops[k] for k in INT8_KERNELS if ops[k]},
            "quant_ops": {k: ops[k] for k in QUANT_OPS if ops[k]},
            "float_weight_matmuls": len(weight_matmuls), "float_weight_matmul_names": weight_matmuls[:20],
            "attention_fused": any(ops[k] for k in ATTENTION), "softmax": ops["Softmax"],
            "nodes": sum(ops.values())}


def record_kernels(path: Path, notes: dict) -> None:
    """notes["kernels"] = the census; a census that fails says why (the variant stands without it)."""
    try:
        notes["kernels"] = kernel_census(path)
    except Exception as e:  # noqa: BLE001 - the census informs, it does not decide
        notes["kernels"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
