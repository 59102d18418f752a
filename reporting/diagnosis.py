""""Why isn't it faster?": for every variant whose cell is not significantly faster than its parent's
on the same backend and batch size, a short diagnosis in plain words, built only from figures the
run recorded: the op-level profile (bench.profile), what the cell's backend says of its engine
(`Backend.findings`, e.g. the int8 kernels a graph was fused into), the CPU's flags, the variant's
sparsity and the roofline fraction. Which steps quantize, and how, comes from the step registry
(`Step.precision`, `weight_only`, `activation_scales`), never from step names."""
from __future__ import annotations

from typing import Optional

from core import cpu
from core.backends import BACKENDS
from core.steps import own_activation_scales, own_weight_only, precision_of
from reporting.analysis import faster, measured, significantly_faster

FLOAT_COMPUTE = {"Conv", "MatMul", "Gemm", "FusedGemm", "FusedMatMul", "FusedConv", "Attention",
                 "MultiHeadAttention"}
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
LAYOUT_OPS = {"Transpose", "Reshape", "Cast", "Concat", "Gather", "Slice", "Squeeze", "Unsqueeze", "Expand",
              "Shape", "Where", "aten::copy_", "aten::contiguous", "aten::to", "aten::_to_copy", "aten::permute",
              "aten::transpose", "aten::reshape", "aten::view", "aten::cat"}


def _is_int8(variants: dict, name: str) -> bool:
    """Whether the variant or an ancestor quantized weights and activations to int8 (Step.precision)."""
    precision, weight_only = precision_of(variants, name)
    return precision == "int8" and not weight_only


def _weight_only(variants: dict, name: str) -> bool:
    """Whether the variant's own steps quantize weights only (Step.weight_only)."""
    return own_weight_only(variants.get(name) or {})


def _memory_bound_finding(cell: dict, parent_cell: dict, variants: dict, caches: dict) -> Optional[str]:
    """A decoder's weight-only variant that is not faster: do its parent's weights even leave the cache?
    A decode step reads every weight once per token; from DRAM that is what bounds it, from cache it is not."""
    parent = variants.get((variants.get(cell["variant"]) or {}).get("parent")) or {}
    size, l2, l3 = parent.get("size_bytes"), caches.get("L2"), caches.get("L3")
    if not (cell.get("generation") and _weight_only(variants, cell["variant"]) and size and l3):
        return None
    mb = 1024 * 1024
    where = ("in this CPU's L2 cache" if l2 and size <= l2 else f"in this CPU's {l3 / mb:.0f} MB L3 cache"
             if size <= l3 else None)
    if where is None:
        return None
    return (f"its parent's weights ({size / mb:.1f} MB) fit {where}, so a decode step reads them from cache, not "
            "DRAM: fewer weight bytes save little there, while unpacking and scaling the quantized blocks adds work "
            "to every step (weight-only quantization pays where decoding streams weights from memory: models "
            "larger than the cache, decoded at small batches)")


def diagnose(cell: dict, parent_cell: dict, variants: dict, cpu_flags: list[str],
             caches: Optional[dict] = None) -> list[str]:
    """Plain-words findings for one cell that is not faster than its parent's."""
    name = cell["variant"]
    found = []
    bound = _memory_bound_finding(cell, parent_cell, variants, caches or {})
    if bound:
        found.append(bound)
    prof = cell.get("profile") or {}
    by_op = prof.get("by_op_ms") or {}
    total = sum(by_op.values())
    if total > 0:
        top, top_ms = max(by_op.items(), key=lambda kv: kv[1])
        quant = sum(ms for op, ms in by_op.items() if op in QUANT_OPS)
        layout = sum(ms for op, ms in by_op.items() if op in LAYOUT_OPS)
        found.append(f"most of its op time is in {top} ({top_ms / total:.0%})")
        if _is_int8(variants, name) and top in FLOAT_COMPUTE:
            found.append(f"that op, {top}, still runs in float: the quantization left it out (see op_types)")
        if quant / total >= 0.05:
            found.append(f"{quant / total:.0%} of op time is spent quantizing and dequantizing activations "
                         f"({', '.join(sorted(op for op in by_op if op in QUANT_OPS))})")
        if layout / total >= 0.10:
            found.append(f"{layout / total:.0%} of op time goes to layout ops (transposes, reshapes, casts)")
    int8 = _is_int8(variants, name)
    backend = BACKENDS.get(cell.get("backend"))
    if backend is not None:  # what only the cell's engine can say (e.g. which kernels its graph fused)
        found += backend.findings(cell, variants, list(cpu_flags or []))
    flags = set(cpu_flags or [])
    if int8 and flags and not cpu.has_int8_dot(flags):
        found.append("this CPU has no VNNI (or AMX / dot-product) instruction, so int8 MatMuls run at about "
                     "fp32 speed; int8 pays here in memory, not latency")
    v = variants.get(name) or {}
    if (v.get("sparsity") or 0) > 0.05 and v.get("format") == "torch":
        found.append(f"its {v['sparsity']:.0%} zeros sit in dense weights, which dense kernels multiply all the same")
    if cell.get("roofline_fraction") is not None:
        found.append(f"it runs at {cell['roofline_fraction']:.0%} of this CPU's {cell.get('roofline_precision', '')} "
                     "GEMM peak".replace("  ", " "))
    if not found:
        found.append("no op-level profile or kernel census was recorded for it (bench.profile: true records one)")
    return found


