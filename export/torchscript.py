"""TorchScript export: trace with the example inputs; script where tracing cannot capture the model."""
from __future__ import annotations

import time
import warnings
from pathlib import Path

from core.formats import ExportFormat, module_kinds, torch_callable
from core.model import ModelIO, example_inputs


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


def no_trace_form(module, fmt: str):
    """bitsandbytes layers call Python autograd functions that tracing cannot record."""
    if "bitsandbytes" in module_kinds(module):
        return (f"bitsandbytes layers have no {fmt} form (their matmuls are Python autograd functions); "
                "benchmark the module itself on a PyTorch backend")
    return None


class TorchScriptFormat(ExportFormat):
    name, file_name = "torchscript", "model.torchscript.pt"
    suffixes = (".pt", ".pth", ".torchscript")  # torch.jit.save writes a zip under any name; .pt is usual
    summary = "TorchScript (torch.jit.trace; torch.jit.script when tracing fails)"

    @classmethod
    def unsupported(cls, module):
        return no_trace_form(module, cls.name)

    @classmethod
    def export(cls, module, io, path: Path, spec) -> dict:
        return export_torchscript(module, io, path)

    @classmethod
    def load(cls, path: str):
        import torch

        return torch_callable(torch.jit.load(path))
