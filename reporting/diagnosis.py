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
from core.findings import Finding, recipe_line
from core.steps import STEPS, lineage, own_activation_scales, own_weight_only, precision_of
from reporting.analysis import faster, measured, significantly_faster

FLOAT_COMPUTE = {"Conv", "MatMul", "Gemm", "FusedGemm", "FusedMatMul", "FusedConv", "Attention",
                 "MultiHeadAttention"}
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
REFERENCE_INT8 = {"ConvInteger"}  # dynamic int8 convolutions: ONNX Runtime has no optimised kernel for them
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


def _memory_bound_finding(cell: dict, parent_cell: dict, variants: dict, caches: dict) -> Optional[Finding]:
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
    return Finding(f"its parent's weights ({size / mb:.1f} MB) fit {where}, so a decode step reads them from cache, "
                   "not DRAM: fewer weight bytes save little there, while unpacking and scaling the quantized blocks "
                   "adds work to every step (weight-only quantization pays where decoding streams weights from "
                   "memory: models larger than the cache, decoded at small batches)", "weights-in-cache")


ANCESTOR_FREE = {"int8-reference-kernel", "quantize-overhead", "qdq-unfolded"}


def dispatch_floor(cell: dict, others: list[dict]) -> Optional[tuple[float, int]]:
    """(ms per call that no batch size changes, the larger batch it was measured against): from this
    cell's p50 at batch b and the same variant and backend at a larger batch B, on the line
    latency = floor + batch x per-item; None without a larger batch, or where the line does not fit."""
    b, p = cell["batch_size"], cell["latency_ms"]["p50"]
    larger = [o for o in others if o["batch_size"] > b and o.get("latency_ms")]
    if not larger:
        return None
    big = max(larger, key=lambda o: o["batch_size"])
    n, q = big["batch_size"], big["latency_ms"]["p50"]
    per_item = (q - p) / (n - b)
    floor = p - b * per_item
    return (floor, n) if per_item > 0 and floor > 0 else None


def diagnose(cell: dict, parent_cell: dict, variants: dict, cpu_flags: list[str],
             caches: Optional[dict] = None, others: Optional[list[dict]] = None) -> list[Finding]:
    """Plain-words findings for one cell that is not faster than its parent's, each with the change to
    try where a step of the variant has an answer to it (`Step.remedy`). `others`: the same variant and
    backend at other batch sizes (they show whether a call is dispatch overhead)."""
    name = cell["variant"]
    found: list[Finding] = []
    bound = _memory_bound_finding(cell, parent_cell, variants, caches or {})
    if bound:
        found.append(bound)
    int8 = _is_int8(variants, name)
    flags = set(cpu_flags or [])
    prof = cell.get("profile") or {}
    by_op = prof.get("by_op_ms") or {}
    total = sum(by_op.values())
    if total > 0:
        top, top_ms = max(by_op.items(), key=lambda kv: kv[1])
        quant = sum(ms for op, ms in by_op.items() if op in QUANT_OPS)
        layout = sum(ms for op, ms in by_op.items() if op in LAYOUT_OPS)
        if top in REFERENCE_INT8:
            found.append(Finding(f"most of its op time is in {top} ({top_ms / total:.0%}), an int8 reference kernel "
                                 "slower than the float op it replaced: dynamic quantization emits it for "
                                 "convolutions, where static QDQ quantization runs fused int8 kernels",
                                 "int8-reference-kernel"))
        else:
            found.append(Finding(f"most of its op time is in {top} ({top_ms / total:.0%})", "fact"))
        if int8 and top in FLOAT_COMPUTE:
            found.append(Finding(f"that op, {top}, still runs in float: the quantization left it out (see op_types)",
                                 "float-op-left-out"))
        if quant / total >= 0.05:
            ops = sorted(op for op in by_op if op in QUANT_OPS)
            qdq = sum(ms for op, ms in by_op.items() if op in QDQ_OPS)
            found.append(Finding(
                f"{quant / total:.0%} of op time is spent quantizing and dequantizing activations ({', '.join(ops)})"
                + (": Quantize/DequantizeLinear pairs the engine did not fold into its int8 kernels" if qdq > quant / 2
                   else ""), "qdq-unfolded" if qdq > quant / 2 else "quantize-overhead"))
        if layout / total >= 0.10:
            found.append(Finding(f"{layout / total:.0%} of op time goes to layout ops (transposes, reshapes, casts)",
                                 "layout-ops"))
    backend = BACKENDS.get(cell.get("backend"))
    if backend is not None:  # what only the cell's engine can say (e.g. which kernels its graph fused)
        found += [f if isinstance(f, Finding) else Finding(f) for f in backend.findings(cell, variants, list(flags))]
    if int8 and flags and not cpu.has_int8_dot(flags):
        found.append(Finding("this CPU has no VNNI (or AMX / dot-product) instruction, so int8 MatMuls run at about "
                             "fp32 speed; int8 pays here in memory, not latency", "int8-no-dot-product"))
    precision = precision_of(variants, name)[0]
    if precision == "bf16" and flags and cell.get("device") == "cpu" and not cpu.has_native_bf16(flags):
        found.append(Finding("this CPU has neither AMX nor AVX-512 BF16 (nor ARM bf16), so bfloat16 arithmetic is "
                             "emulated, converted to and from fp32 around each op: slower than fp32, not faster",
                             "bf16-emulated"))
    floor = dispatch_floor(cell, others or []) if cell.get("latency_ms") and not cell.get("generation") else None
    if floor and floor[0] >= 0.5 * cell["latency_ms"]["p50"]:
        ms, big = floor
        found.append(Finding(
            f"a call costs about {ms:.3f} ms whatever the batch (the per-call floor measured from batch "
            f"{cell['batch_size']} against batch {big}), {ms / cell['latency_ms']['p50']:.0%} of this cell's p50: the "
            "model is so small that a call is mostly dispatch, and no compression of its arithmetic can pay here",
            "dispatch-bound", fix=f"measure and serve at larger batches: bench: {{batch_sizes: [{big}, {2 * big}]}}",
            bench={"batch_sizes": [big, 2 * big]}))
    v = variants.get(name) or {}
    if (v.get("sparsity") or 0) > 0.05 and v.get("format") == "torch":
        found.append(Finding(f"its {v['sparsity']:.0%} zeros sit in dense weights, which dense kernels multiply all "
                             "the same", "sparse-in-dense",
                             fix="prune with method: structured, which removes channels instead of zeroing them"))
    if cell.get("roofline_fraction") is not None:
        found.append(Finding(f"it runs at {cell['roofline_fraction']:.0%} of this CPU's "
                             f"{cell.get('roofline_precision', '')} GEMM peak".replace("  ", " "), "fact"))
    if _weight_only(variants, name) and not cell.get("generation") and cell["batch_size"] > 1:
        found.append(Finding("weight-only quantization keeps float activations and float matmuls, and dequantizes "
                             f"every weight at every call: at batch {cell['batch_size']} the matmuls are "
                             "compute-bound, so fewer weight bytes save no time", "weight-only-compute-bound"))
    if not any(f.kind != "fact" for f in found) and not by_op:
        found.append(Finding("no op-level profile or kernel census was recorded for it", "no-profile",
                             fix="bench: {profile: true}"))
    return [f if f.kind == "fact" else _with_remedy(f, v, variants, list(flags), backend, bool(cell.get("generation")))
            for f in found]