def diagnoses(results: dict, batch_size: int) -> list[dict]:
    """[{variant, parent, backend, batch_size, speedup (ratio, lo, hi) or None, findings}] for every
    measured cell at `batch_size` that is not significantly faster than its parent's cell."""
    variants = {v["name"]: v for v in results["variants"]}
    cells = {(c["variant"], c["backend"], c["batch_size"]): c for c in results["cells"] if measured(c)}
    flags = (results.get("environment") or {}).get("cpu_flags") or []
    caches = (results.get("environment") or {}).get("cpu_cache_bytes") or {}
    out = []
    for (name, backend, batch), cell in cells.items():
        parent = (variants.get(name) or {}).get("parent")
        p_cell = cells.get((parent, backend, batch))
        if batch != batch_size or p_cell is None or significantly_faster(cell, p_cell):
            continue
        flags_here = flags if cell.get("device") == "cpu" else []
        out.append({"variant": name, "parent": parent, "backend": backend, "batch_size": batch,
                    "speedup": faster(cell, p_cell), "findings": diagnose(cell, p_cell, variants, flags_here,
                                                                 caches if cell.get("device") == "cpu" else None)})
    return out


def diagnosis_lines(results: dict, batch_size: int) -> list[str]:
    """One sentence per diagnosed cell, for the report, then static int8 against dynamic int8."""
    lines = []
    for d in diagnoses(results, batch_size):
        s = d["speedup"]
        vs = f"{s[0]:.2f}x [{s[1]:.2f}, {s[2]:.2f}]" if s else "not significantly faster"
        lines.append(f"`{d['variant']}` on `{d['backend']}` (batch {d['batch_size']}) vs its parent "
                     f"`{d['parent']}`: {vs}. " + _sentence("; ".join(d["findings"])))
    return lines + static_vs_dynamic(results, batch_size)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def static_vs_dynamic(results: dict, batch_size: int) -> list[str]:
    """Static int8 is meant to beat dynamic int8 (no per-run activation scans). Where a static
    variant is slower or less faithful than a dynamic sibling (same parent), say why from the figures."""
    variants = {v["name"]: v for v in results["variants"]}
    cells = {(c["variant"], c["backend"]): c for c in results["cells"]
             if measured(c) and c["batch_size"] == batch_size}
    metric = (results.get("task") or {}).get("primary")
    lines = []
    for name, v in variants.items():
        scales, sp = own_activation_scales(v)
        if scales != "static":
            continue
        for dyn, d in variants.items():
            if own_activation_scales(d)[0] != "dynamic" or d.get("parent") != v.get("parent"):
                continue
            for (var, backend), cell in cells.items():
                other = cells.get((dyn, backend))
                if var != name or other is None:
                    continue
                slower = significantly_faster(other, cell)
                s_score = ((cell.get("accuracy") or {}).get(metric))
                d_score = ((other.get("accuracy") or {}).get(metric))
                worse = s_score is not None and d_score is not None and s_score < d_score - 1e-3
                if not (slower or worse):
                    continue
                found = []
                ratio = faster(other, cell)
                if slower:
                    found.append(f"dynamic `{dyn}` is {ratio[0]:.2f}x faster" if ratio else f"dynamic `{dyn}` is faster")
                by_op = (cell.get("profile") or {}).get("by_op_ms") or {}
                total = sum(by_op.values())
                if total and by_op.get("Attention"):
                    found.append(f"fused Attention stays float in static mode ({by_op['Attention'] / total:.0%} of its "
                                 "op time): the static quantizer has no QAttention, which dynamic mode uses")
                q = sum(ms for op, ms in by_op.items() if op in QUANT_OPS)
                if total and q / total >= 0.05:
                    found.append(f"{q / total:.0%} of op time goes to Quantize/DequantizeLinear around the "
                                 "integer MatMuls")
                if worse:
                    found.append(f"each activation gets one scale calibrated ahead ({sp.get('calibrate_method')}), "
                                 f"where dynamic mode scales every batch afresh: {metric} {s_score:.4f} against "
                                 f"{d_score:.4f}")
                lines.append(f"Static `{name}` vs dynamic `{dyn}` on `{backend}` (batch {batch_size}): "
                             + _sentence("; ".join(found)))
    return lines
