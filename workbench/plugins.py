"""Which modules register the steps, backends and export formats this install offers: the built-in
ones named here, then those of installed packages that declare an entry point in the group
`model_workbench.plugins` (its value a module, e.g. `mine = "my_pkg.my_backend"`). Importing a module
registers what it defines (core.steps, core.backends, core.formats); a step, backend or format is
one module, and `pip install` of a package adds its names to a recipe's vocabulary."""
from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

GROUP = "model_workbench.plugins"

MODULES = (
    "compress.quantize", "compress.prune", "compress.distill",  # steps on torch modules
    "export.onnx_quantize", "export.onnx_optimize",  # steps on ONNX graphs
    "export.packing",  # pack-sequences: several requests in one row of tokens, for packed serving
    "export.nncf_steps",  # NNCF's post-training int8 and weight compression of ONNX graphs
    "export.onnx", "export.torchscript", "export.torch_export", "export.openvino_ir",  # export formats
    "export.gguf",  # llama.cpp's GGUF: the gguf-quantize step and the gguf format
    "export.ort_genai",  # ORT GenAI's model builder: the ort-genai-build step and its folder format
    "bench.torch_backends", "bench.ort_backends", "bench.openvino_backends",  # backends, one module per engine
    "bench.llama_cpp_backends", "bench.ort_genai_backends",
)

# Entry points that failed to import: (name, value, reason). A broken plugin must not stop the
# built-in vocabulary from working; `workbench list` shows these.
FAILED: list[tuple[str, str, str]] = []
_loaded = False


def load() -> None:
    global _loaded
    for name in MODULES:
        importlib.import_module(name)
    if _loaded:
        return
    _loaded = True
    for ep in entry_points(group=GROUP):
        try:
            ep.load()  # a module (or module:attr): importing it registers its classes
        except Exception as e:  # noqa: BLE001 - one broken plugin costs its own names, never the install
            FAILED.append((ep.name, ep.value, f"{type(e).__name__}: {e}"))
            logging.getLogger("workbench").warning("plugin %s (%s) failed to load: %s", ep.name, ep.value, e)


def external() -> list[tuple[str, str]]:
    """(entry-point name, module) of every plugin the installed packages declare."""
    return [(ep.name, ep.value) for ep in entry_points(group=GROUP)]