# What to try where no step has a recipe line for it: advice in words, never silence.
GENERIC_FIX = {
    "layout-ops": "a graph with its transposes and reshapes fused away: an ONNX optimisation step with the "
                  "fusion of the model's family, or a compiling backend",
    "attention-float": "an attention fusion for this model family (ONNX Runtime fuses BERT-like encoders' "
                       "attention; decoders' GroupQueryAttention comes from ONNX Runtime GenAI's model builder)",
    "int8-no-dot-product": "keep int8 for its memory savings and measure latency on a CPU with VNNI / AMX, or "
                           "stay in fp32 here",
    "float-op-left-out": "quantize that op type too (the quantizing step's op_types), or accept it in float",
    "quantize-overhead": "fewer quantize / dequantize boundaries: quantize whole runs of ops, or static int8 with "
                         "the scales folded into the kernels",
    "qdq-unfolded": "an int8 graph written with its integer operators directly (QOperator format) instead of "
                    "Quantize/DequantizeLinear pairs left for the engine to fold",
    "int8-reference-kernel": "static int8 (calibrated scales) for the convolutions",
    "weights-in-cache": "int8 weights and activations, which make the matmuls faster, not only the loads",
    "weight-only-compute-bound": "int8 weights and activations, which make the matmuls faster, not only the loads",
    "bf16-emulated": "int8, which every x86 CPU with AVX2 runs in integer units; bf16 where AMX or AVX-512 BF16 is "
                     "present",
    "engine": "see the engine's profile below for the op that dominates",
}


def _with_remedy(f: Finding, variant: dict, variants: dict, flags: list[str], cell_backend=None,
                 generation: bool = False) -> Finding:
    """The finding with the change to try: from the newest step along the variant's lineage that has an
    answer to its kind (Step.remedy: the steps, from the variant's parent, that replace the variant's
    own), else from a registered step the variant lacks (added before its own steps), else in words."""
    found = _lineage_remedy(f, variant, variants, flags)
    if found.fix:
        return found
    own = [as_written(x) for x in variant.get("steps") or []]
    if f.kind == "layout-ops" and cell_backend is not None and not cell_backend.compiles:
        # A compiler fuses layout ops into their neighbours: the same variant on a compiling backend.
        compiled = [n for n, b in BACKENDS.items() if b.compiles and b.device == cell_backend.device
                    and b.format == cell_backend.format and (b.generates or not generation)]
        if compiled:
            return f.with_fix(f"the same variant measured compiled: backends: [{compiled[0]}]",
                              bench={"backends": [compiled[0]]})
    has = {s.get("name") for _, steps in lineage(variants, variant.get("name")) for s in steps}
    for name, cls in STEPS.items():
        if name in has:  # its own remedy (above) had nothing for this finding: adding it again would not help
            continue
        add = cls.remedy(f.kind, None, flags)
        if add:
            new = _insert(add, own)
            return f.with_fix(f"from: {variant.get('parent') or 'the source model'}, steps: {recipe_line(new)}", new)
    return f.with_fix(GENERIC_FIX.get(f.kind)) if f.kind in GENERIC_FIX else f


