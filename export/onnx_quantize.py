"""ONNX Runtime quantization of an ONNX graph (a step after export)."""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Literal

from pydantic import Field

from workbench.steps import Step, StepParams, register


class OnnxQuantizeParams(StepParams):
    mode: Literal["dynamic"] = Field("dynamic", description="dynamic: int8 weights, activation scales per run")
    per_channel: bool = Field(False, description="one scale per output channel instead of per tensor")
    reduce_range: bool = Field(False, description="7-bit weights: avoids u8s8 saturation on CPUs without VNNI")
    weight_type: Literal["QInt8", "QUInt8"] = "QInt8"
    preprocess: bool = Field(True, description="run ORT's quant_pre_process (shape inference, graph cleanup) first")
    op_types: list[str] | None = Field(None, description="op types to quantize, e.g. [MatMul, Gemm]; default: all")


@contextlib.contextmanager
def _cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@register
class OnnxQuantize(Step):
    name = "onnx-quantize"
    summary = "ONNX Runtime dynamic int8 quantization (per-channel, reduce_range, weight type)"
    Params = OnnxQuantizeParams
    consumes = "onnx"

    def run(self, model, params, ctx):
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

        p = OnnxQuantizeParams.model_validate(params)
        src = model.onnx_path
        out = ctx.work_dir / "quantized.onnx"
        if p.preprocess:
            pre = ctx.work_dir / "preprocessed.onnx"
            try:
                # Symbolic shape inference drops temporary files into the current directory:
                # run it inside the step's folder, whose leftovers the cache clears.
                with _cwd(ctx.work_dir):
                    quant_pre_process(str(src.resolve()), str(pre.resolve()), skip_symbolic_shape=False)
                src = pre
            except Exception as e:  # noqa: BLE001 - preprocessing helps but is optional
                ctx.notes["preprocess_skipped"] = f"{type(e).__name__}: {str(e)[:200]}"
        quantize_dynamic(str(src), str(out), per_channel=p.per_channel, reduce_range=p.reduce_range,
                         weight_type=getattr(QuantType, p.weight_type),
                         op_types_to_quantize=p.op_types)
        final = ctx.work_dir / "model.onnx"
        shutil.move(out, final)
        model.onnx_path = final
        return model
