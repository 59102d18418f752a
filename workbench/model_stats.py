"""Size facts of a model: parameters, weight bytes, sparsity (fraction of exact zeros in weight
matrices), FLOPs per forward."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from core.model import ModelIO


def _weights(module):
    """(name, tensor) of every weight, including the packed int8 weights of quantized Linear layers."""
    import torch

    for name, p in module.named_parameters():
        yield name, p  # not .detach(): that drops the bitsandbytes subclass and its quant_state
    for name, m in module.named_modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            w, b = packed._weight_bias()
            yield f"{name}.weight", w
            if b is not None:
                yield f"{name}.bias", b
        elif isinstance(getattr(m, "weight", None), torch.Tensor) and not isinstance(m.weight, torch.nn.Parameter):
            yield f"{name}.weight", m.weight  # e.g. bitsandbytes / buffers standing in for weights


def torch_stats(module, io: ModelIO, seq_len: int) -> dict:
    import torch

    params = weight_bytes = matrix = zeros = 0
    with torch.no_grad():
        weights = list(_weights(module))
    for _, w in weights:
        qs = getattr(w, "quant_state", None)  # bitsandbytes 4-bit: packed bytes; the logical shape is here
        params += qs.shape.numel() if qs is not None and hasattr(qs, "shape") else w.numel()
        weight_bytes += w.numel() * w.element_size()
        if w.dim() >= 2 and qs is None:  # packed 4-bit bytes say nothing about zero weights
            matrix += w.numel()
            with torch.no_grad():
                zeros += int((w.int_repr() if w.is_quantized else w).eq(0).sum())
        weight_bytes += _quant_state_bytes(qs)
    embedding = sum(m.weight.numel() * m.weight.element_size() for m in module.modules()
                    if isinstance(m, torch.nn.Embedding))
    return {"params": int(params), "weight_bytes": int(weight_bytes), "linear_weight_bytes": _linear_bytes(module),
            # What a forward pass streams from memory: an embedding lookup reads a few rows, not the table.
            "streamed_weight_bytes": int(weight_bytes - embedding),
            "sparsity": round(zeros / matrix, 4) if matrix else 0.0, "flops": flops(module, io, seq_len)}


def _quant_state_bytes(qs) -> int:
    """Bytes of a bitsandbytes 4-bit weight's scales (absmax per block, nested when double-quantized):
    part of what the weight costs in memory."""
    if qs is None:
        return 0
    total = 0
    for name in ("absmax", "code"):
        t = getattr(qs, name, None)
        if t is not None and hasattr(t, "element_size"):
            total += t.numel() * t.element_size()
    return total + _quant_state_bytes(getattr(qs, "state2", None))


def _linear_bytes(module) -> int:
    """Weight bytes of the Linear layers alone (bitsandbytes' layers subclass nn.Linear; PyTorch's
    dynamic int8 ones are counted from their packed weights): what weight quantization acts on, apart
    from embedding tables, which stay in their dtype."""
    import torch

    total = 0
    for m in module.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            total += packed._weight_bias()[0].numel()  # one byte per int8 weight
        elif isinstance(m, torch.nn.Linear):
            w = m.weight
            total += w.numel() * w.element_size() + _quant_state_bytes(getattr(w, "quant_state", None))
    return int(total)


def flops(module, io: ModelIO, seq_len: int) -> Optional[int]:
    """FLOPs of one forward at batch 1 (torch.utils.flop_counter counts matmuls and convolutions;
    quantized kernels, PyTorch's or bitsandbytes', are not counted, so those models report None)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if any(getattr(m, "_packed_params", None) is not None or type(m).__module__.startswith("bitsandbytes")
           for m in module.modules()):
        return None
    inputs = {k: torch.from_numpy(v) for k, v in io.make(1, seq_len).items()}
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            module(**inputs)
        return int(counter.get_total_flops()) or None
    except Exception:  # noqa: BLE001 - FLOPs are a nice-to-have; a model they fail on still runs
        return None


def onnx_stats(path: Path) -> dict:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    params = weight_bytes = matrix = zeros = looked_up = 0
    consumers: dict[str, set] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        params += a.size
        weight_bytes += a.nbytes
        if consumers.get(t.name) == {"Gather"}:  # an embedding table: a lookup reads a few rows
            looked_up += a.nbytes
        if a.ndim >= 2:
            matrix += a.size
            zeros += int(np.count_nonzero(a == 0))
    return {"params": int(params), "weight_bytes": int(weight_bytes),
            "streamed_weight_bytes": int(weight_bytes - looked_up),
            "sparsity": round(zeros / matrix, 4) if matrix else 0.0, "flops": None}


def artifact_stats(fmt: str, path: Path, notes: list) -> dict:
    """An engine artifact's figures (a GGUF, an ORT GenAI folder): its files' bytes as the weights a decode step
    streams (the token embeddings included: neither keeps a separate count), and the parameter count and
    weights per type its step read back, where it did (gguf-quantize does, with llama.cpp's gguf-py)."""
    from core.formats import artifact_files

    found = next((n for n in notes if isinstance(n.get("params"), int)), {})
    size = files_size(artifact_files(fmt, path))
    return {"params": found.get("params"), "weight_bytes": size, "streamed_weight_bytes": size,
            **({"weights_by_type": found["weights_by_type"]} if "weights_by_type" in found else {}),
            "sparsity": None, "flops": None}


def files_size(paths) -> int:
    return int(sum(Path(p).stat().st_size for p in paths if Path(p).exists()))
