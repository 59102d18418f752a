"""PyTorch-level quantization steps."""
from __future__ import annotations

import copy
import warnings
from typing import Literal

from pydantic import Field

from core.modelfile import AFTER_LOAD
from core.steps import Step, StepParams, register


class QuantizeParams(StepParams):
    method: Literal["dynamic-int8", "bnb-int8", "bnb-nf4", "bnb-fp4", "fp16", "bf16"] = Field(
        "dynamic-int8", description="dynamic-int8: PyTorch int8 weights, activations quantized per batch (CPU); "
        "bnb-int8: bitsandbytes Linear8bitLt (LLM.int8); bnb-nf4 / bnb-fp4: bitsandbytes Linear4bit; "
        "fp16 / bf16: every floating weight and activation in half precision, inputs and output kept float32 "
        "(what GPUs run fastest; on CPUs bf16 pays only with AMX / AVX-512 BF16)")
    modules: list[Literal["Linear"]] = Field(default_factory=lambda: ["Linear"],
                                             description="layer types to quantize")
    skip_modules: list[str] = Field(default_factory=list, description="bnb: Linear layers (module names) kept "
                                    "in full precision, e.g. a classifier head")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="bnb 4-bit: the dtype the dequantized matmul runs in")


@register
class Quantize(Step):
    name = "quantize"
    details = (
        'bitsandbytes layers have no ONNX or TorchScript form; a Linear whose output width is not a multiple '
        'of 32 stays in full precision for 4-bit (recorded in the notes). Apply bnb to an `fp16` parent for '
        'the usual GPU set-up. fp16 / bf16 variants export like fp32 ones but differ by rounding: give '
        '`export.parity` room (e.g. `max_abs_diff: 1.0e-2`); a bf16 model with convolutions has no ONNX or '
        'OpenVINO artifact (ONNX\'s Conv has no bfloat16 type): for bf16 there, export the fp32 parent and set '
        'openvino-cpu `inference_precision: bf16`. Size figures: `weight_bytes` and '
        '`linear_weight_bytes`.'
    )
    summary = "PyTorch dynamic int8 (CPU), bitsandbytes int8 / nf4 / fp4, or fp16 / bf16 weights and activations"
    Params = QuantizeParams
    consumes = "torch"
    libraries = ("torch", "bitsandbytes")
    module_fields = ("skip_modules",)
    PRECISION = {"dynamic-int8": "int8", "bnb-int8": "int8", "bnb-nf4": "nf4", "bnb-fp4": "fp4", "fp16": "fp16",
                 "bf16": "bf16"}

    @classmethod
    def precision(cls, params: dict) -> str:
        return cls.PRECISION[params.get("method", "dynamic-int8")]

    @classmethod
    def weight_only(cls, params: dict) -> bool:
        return params.get("method") in ("bnb-nf4", "bnb-fp4")  # dequantized to compute_dtype for each matmul

    @classmethod
    def activation_scales(cls, params: dict):
        return "dynamic" if params.get("method", "dynamic-int8") in ("dynamic-int8", "bnb-int8") else None

    @classmethod
    def remedy(cls, finding: str, params, cpu_flags: list[str]):
        if params is None:
            return None
        method = params.get("method", "dynamic-int8")
        if finding == "bf16-emulated" and method in HALF:
            return [{"quantize": {"method": "dynamic-int8"}}]  # int8 Linear layers run on any x86 / ARM CPU
        if finding in ("weights-in-cache", "weight-only-compute-bound") and method in ("bnb-nf4", "bnb-fp4"):
            return [{"quantize": {"method": "dynamic-int8"}}]
        return None

    @classmethod
    def formats(cls, params: dict):
        # bitsandbytes' matmuls are Python autograd functions: no graph format can hold them.
        return ("torch",) if str(params.get("method", "")).startswith("bnb-") else None

    def run(self, model, params, ctx):
        import torch
        from torch import nn

        p = QuantizeParams.model_validate(params)
        if p.method in HALF:
            model.module = half_precision(copy.deepcopy(model.module).eval(), HALF[p.method])
            ctx.notes["dtype"] = HALF[p.method]
            return model
        module = copy.deepcopy(model.module).eval()
        converted = conv1d_to_linear(module)
        if converted:
            ctx.notes["conv1d_as_linear"] = converted
        if p.method.startswith("bnb-"):
            model.module = _bitsandbytes(module, p, ctx)
            return model
        tied = _tied_to_embeddings(module)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
            q = torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)
        n = sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in q.modules())
        if n == 0:
            raise ValueError("the model has no nn.Linear layer to quantize")
        ctx.notes["quantized_layers"] = n
        if tied:
            ctx.notes["tied_weights"] = (f"{', '.join(tied)} shared its weight with the input embedding: it now holds "
                                         "an int8 copy beside the float embedding, so the file grows by that copy")
        model.module = q
        return model


