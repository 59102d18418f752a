"""ONNX Runtime quantization of an ONNX graph (a step after export): dynamic int8, static int8 in
QDQ format calibrated on batches of the task's training split, and int4 weight-only (MatMulNBits)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from core.errors import field_error
from core.processes import working_directory
from core.progress import library_prints
from core.steps import Step, StepParams, register
from export.graph_kernels import record_kernels
from export.quant_presets import PRESET_NAMES


class KeepFp32(StepParams):
    top_k: Optional[int] = Field(None, ge=0, description="keep this many of the most sensitive nodes in float")
    target: Optional[float] = Field(None, gt=0, le=1, description="keep the fewest most-sensitive nodes in float "
                                    "that bring the fidelity (cosine of outputs to the float graph's; for causal "
                                    "LMs exp(-KL) of next-token distributions; on training batches) to this; with top_k, top_k wins and the suggestion is only recorded")
    batches: int = Field(2, gt=0, description="training batches the sensitivity is measured on")


class OnnxQuantizeParams(StepParams):
    mode: Literal["dynamic", "static", "auto", "int4", "weight-only"] = Field(
        "dynamic", description="dynamic: int8 weights, activation scales per run; static: int8 weights and "
        "activations (QDQ), scales calibrated on task data; auto (what `preset: auto` sets): static QDQ with "
        "Conv where convolutions do most of the graph's multiply-adds (dynamic mode would run them as "
        "ConvInteger, an unoptimised reference kernel), dynamic for MatMul-dominated graphs (transformers), the "
        "choice and its reason in the notes; weight-only: `bits`-bit block-quantized weights (MatMulNBits), "
        "activations stay float (what LLM deployments use); int4: weight-only with bits 4")
    bits: Literal[4, 8] = Field(4, description="weight-only: bits per weight (int4 always 4)")
    per_channel: bool = Field(False, description="int8: one scale per output channel instead of per tensor")
    reduce_range: bool = Field(False, description="int8: 7-bit weights, avoids u8s8 saturation on CPUs without VNNI")
    weight_type: Literal["QInt8", "QUInt8"] = Field("QInt8", description="int8: the weights' integer type")
    activation_type: Literal["QInt8", "QUInt8"] = Field("QUInt8", description="static: activation integer type")
    calibration_batches: int = Field(8, gt=0, description="static: batches of the training split to calibrate on")
    calibrate_method: Literal["MinMax", "Entropy", "Percentile"] = Field(
        "MinMax", description="static: how activation ranges are calibrated")
    block_size: int = Field(32, ge=16, description="weight-only (int4): weights per quantization block (a power of 2)")
    accuracy_level: Optional[Literal[0, 1, 2, 3, 4]] = Field(
        None, description="weight-only (int4): MatMulNBits compute precision (4: int8 activations, the fast CPU path)")
    symmetric: bool = Field(True, description="weight-only (int4): symmetric blocks (no zero point)")
    algorithm: Literal["default", "rtn", "hqq", "gptq"] = Field(
        "default", description="weight-only, 4 bits: how the blocks are chosen. default: ORT's own round-to-nearest "
        "blocks; rtn: Intel Neural Compressor's round-to-nearest (as bundled with ORT); hqq: half-quadratic "
        "quantization (no data); gptq: GPTQ, calibrated on `calibration_batches` of the training split")
    preset: Optional[Literal[PRESET_NAMES]] = Field(
        None, description="int8 settings for a processor: auto (this machine's CPU flags), avx2, avx512, avx512-vnni, "
        "amx, arm-dot, tensorrt; sets mode, types, reduce_range, per_channel, op_types and format, except the ones "
        "given explicitly; the choice and its reason go into the lineage")
    quant_format: Literal["QDQ", "QOperator"] = Field(
        "QDQ", description="static: QDQ (Quantize/DequantizeLinear pairs ORT fuses into integer kernels) or "
        "QOperator (QLinearMatMul / QAttention nodes written directly)")
    exclude_nodes: list[str] = Field(default_factory=list, description="int8 and weight-only: node names kept in "
                                     "float (e.g. the most sensitive MatMuls)")
    keep_fp32: Optional[KeepFp32] = Field(None, description="int8 and weight-only: rank the quantizable nodes by how "
                                          "much quantizing each alone costs, and keep the most sensitive in float")
    preprocess: bool = Field(True, description="int8: run ORT's quant_pre_process (shape inference, cleanup) first")
    op_types: Optional[list[str]] = Field(None, description="op types to quantize, e.g. [MatMul, Gemm]; default: all")


WEIGHT_ONLY = ("int4", "weight-only")


def _algorithm(src, p, ctx):
    """ORT's weight-only algorithm config for `p.algorithm` (None: its default blocks). RTN and GPTQ run
    the Intel Neural Compressor code ORT bundles, GPTQ on the training split's batches."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    if p.algorithm == "default":
        return None
    if p.algorithm == "hqq":
        return mq.HQQWeightOnlyQuantConfig(block_size=p.block_size, bits=p.bits)
    if p.algorithm == "rtn":
        return mq.RTNWeightOnlyQuantConfig()
    from runtime.infer import graph_feeds

    if ctx.task is None or not ctx.task.train_batches:
        raise ValueError("GPTQ calibrates on the task's training split, and it has no batches")
    feeds = graph_feeds(src, ctx.task.train_batches[:p.calibration_batches])
    ctx.notes["calibration"] = {"batches": len(feeds), "for": "GPTQ"}
    return mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Feeds(feeds), block_size=p.block_size)


