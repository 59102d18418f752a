"""TorchScript export: trace with the example inputs; script where tracing cannot capture the model."""
from __future__ import annotations

import time
import warnings
from pathlib import Path

from export.onnx import example_inputs
from workbench.model import ModelIO


def export_torchscript(module, io_spec: ModelIO, path: Path) -> dict:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    kwargs = example_inputs(io_spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            scripted = torch.jit.trace(module, example_kwarg_inputs=kwargs, strict=False, check_trace=False)
        how, fallback = "torch.jit.trace", None
    except Exception as e:  # noqa: BLE001
        fallback = f"trace failed: {type(e).__name__}: {str(e)[:300]}"
        scripted = torch.jit.script(module)
        how = "torch.jit.script"
    torch.jit.save(scripted, str(path))
    return {"exporter": how, "fallback_reason": fallback, "seconds": round(time.perf_counter() - t0, 3)}
