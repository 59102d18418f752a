"""Hardware-aware int8 settings for ONNX Runtime quantization: which weight and activation types,
`reduce_range`, per-channel scales, op types and QDQ vs QOperator format ORT runs fastest, and
faithfully, on a given processor. `auto` reads this machine's CPU flags.

Why these choices (ONNX Runtime's quantization guide and MLAS kernels):
- x86 int8 GEMMs multiply u8 activations by s8 weights. With AVX-512 VNNI / AVX-VNNI (and AMX) one
  instruction does it in 32-bit accumulators: full 8-bit weights are exact and fast.
- Without VNNI (AVX2, AVX-512F alone) the u8 x s8 product goes through vpmaddubsw, whose 16-bit
  intermediate saturates; 7-bit weights (`reduce_range`) avoid the overflow at a small cost in
  resolution. Int8 there runs at best near fp32 speed: say so rather than promise a gain.
- ARM with the dot-product extension (asimddp / sdot) multiplies s8 x s8 natively.
- Per-channel weight scales cost nothing at run time and keep far more of the model (a transformer's
  channels differ in range by orders of magnitude), so every preset uses them.
- Only MatMul / Gemm (and fused Attention) are quantized: Softmax, LayerNorm, GELU and residual Adds
  stay fp32, where quantizing buys little speed and costs fidelity.
- TensorRT consumes QDQ graphs with symmetric int8 weights and activations."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from core import cpu

PRESET_NAMES = ("auto", "avx2", "avx512", "avx512-vnni", "amx", "arm-dot", "tensorrt")
MATMUL_OPS = ["MatMul", "Gemm", "Attention"]


@dataclass(frozen=True)
class Preset:
    name: str
    mode: str  # dynamic / static
    weight_type: str = "QInt8"
    activation_type: str = "QUInt8"
    reduce_range: bool = False
    per_channel: bool = True
    quant_format: str = "QOperator"  # static only: QOperator or QDQ
    symmetric: bool = False  # static: symmetric activations and weights (TensorRT)
    op_types: list = field(default_factory=lambda: list(MATMUL_OPS))
    why: str = ""
    int8_pays: bool = True  # False: this processor has no fast int8 dot product


PRESETS = {
    "avx512-vnni": Preset("avx512-vnni", "dynamic", why=(
        "AVX-512 VNNI: u8 x s8 dot products in one instruction, so full 8-bit weights, per-channel scales, "
        "dynamic activation scales; MatMul / Gemm / Attention only")),
    "amx": Preset("amx", "dynamic", why=(
        "AMX (with AVX-512 VNNI): ORT's int8 GEMMs use VNNI / AMX tiles; full 8-bit weights, per-channel "
        "scales, dynamic activations; MatMul / Gemm / Attention only")),
    "avx512": Preset("avx512", "dynamic", reduce_range=True, int8_pays=False, why=(
        "AVX-512 without VNNI: the u8 x s8 product saturates its 16-bit intermediate, so 7-bit weights "
        "(reduce_range); int8 GEMMs run near fp32 speed here")),
    "avx2": Preset("avx2", "dynamic", reduce_range=True, int8_pays=False, why=(
        "AVX2 without VNNI: vpmaddubsw saturates u8 x s8 products, so 7-bit weights (reduce_range); int8 "
        "saves memory and bandwidth but its GEMMs run near fp32 speed here")),
    "arm-dot": Preset("arm-dot", "dynamic", why=(
        "ARM with the dot-product extension: s8 x s8 sdot in hardware; full 8-bit weights, per-channel scales")),
    "tensorrt": Preset("tensorrt", "static", activation_type="QInt8", quant_format="QDQ", symmetric=True, why=(
        "TensorRT: QDQ graph with symmetric int8 weights and activations, which it folds into int8 kernels")),
}


def detect(features: Optional[set[str]] = None) -> tuple[str, str]:
    """(preset name, the flags that decided it) for this machine's CPU."""
    f = cpu.features() if features is None else features
    if "amx_int8" in f:
        return "amx", "amx_int8"
    for flag in ("avx512_vnni", "avx_vnni", "avx512vnni"):
        if flag in f:
            return "avx512-vnni", flag
    if "asimddp" in f:
        return "arm-dot", "asimddp"
    if "avx512f" in f:
        return "avx512", "avx512f without VNNI"
    if "avx2" in f:
        return "avx2", "avx2 without VNNI"
    return "avx2", "no AVX2 / VNNI / dot-product flag found; assuming the conservative x86 settings"


def resolve(name: str, features: Optional[set[str]] = None) -> tuple[Preset, str]:
    """The preset to apply and a sentence saying why (what `auto` found on this machine)."""
    if name == "auto":
        chosen, flag = detect(features)
        return PRESETS[chosen], f"auto on this CPU ({flag}) -> {chosen}: {PRESETS[chosen].why}"
    return PRESETS[name], f"{name}: {PRESETS[name].why}"


def preset_settings(preset: Preset) -> dict:
    """The onnx-quantize parameters a preset sets."""
    return {"mode": preset.mode, "weight_type": preset.weight_type, "activation_type": preset.activation_type,
            "reduce_range": preset.reduce_range, "per_channel": preset.per_channel,
            "quant_format": preset.quant_format, "op_types": list(preset.op_types)}


def conv_share(path) -> float:
    """The share of a graph's multiply-adds done by Conv nodes, against Conv + MatMul + Gemm, per item
    (symbolic dimensions count as 1): from the weights' shapes and the inferred output shapes. A small
    CNN's convolutions run at every pixel, so its weights undercount them; this counts the work."""
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - without shapes, spatial sizes count as 1 (conv undercounted)
        pass
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    shapes = {}
    for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]:
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    conv = dense = 0.0
    for n in model.graph.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in weights:
            w = weights[n.input[1]]  # (out, in / group, kh, kw)
            out = shapes.get(n.output[0], [])
            spatial = float(np.prod(out[2:])) if len(out) > 2 else 1.0
            conv += spatial * float(np.prod(w))
        elif n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input[:2]):
            w = weights[next(i for i in n.input[:2] if i in weights)]
            x = shapes.get(next((i for i in n.input[:2] if i not in weights), ""), [])
            rows = float(np.prod(x[1:-1])) if len(x) > 2 else 1.0  # tokens per item; batch left out
            dense += rows * float(np.prod(w))
    total = conv + dense
    return conv / total if total else 0.0
