"""ONNX export with torch.onnx: the dynamo exporter first, the TorchScript-based exporter as a
recorded fallback; batch and sequence axes dynamic; the result checked by onnx.checker. With
exporter `optimum`, Hugging Face models go through optimum's exporter first (export.optimum_onnx)."""
from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path

from workbench.model import ModelIO

# Above this many weight bytes the graph cannot live in one protobuf (2 GiB limit).
EXTERNAL_DATA_BYTES = 1_800_000_000


def needs_external_data(module) -> bool:
    return sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES


def example_inputs(io_spec: ModelIO):
    """Batch 2 and sequence 16: a size of 1 would let the exporter specialise the axis."""
    import torch

    return {k: torch.from_numpy(v) for k, v in io_spec.make(batch=2, seq=16, seed=0).items()}


def dynamic_axes(io_spec: ModelIO) -> dict:
    axes = {name: {i: d for i, d in enumerate(spec["shape"]) if d in ("batch", "seq")}
            for name, spec in io_spec.inputs.items()}
    axes[io_spec.output] = {0: "batch"}
    return axes


def export_onnx(module, io_spec: ModelIO, path: Path, *, opset: int = 18, exporter: str = "dynamo") -> dict:
    """Write `path` (and `path.data` for large models); return what happened, for the results."""
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notices
    kwargs = example_inputs(io_spec)
    large = needs_external_data(module)
    record = {"exporter": None, "opset": opset, "fallback_reason": None}
    tries = {"optimum": ["optimum", "dynamo", "torchscript"], "dynamo": ["dynamo", "torchscript"]}.get(
        exporter, ["torchscript"])
    t0 = time.perf_counter()
    for which in tries:
        if which == "optimum":
            try:
                from export.optimum_onnx import export_with_optimum

                record["exporter"] = export_with_optimum(module, io_spec, path, opset=opset, external_data=large)
                break
            except Exception as e:  # noqa: BLE001 - recorded; the torch.onnx exporters come next
                record["fallback_reason"] = f"optimum exporter failed: {type(e).__name__}: {str(e)[:300]}"
                continue
        try:
            # The exporters print progress to stdout; the run log gets the pipeline's own lines.
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module, (), str(path), kwargs=kwargs, input_names=list(io_spec.inputs),
                    output_names=[io_spec.output], dynamic_axes=dynamic_axes(io_spec), opset_version=opset,
                    dynamo=(which == "dynamo"), external_data=large,
                    **({"optimize": True, "verbose": False} if which == "dynamo" else {}))
            record["exporter"] = f"torch.onnx ({which})"
            break
        except Exception as e:  # noqa: BLE001 - any exporter failure is recorded, then the next is tried
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]
            if which == tries[-1]:
                raise RuntimeError(f"ONNX export failed ({which} exporter): {reason}") from e
            record["fallback_reason"] = "; ".join(filter(None, [record["fallback_reason"],
                                                                f"dynamo exporter failed: {reason}"]))
    record["seconds"] = round(time.perf_counter() - t0, 3)
    onnx.checker.check_model(str(path))  # path form: works for external data too
    onnx.shape_inference.infer_shapes_path(str(path))
    record["external_data"] = large
    return record


def onnx_files(path: Path) -> list[Path]:
    """The .onnx file and any external-data files saved beside it."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    extra = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return [path] + [path.parent / x for x in sorted(extra)]