def _insert(add: list, own: list) -> list:
    """`add` before the variant's own steps, but after the last one that works on the torch module when
    `add` works on the ONNX graph (a graph step cannot come before a module step)."""
    first = STEPS.get(next(iter(add[0])) if isinstance(add[0], dict) else add[0])
    if first is None or first.consumes != "onnx":
        return add + own
    names = [next(iter(x)) if isinstance(x, dict) else x for x in own]
    torch_at = [i for i, n in enumerate(names) if n in STEPS and STEPS[n].consumes == "torch"]
    at = torch_at[-1] + 1 if torch_at else 0
    return own[:at] + add + own[at:]


def _lineage_remedy(f: Finding, variant: dict, variants: dict, flags: list[str]) -> Finding:
    if f.fix or f.steps:
        return f
    name, chain = variant.get("name"), []
    while name in variants and name not in chain:
        chain.append(name)
        v = variants[name]
        steps = v.get("steps") or []
        for i in range(len(steps) - 1, -1, -1):
            s = steps[i]
            cls = STEPS.get(s.get("name"))
            fix = cls.remedy(f.kind, s.get("params") or {}, flags) if cls is not None else None
            if fix and name != variant.get("name") and f.kind in ANCESTOR_FREE:
                fix = None  # this cause is the variant's own step's, not an ancestor's
            if fix:
                if name != variant.get("name"):  # an ancestor's step: redo that ancestor, then the rest
                    return f.with_fix(f"from: {v.get('parent') or 'the source model'}, steps: {recipe_line(fix)} "
                                      f"(in place of `{name}`'s {s.get('name')})", None)
                new = [as_written(x) for x in steps[:i]] + fix + [as_written(x) for x in steps[i + 1:]]
                return f.with_fix(f"from: {variant.get('parent') or 'the source model'}, steps: {recipe_line(new)}",
                                  new)
        name = v.get("parent")
    return f


def as_written(step: dict) -> dict:
    """A results.json step ({"name", "params"}) as a recipe writes it, without the defaults its Params fill in."""
    cls = STEPS.get(step["name"])
    params = step.get("params") or {}
    if cls is not None:
        try:
            defaults = cls.Params().model_dump(mode="json")
        except Exception:  # noqa: BLE001 - a Params with required fields has no all-default form
            defaults = {}
        params = {k: v for k, v in params.items() if k not in defaults or defaults[k] != v}
    return {step["name"]: params} if params else step["name"]


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
        others = [c for (n, b, _), c in cells.items() if n == name and b == backend and c is not cell]
        out.append({"variant": name, "parent": parent, "backend": backend, "batch_size": batch,
                    "speedup": faster(cell, p_cell),
                    "findings": diagnose(cell, p_cell, variants, flags_here,
                                         caches if cell.get("device") == "cpu" else None, others)})
    return out


def diagnosis_lines(results: dict, batch_size: int) -> list[str]:
    """One paragraph per diagnosed cell, for the report: each cause, then the change to try (a recipe
    line), then static int8 against dynamic int8."""
    lines = []
    for d in diagnoses(results, batch_size):
        s = d["speedup"]
        vs = f"{s[0]:.2f}x [{s[1]:.2f}, {s[2]:.2f}]" if s else "not significantly faster"
        lines.append(f"`{d['variant']}` on `{d['backend']}` (batch {d['batch_size']}) vs its parent "
                     f"`{d['parent']}`: {vs}. " + " ".join(_sentence(_with_fix_text(f)) for f in d["findings"]))
    return lines + static_vs_dynamic(results, batch_size)


def _with_fix_text(f: Finding) -> str:
    if not f.fix:
        return str(f)
    if f.steps or f.fix.startswith(("from:", "bench:")):
        return f"{f}. Try: `{f.fix}`"
    if f.bench and ": " in f.fix:  # words, then the recipe line
        words, line = f.fix.split(": ", 1)
        return f"{f}. Try {words}: `{line}`"
    return f"{f}. Try: {f.fix}"


def _sentence(text: str) -> str:
    text = text[:1].upper() + text[1:]
    return text if text.endswith(".") else text + "."


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
