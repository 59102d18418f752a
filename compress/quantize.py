"""PyTorch-level quantization steps."""
from __future__ import annotations

import copy
import warnings
from typing import Literal

from pydantic import Field

from workbench.steps import Step, StepParams, register


class QuantizeParams(StepParams):
    method: Literal["dynamic-int8"] = Field(
        "dynamic-int8", description="dynamic-int8: int8 weights, activations quantized per batch at run time")
    modules: list[Literal["Linear"]] = Field(default_factory=lambda: ["Linear"],
                                             description="layer types to quantize")


@register
class Quantize(Step):
    name = "quantize"
    summary = "PyTorch dynamic int8 quantization of Linear layers (CPU kernels: fbgemm / qnnpack)"
    Params = QuantizeParams
    consumes = "torch"

    def run(self, model, params, ctx):
        import torch
        from torch import nn

        p = QuantizeParams.model_validate(params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
            q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model.module).eval(), {nn.Linear},
                                                       dtype=torch.qint8)
        n = sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in q.modules())
        if n == 0:
            raise ValueError("the model has no nn.Linear layer to quantize")
        ctx.notes["quantized_layers"] = n
        model.module = q
        return model
