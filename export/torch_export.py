"""torch.export target: an ExportedProgram saved as `.pt2`, batch and sequence axes dynamic."""
from __future__ import annotations

import time
from pathlib import Path

from core.formats import ExportFormat, torch_callable
from core.model import ModelIO, example_inputs
from export.torchscript import no_trace_form


def export_pt2(module, io_spec: ModelIO, path: Path) -> dict:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Dim.AUTO lets torch.export decide which symbolic axes really are dynamic (and say so).
    dynamic = {name: {i: torch.export.Dim.AUTO for i, d in enumerate(spec["shape"]) if d in ("batch", "seq")}
               for name, spec in io_spec.inputs.items()}
    program = torch.export.export(module, (), kwargs=example_inputs(io_spec), dynamic_shapes=dynamic)
    torch.export.save(program, str(path))
    return {"exporter": "torch.export", "fallback_reason": None, "seconds": round(time.perf_counter() - t0, 3)}


class TorchExportFormat(ExportFormat):
    name, file_name = "torch-export", "model.pt2"
    suffixes = (".pt2",)
    summary = "torch.export program (.pt2), batch and sequence axes dynamic"

    @classmethod
    def unsupported(cls, module):
        return no_trace_form(module, cls.name)

    @classmethod
    def export(cls, module, io, path: Path, spec) -> dict:
        return export_pt2(module, io, path)

    @classmethod
    def load(cls, path: str):
        import torch

        return torch_callable(torch.export.load(path).module())
