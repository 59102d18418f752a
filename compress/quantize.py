"""PyTorch-level quantization steps."""
from __future__ import annotations

import copy
import warnings
from typing import Literal

from pydantic import Field

from workbench.steps import Step, StepParams, register


class QuantizeParams(StepParams):
    method: Literal["dynamic-int8", "bnb-int8", "bnb-nf4", "bnb-fp4"] = Field(
        "dynamic-int8", description="dynamic-int8: PyTorch int8 weights, activations quantized per batch (CPU); "
        "bnb-int8: bitsandbytes Linear8bitLt (LLM.int8); bnb-nf4 / bnb-fp4: bitsandbytes Linear4bit")
    modules: list[Literal["Linear"]] = Field(default_factory=lambda: ["Linear"],
                                             description="layer types to quantize")
    skip_modules: list[str] = Field(default_factory=list, description="bnb: Linear layers (module names) kept "
                                    "in full precision, e.g. a classifier head")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="bnb 4-bit: the dtype the dequantized matmul runs in")


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
        if p.method.startswith("bnb-"):
            model.module = _bitsandbytes(copy.deepcopy(model.module).eval(), p, ctx)
            return model
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


def _bitsandbytes(module, p: QuantizeParams, ctx):
    """Swap nn.Linear layers for bitsandbytes layers; the weights are quantized when the module is
    moved to its device (`.to`), which is here the CPU: cells on CUDA move it again."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    names = dict(module.named_modules())
    unknown = [n for n in p.skip_modules if n not in names]
    if unknown:
        raise ValueError(f"skip_modules {unknown} are not modules of the model")
    swapped = 0
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Linear) or full in p.skip_modules:
                continue
            bias = child.bias is not None
            if p.method == "bnb-int8":
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias, has_fp16_weights=False,
                                          threshold=6.0)
                new.weight = bnb.nn.Int8Params(child.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias,
                                        compute_dtype=getattr(torch, p.compute_dtype), quant_type=p.method[4:])
                new.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type=p.method[4:])
            if bias:
                new.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(parent, child_name, new)
            swapped += 1
    if swapped == 0:
        raise ValueError("the model has no nn.Linear layer to quantize")
    module = module.to("cpu")  # bitsandbytes quantizes here
    ctx.notes.update(quantized_layers=swapped, bitsandbytes=bnb.__version__)
    return module
