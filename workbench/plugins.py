"""Which modules register the steps, backends and export formats this install offers. The app
imports them once, here; core's registries are then complete. A new step, backend or format is one
new module, named here."""
from __future__ import annotations

import importlib

MODULES = (
    "compress.quantize", "compress.prune", "compress.distill",  # steps on torch modules
    "export.onnx_quantize", "export.onnx_optimize",  # steps on ONNX graphs
    "export.onnx", "export.torchscript", "export.torch_export",  # export formats
    "bench.backends",  # backends
)


def load() -> None:
    for name in MODULES:
        importlib.import_module(name)