class _Feeds:
    """A CalibrationDataReader over ready feeds; GPTQ deep-copies it and iterates it."""

    def __init__(self, feeds):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        self.i += 1
        return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    def __iter__(self):
        return iter(self.feeds)


def _aliases(names: Optional[list[str]]) -> Optional[list[str]]:
    """Node names as the quantizer sees them: it first splits a Gemm into MatMul + Add, and the MatMul
    is then called `<gemm>_MatMul`; a name the graph lacks matches nothing, so both are passed."""
    return None if names is None else [x for n in names for x in (n, f"{n}_MatMul")]


def _same_shape(batches: list[dict]) -> list[dict]:
    """Calibration batches padded with zeros (padding tokens, a zero attention mask) to one length:
    the histogram calibrators (Entropy, Percentile) stack every batch's activations, which fails
    when text batches differ in sequence length."""
    import numpy as np

    size = max(len(next(iter(b.values()))) for b in batches)
    batches = [b for b in batches if len(next(iter(b.values()))) == size]  # a short last batch would not stack
    longest = {k: max(b[k].shape[1] for b in batches) for k in batches[0] if batches[0][k].ndim >= 2}
    return [{k: (np.pad(v, [(0, 0), (0, longest[k] - v.shape[1])] + [(0, 0)] * (v.ndim - 2))
                 if k in longest else v) for k, v in b.items()} for b in batches]


class _Calibration:
    """onnxruntime.quantization.CalibrationDataReader over the task's training batches."""

    def __init__(self, batches, names):
        self._it = iter([{k: v for k, v in b.items() if k in names} for b in batches])

    def get_next(self):
        return next(self._it, None)