def conv1d_to_linear(module) -> int:
    """transformers' Conv1D (GPT-2's projections: y = x @ W + b, W of shape (in, out)) as the nn.Linear it is, in
    place, so steps that quantize nn.Linear layers see them: otherwise only GPT-2's LM head would be. Returns how
    many were swapped; the outputs are the same."""
    import torch
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return 0
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                w = child.weight.detach()
                lin = nn.Linear(w.shape[0], w.shape[1], bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(w.t())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias.detach())
                setattr(parent, name, lin)
                n += 1
    return n


def _tied_to_embeddings(module) -> list[str]:
    """Names of the nn.Linear layers whose weight is an nn.Embedding's (a tied LM head)."""
    from torch import nn

    shared = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and id(m.weight) in shared]


HALF = {"fp16": "float16", "bf16": "bfloat16"}
BNB_4BIT_CPU_BLOCK = 32  # bitsandbytes' block_n for its AVX-512 4-bit CPU kernel


def _floats_to(dtype, tensor):
    import torch

    return tensor.to(getattr(torch, dtype)) if torch.is_tensor(tensor) and tensor.is_floating_point() else tensor


def _cast_inputs(dtype, module, args, kwargs):
    return (tuple(_floats_to(dtype, a) for a in args), {k: _floats_to(dtype, v) for k, v in kwargs.items()})


def _output_to_float32(module, args, kwargs, output):
    return _floats_to("float32", output)


def half_precision(module, dtype: str):
    """Cast the module's floating weights and buffers to `dtype`; forward hooks cast floating inputs
    to it and the output back to float32, so callers, exports and the accuracy scores see the same
    interface as the fp32 model. The hooks are module-level functions: the module pickles, traces
    (TorchScript, ONNX) and exports (torch.export) with them."""
    import functools

    import torch

    module = module.to(getattr(torch, dtype))
    module.register_forward_pre_hook(functools.partial(_cast_inputs, dtype), with_kwargs=True)
    module.register_forward_hook(_output_to_float32, with_kwargs=True)
    return module


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
    swapped, kept = 0, {}
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Linear) or full in p.skip_modules:
                continue
            if p.method != "bnb-int8" and child.out_features % BNB_4BIT_CPU_BLOCK:
                # On CPUs with AVX-512 BF16, bitsandbytes repacks 4-bit weights for its CPU kernel at
                # the first forward and asserts that the output width divides into its blocks. Keep
                # such layers as they are, whatever CPU builds the variant: its file may run on one.
                kept[full] = (f"out_features {child.out_features} is not a multiple of {BNB_4BIT_CPU_BLOCK}, "
                              "which bitsandbytes' 4-bit CPU kernel needs")
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
        raise ValueError("the model has no nn.Linear layer to quantize" + (f" ({kept})" if kept else ""))
    module = module.to("cpu")  # bitsandbytes quantizes here
    ctx.notes.update(quantized_layers=swapped, bitsandbytes=bnb.__version__)
    if kept:
        ctx.notes["kept_in_full_precision"] = kept
    # Reloaded from its variant file (core.modelfile.load_module), the module needs its bitsandbytes
    # weights rewrapped: name the function that does it.
    setattr(module, AFTER_LOAD, f"{__name__}:restore_bitsandbytes")
    return module


def restore_bitsandbytes(module):
    """Give unpickled bitsandbytes layers their weight classes back.

    torch.save pickles a Parameter subclass as a plain Parameter carrying the subclass's attributes,
    so a reloaded Linear4bit's weight is no longer a Params4bit (nor a Linear8bitLt's an Int8Params).
    On the CPU that goes unnoticed; moved to CUDA, the weight's bytes move but its quantization
    state (absmax, SCB) stays in host memory, and the first kernel reads it from there: an illegal
    memory access (seen on an H200). Rewrapped, `.to(device)` moves both again."""
    import bitsandbytes as bnb

    for m in module.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, bnb.nn.Linear4bit) and w is not None and not isinstance(w, bnb.nn.Params4bit):
            state = w.__dict__
            m.weight = bnb.nn.Params4bit(
                w.data, requires_grad=False, quant_state=state.get("quant_state"),
                blocksize=state.get("blocksize"), compress_statistics=state.get("compress_statistics", True),
                quant_type=state.get("quant_type", "fp4"), quant_storage=state.get("quant_storage", w.dtype),
                module=m, bnb_quantized=state.get("bnb_quantized", True))
        elif isinstance(m, bnb.nn.Linear8bitLt) and w is not None and not isinstance(w, bnb.nn.Int8Params):
            state = w.__dict__
            m.weight = bnb.nn.Int8Params(w.data, requires_grad=False,
                                         has_fp16_weights=state.get("has_fp16_weights", False),
                                         CB=state.get("CB"), SCB=state.get("SCB"))
    return module
