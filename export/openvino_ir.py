"""OpenVINO IR export: `model.xml` (the graph) and `model.bin` (the weights), converted with
`openvino.convert_model` from the variant's ONNX graph (the file a user hands OpenVINO, and the only
form an ONNX-only variant has), or from the torch module when no ONNX graph can be made; saved with
the weights as they are (fp32) unless `export.openvino_fp16` asks for fp16 compression. Parity is
checked in a fresh process at f32 inference precision: it tests the conversion, while the precision a
backend chooses at run time (bf16 on AMX) is measured in its cells' accuracy."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

from core.formats import ExportFormat, FORMATS


def convert_onnx(onnx_path: Path, path: Path, fp16: bool = False) -> dict:
    """Write the IR at `path` from an ONNX file (with its external data, if any)."""
    import openvino as ov

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = ov.convert_model(str(onnx_path))
    _save(model, path, fp16)
    return {"exporter": "openvino.convert_model (from the ONNX graph)", "fp16_weights": fp16,
            "seconds": round(time.perf_counter() - t0, 3), "openvino": ov.__version__}


def _save(model, path: Path, fp16: bool) -> None:
    """save_model writes the .xml and .bin under temporary names, then both are renamed into place:
    a reader never finds a graph without its weights."""
    import os

    import openvino as ov

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".ir-") as tmp:
        ov.save_model(model, str(Path(tmp) / path.name), compress_to_fp16=fp16)
        os.replace(Path(tmp) / path.with_suffix(".bin").name, path.with_suffix(".bin"))
        os.replace(Path(tmp) / path.name, path)


class OpenvinoFormat(ExportFormat):
    name, file_name = "openvino", "model.xml"
    suffixes = (".xml",)
    summary = ("OpenVINO IR (.xml graph + .bin weights) via openvino.convert_model from the ONNX graph "
               "(or the torch module where no ONNX graph can be made)")

    @classmethod
    def unsupported(cls, module) -> Optional[str]:
        return FORMATS["onnx"].unsupported(module)  # converted from the ONNX graph: the same reach

    @classmethod
    def export(cls, module, io, path: Path, spec) -> dict:
        fp16 = bool(getattr(spec, "openvino_fp16", False))
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            try:
                onnx_rec = FORMATS["onnx"].export(module, io, onnx_path, spec)
            except Exception as e:  # noqa: BLE001 - recorded; OpenVINO's own PyTorch frontend comes next
                return {**_from_torch(module, io, Path(path), fp16),
                        "fallback_reason": f"ONNX export failed: {type(e).__name__}: {str(e)[:300]}"}
            rec = convert_onnx(onnx_path, path, fp16)
        return {**rec, "onnx_exporter": onnx_rec.get("exporter"), "fallback_reason": onnx_rec.get("fallback_reason")}

    @classmethod
    def from_onnx(cls, onnx_path: Path, path: Path, spec) -> dict:
        """The IR of a variant that is an ONNX graph (a quantized graph keeps its Q/DQ: OpenVINO runs it int8)."""
        return convert_onnx(onnx_path, path, bool(getattr(spec, "openvino_fp16", False)))

    @classmethod
    def load(cls, path: str):
        from runtime.openvino_runner import OvLM, OvRunner, read_model

        if any(p.get_any_name().startswith("past_key_values.") for p in read_model(path).inputs):
            lm = OvLM(path, options={"INFERENCE_PRECISION_HINT": "f32"})
            return lambda b: lm.logits(b["input_ids"], b["attention_mask"])
        runner = OvRunner(path, "CPU", threads=None, options={"INFERENCE_PRECISION_HINT": "f32"}, static=False)
        return lambda b: runner.outputs(runner.prepare(b))

    @classmethod
    def files(cls, path):
        return [Path(path), Path(path).with_suffix(".bin")]


def _from_torch(module, io, path: Path, fp16: bool) -> dict:
    import openvino as ov
    import torch

    from core.model import example_inputs

    t0 = time.perf_counter()
    with torch.no_grad():
        model = ov.convert_model(module, example_input=example_inputs(io))
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(model, path, fp16)
    return {"exporter": "openvino.convert_model (from the torch module)", "fp16_weights": fp16,
            "seconds": round(time.perf_counter() - t0, 3), "openvino": ov.__version__}