@register
class OnnxQuantize(Step):
    name = "onnx-quantize"
    details = (
        'Presets are expanded when the recipe loads, so the cache key and the lineage hold concrete settings: '
        '`avx512-vnni` / `amx` (full 8-bit weights), `avx2` / `avx512` (no VNNI: `reduce_range`, because the '
        'u8 x s8 product saturates there; int8 then saves memory rather than time), `arm-dot` (s8 x s8 dot '
        'product), `tensorrt` (static QDQ, symmetric); all use per-channel scales and `op_types: [MatMul, '
        'Gemm, Attention]`, so Softmax, LayerNorm, GELU and residual Adds stay fp32; `auto` reads this '
        "machine's CPU flags and says which it found. When `preprocess`'s symbolic shape inference fails, it "
        'runs without it and the notes say so. Every `onnx-quantize` / `onnx-optimize` variant records '
        "`kernels`: the node types of its graph after ORT's own optimisation, so a fusion is verified, not "
        "assumed. `workbench sensitivity` ranks the nodes of a variant's last `onnx-quantize` step without "
        'running the recipe.'
    )
    summary = "ONNX Runtime quantization: dynamic int8, static int8 (QDQ, calibrated), int4 weight-only"
    Params = OnnxQuantizeParams
    consumes = "onnx"
    libraries = ("onnx", "onnxruntime", "onnxruntime-gpu")

    @classmethod
    def precision(cls, params: dict) -> str:
        mode = params.get("mode", "dynamic")
        if mode in WEIGHT_ONLY:
            return "int4" if mode == "int4" or params.get("bits", 4) == 4 else "int8"
        return "int8"

    @classmethod
    def weight_only(cls, params: dict) -> bool:
        return params.get("mode", "dynamic") in WEIGHT_ONLY  # MatMulNBits: float activations

    @classmethod
    def activation_scales(cls, params: dict):
        mode = params.get("mode", "dynamic")
        return mode if mode in ("static", "dynamic") else None  # auto: decided by the graph at run time

    @classmethod
    def formats(cls, params: dict):
        return ("onnx",)

    @classmethod
    def remedy(cls, finding: str, params, cpu_flags: list[str]):
        if params is None:
            return None
        mode = params.get("mode", "dynamic")
        auto = {"onnx-quantize": {"preset": "auto"}}  # hardware settings from the CPU, mode from the graph
        if finding == "int8-reference-kernel" and mode != "static":
            # ORT's guidance for convolutional networks: static QDQ, fused into QLinearConv.
            return [{"onnx-quantize": {"preset": "auto", "mode": "static", "quant_format": "QDQ",
                                       "op_types": ["Conv", "MatMul", "Gemm"]}}]
        if finding == "qdq-unfolded" and mode in ("static", "auto") and params.get("quant_format") == "QDQ":
            # QLinearConv / QLinearMatMul written directly: nothing left for the engine to fold.
            keep = {k: params[k] for k in ("preset",) if params.get(k)}
            return [{"onnx-quantize": {**keep, "mode": "static", "quant_format": "QOperator",
                                       **({"op_types": ["Conv", "MatMul", "Gemm"]} if mode == "auto" else {})}}]
        if finding == "float-op-left-out" and params.get("preset") is None:
            return [auto]
        if finding == "int8-no-dot-product" and not params.get("reduce_range"):
            return [auto]  # 7-bit weights where u8 x s8 products saturate
        if finding in ("weights-in-cache", "weight-only-compute-bound") and mode in WEIGHT_ONLY:
            return [auto]  # int8 weights and activations: the matmuls get faster, not only the loads
        return None

    @classmethod
    def sensitivity_params(cls, params: dict, target):
        return {**params, "keep_fp32": {"top_k": None if target else 0, "target": target, "batches": 2}}

    @classmethod
    def check(cls, params, *, recipe, variant, where, field):
        if params.mode == "static" and recipe.task.type == "none":  # auto then stays dynamic, and says so
            raise field_error(where, f"{field}.mode", "static quantization calibrates on task data, and the "
                              "recipe has no task", value="static", accepted=["dynamic", "int4"])
        if params.mode == "int4" and params.bits != 4:
            raise field_error(where, f"{field}.bits", "mode int4 is 4-bit; for 8-bit weights use mode weight-only",
                              value=params.bits, accepted=[4])
        if params.mode in WEIGHT_ONLY and params.block_size & (params.block_size - 1):
            raise field_error(where, f"{field}.block_size", "must be a power of 2", value=params.block_size)
        if params.algorithm != "default" and (params.mode not in WEIGHT_ONLY or params.bits != 4):
            raise field_error(where, f"{field}.algorithm", "chooses how 4-bit weight-only blocks are made: it needs "
                              "mode weight-only (or int4) with bits 4", value=params.algorithm, accepted=["default"])
        if params.algorithm == "gptq" and recipe.task.type == "none":
            raise field_error(where, f"{field}.algorithm", "GPTQ calibrates on task data, and the recipe has no task",
                              value="gptq", accepted=["default", "rtn", "hqq"])

    @classmethod
    def expand(cls, params):
        """A preset's settings, in the fields the recipe left unset; `auto` resolved on this machine,
        so the cache key and the lineage hold the concrete settings."""
        if params.preset is None or (params.mode in WEIGHT_ONLY and "mode" in params.model_fields_set):
            return params
        from export.quant_presets import preset_settings, resolve

        wanted = preset_settings(resolve(params.preset)[0])
        if params.preset == "auto" and "mode" not in params.model_fields_set:
            # The processor decides the int8 settings; the graph decides static or dynamic (at run time,
            # from its operators: a deterministic function of the parent, whose key is in the cache key).
            wanted.update(mode="auto", op_types=None, quant_format="QDQ")
        return params.model_copy(update={k: v for k, v in wanted.items() if k not in params.model_fields_set})

    def run(self, model, params, ctx):
        p = OnnxQuantizeParams.model_validate(params)
        if p.preset and p.mode not in WEIGHT_ONLY:
            from export.quant_presets import resolve

            preset, why = resolve(p.preset)
            ctx.notes["preset"] = {"name": preset.name, "why": why, "symmetric": preset.symmetric,
                                   "int8_pays_here": preset.int8_pays}
        out = ctx.work_dir / "quantized.onnx"
        if p.mode in WEIGHT_ONLY:
            if p.keep_fp32:
                p = p.model_copy(update={"exclude_nodes": p.exclude_nodes + self._sensitive(model.onnx_path, p, ctx)})
            self._weight_only(model.onnx_path, out, p, ctx)
        else:
            src = self._preprocess(model.onnx_path, p, ctx) if p.preprocess else model.onnx_path
            if p.mode == "auto":
                p = self._by_graph(src, p, ctx)
            if p.keep_fp32:
                p = p.model_copy(update={"exclude_nodes": p.exclude_nodes + self._sensitive(src, p, ctx)})
            self._int8(src, out, p, ctx)
        final = ctx.work_dir / "model.onnx"
        shutil.move(out, final)
        model.onnx_path = final
        record_kernels(final, ctx.notes)
        return model

    @staticmethod
    def _by_graph(src, p, ctx):
        """Mode auto: static QDQ (Conv, MatMul, Gemm) when convolutions do most of the multiply-adds,
        calibrated on the training split; dynamic (MatMul, Gemm, Attention) otherwise. ONNX Runtime's own
        guidance: dynamic mode turns a Conv into ConvInteger, a reference kernel far slower than fp32,
        while static QDQ runs fused QLinearConv; transformers' MatMuls do best with per-batch scales."""
        from export.quant_presets import MATMUL_OPS, conv_share

        share = conv_share(src)
        conv = share >= 0.5
        calibrate = ctx.task is not None and bool(getattr(ctx.task, "train_batches", None))
        if conv and calibrate:
            chosen = {"mode": "static", "op_types": p.op_types or ["Conv", "MatMul", "Gemm"]}
            why = (f"convolutions do {share:.0%} of the multiply-adds: static QDQ int8 (fused QLinearConv), "
                   "calibrated on the training split; dynamic mode would run them as ConvInteger")
        else:
            chosen = {"mode": "dynamic", "op_types": p.op_types or list(MATMUL_OPS)}
            why = (f"convolutions do {share:.0%} of the multiply-adds: dynamic int8 on MatMul / Gemm / Attention"
                   if not conv else f"convolutions do {share:.0%} of the multiply-adds, but the task has no "
                   "training batches to calibrate static int8 on: dynamic int8 on MatMul / Gemm / Attention")
        ctx.notes["auto_mode"] = {**chosen, "conv_share": round(share, 4), "why": why}
        return p.model_copy(update=chosen)

    @staticmethod
    def _preprocess(src, p, ctx):
        """ORT's quant_pre_process, recorded as what it really did: symbolic shape inference fails on
        some graphs ("Incomplete symbolic shape inference"); then ONNX shape inference and the graph
        clean-up still run without it, and the lineage says so, with the reason."""
        from onnxruntime.quantization.shape_inference import quant_pre_process

        # Absolute before the directory changes below: a relative work dir (a relative --out) would
        # otherwise be resolved inside itself, and preprocessing skipped as "file not found".
        src, pre = Path(src).resolve(), (ctx.work_dir / "preprocessed.onnx").resolve()
        reasons = []
        for skip_symbolic in (False, True):
            try:
                # Symbolic shape inference drops temporary files into the current directory:
                # run it inside the step's folder, whose leftovers the cache clears.
                with working_directory(ctx.work_dir):
                    quant_pre_process(str(src), str(pre), skip_symbolic_shape=skip_symbolic)
                ctx.notes["preprocess"] = ("applied" if not reasons else
                                           f"applied without symbolic shape inference ({reasons[0]})")
                return pre
            except Exception as e:  # noqa: BLE001 - preprocessing helps but is optional
                reasons.append(f"{type(e).__name__}: {str(e)[:200]}")
        ctx.notes["preprocess"] = f"skipped: {'; then '.join(reasons)}"
        return src

    @classmethod
    def _sensitive(cls, src, p, ctx) -> list[str]:
        """Per-node sensitivity (export.sensitivity) on training batches, never the evaluation rows; the
        nodes to keep in float, by top_k or by the fidelity target."""
        from export.sensitivity import fewest_to_keep, rank_nodes

        if ctx.task is None or not ctx.task.train_batches:
            raise ValueError("keep_fp32 measures sensitivity on the task's training batches, and there are none")
        batches = ctx.task.train_batches[:p.keep_fp32.batches]

        def quantize(excluded, only, dest):
            q = p.model_copy(update={"exclude_nodes": p.exclude_nodes + excluded})
            if p.mode in WEIGHT_ONLY:
                cls._weight_only(src, dest, q, ctx, only=only)
            else:
                cls._int8(src, dest, q, ctx, only=only)

        # Weight-only quantization acts on MatMuls with a constant weight, nothing else.
        op_types = ["MatMul"] if p.mode in WEIGHT_ONLY else p.op_types
        ranking = rank_nodes(src, batches, op_types, quantize, ctx.work_dir)
        keep = ranking.top(p.keep_fp32.top_k) if p.keep_fp32.top_k is not None else []
        suggestion = fewest_to_keep(src, batches, ranking, p.keep_fp32.target, quantize, ctx.work_dir) \
            if p.keep_fp32.target else None
        if p.keep_fp32.top_k is None and suggestion:
            keep = suggestion["nodes"]
        from export.sensitivity import FIDELITY

        ctx.notes["sensitivity"] = {"measured_on": f"{len(batches)} training batches", "metric":
                                    f"{FIDELITY[ctx.task.type == 'language-modeling']} when this node alone is "
                                    "quantized",
                                    "ranking": ranking.rows, "suggestion": suggestion, "kept_fp32": keep}
        return keep

    @staticmethod
    def _int8(src, out, p, ctx, only=None):
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

        only, p = _aliases(only), p.model_copy(update={"exclude_nodes": _aliases(p.exclude_nodes)})

        if p.mode == "dynamic":
            quantize_dynamic(str(src), str(out), per_channel=p.per_channel, reduce_range=p.reduce_range,
                             weight_type=getattr(QuantType, p.weight_type), op_types_to_quantize=p.op_types,
                             nodes_to_quantize=only, nodes_to_exclude=p.exclude_nodes or None)
            return
        from runtime.sessions import onnx_session

        names = {i.name for i in onnx_session(src).get_inputs()}
        batches = _same_shape(ctx.task.train_batches[:p.calibration_batches])
        symmetric = bool(ctx.notes.get("preset", {}).get("symmetric"))
        with library_prints("onnxruntime.quantization"):
            quantize_static(str(src), str(out), _Calibration(batches, names),
                            quant_format=getattr(QuantFormat, p.quant_format),
                            per_channel=p.per_channel, reduce_range=p.reduce_range,
                            activation_type=getattr(QuantType, p.activation_type),
                            weight_type=getattr(QuantType, p.weight_type), op_types_to_quantize=p.op_types,
                            nodes_to_quantize=only, nodes_to_exclude=p.exclude_nodes or None,
                            calibrate_method=getattr(CalibrationMethod, p.calibrate_method),
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True}
                            if symmetric else None)
        ctx.notes["calibration"] = {"batches": len(batches), "method": p.calibrate_method}

    @staticmethod
    def _weight_only(src, out, p, ctx, only=None):
        import logging

        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        # It logs every node it skips at INFO, and Gemm nodes at ERROR; the count below says enough.
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.CRITICAL)

        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=p.bits, block_size=p.block_size,
                                         is_symmetric=p.symmetric, accuracy_level=p.accuracy_level,
                                         nodes_to_exclude=_aliases(p.exclude_nodes) or None, nodes_to_include=only,
                                         op_types_to_quantize=tuple(p.op_types) if p.op_types else None,
                                         algo_config=_algorithm(src, p, ctx))
        with library_prints("onnxruntime.quantization"):
            quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
        count = sum(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node)
        if count == 0:
            gemm = sum(n.op_type == "Gemm" for n in quantizer.model.model.graph.node)
            raise ValueError("no MatMul was turned into MatMulNBits: weight-only quantization acts on MatMul "
                             "nodes with constant weights" + (f", and this graph's {gemm} linear layers are Gemm "
                                                              "nodes (2-D inputs); use mode dynamic or static"
                                                              if gemm else ""))
        ctx.notes["matmul_nbits_nodes"] = count
        ctx.notes["bits"] = p.bits
        ctx.notes["algorithm"] = p.algorithm
