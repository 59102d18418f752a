"""NNCF (OpenVINO's compression library) as steps on the variant's ONNX graph, so the result runs on
OpenVINO (the IR converted from it keeps NNCF's quantizers, placed for OpenVINO's int8 kernels) and on
ONNX Runtime alike:

- `nncf-quantize`: post-training int8 of weights and activations (`nncf.quantize`), calibrated on the
  task's training split; with `max_drop`, NNCF's accuracy-controlled form
  (`nncf.quantize_with_accuracy_control`), which reverts the layers that cost most of the task's own
  metric to float until the drop fits, measured on rows held out of the training split (never the
  evaluation rows). The notes list the layers it reverted.
- `nncf-compress-weights`: weight-only int8 / int4 (`nncf.compress_weights`), for decoder LMs; int4
  becomes MatMulNBits nodes, data-aware AWQ and scale estimation calibrate on training text."""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import Field

from core.errors import field_error
from core.formats import EXTERNAL_DATA_BYTES
from core.modelfile import onnx_files
from core.processes import working_directory
from core.steps import Step, StepParams, register
from export.graph_kernels import record_kernels
from runtime.infer import graph_feeds


class IgnoredScope(StepParams):
    names: list[str] = Field(default_factory=list, description="node names to leave in float")
    patterns: list[str] = Field(default_factory=list, description="regular expressions over node names")
    types: list[str] = Field(default_factory=list, description="op types to leave in float (e.g. Softmax)")


class NncfQuantizeParams(StepParams):
    model_type: Literal["auto", "transformer", "none"] = Field(
        "auto", description="transformer: NNCF's scheme for transformers (SmoothQuant, no quantizers on "
        "layer norms and attention softmax); auto: transformer when the graph has a Softmax")
    preset: Optional[Literal["performance", "mixed"]] = Field(
        None, description="performance: symmetric activations and weights; mixed: asymmetric activations; "
        "default: NNCF's (mixed for transformers)")
    subset_size: int = Field(300, gt=0, description="training rows to calibrate on")
    fast_bias_correction: bool = Field(True, description="NNCF's fast bias correction (false: the full, slower one)")
    ignored_scope: Optional[IgnoredScope] = Field(None, description="nodes NNCF must not quantize")
    smooth_quant_alpha: Optional[float] = Field(
        None, ge=-1, le=1, description="SmoothQuant's alpha for MatMuls (transformers; -1 turns it off); default: NNCF's")
    max_drop: Optional[float] = Field(
        None, gt=0, description="accuracy control: the largest drop of the task's primary metric (absolute, in its "
        "units; for perplexity an increase) NNCF may leave; it reverts the most harmful layers to float until it fits")
    validation_rows: int = Field(64, gt=0, description="accuracy control: rows held out of the training split "
                                 "(not calibrated on) to measure the drop on")
    max_reverted: Optional[int] = Field(None, ge=0, description="accuracy control: at most this many layers "
                                        "reverted to float; default: NNCF's")


@register
class NncfQuantize(Step):
    name = "nncf-quantize"
    summary = "NNCF post-training int8 (weights and activations) of the ONNX graph, optionally accuracy-controlled"
    details = ("Calibrates on the task's training split. With `max_drop` it runs NNCF's accuracy control on "
               "`validation_rows` training rows it does not calibrate on, and the notes list the layers it "
               "reverted to float. The result is an ONNX graph with Quantize/DequantizeLinear pairs, which the "
               "`openvino` format converts for OpenVINO's int8 kernels and ONNX Runtime runs as QDQ.")
    Params = NncfQuantizeParams
    consumes = "onnx"
    libraries = ("nncf", "onnx", "onnxruntime")

    @classmethod
    def precision(cls, params: dict):
        return "int8"

    @classmethod
    def activation_scales(cls, params: dict):
        return "static"

    @classmethod
    def check(cls, params, *, recipe, variant: str, where: str, field: str) -> None:
        if recipe.task.type == "none":
            raise field_error(where, field, "NNCF calibrates on the task's training split, and this recipe's task "
                              "is 'none'", value=recipe.task.type, accepted=["a task with data"])

    def run(self, model, params, ctx):
        import nncf
        import onnx

        p = NncfQuantizeParams.model_validate(params)
        rows = _rows(ctx.task.train_batches if ctx.task is not None else [])
        if not rows:
            raise ValueError("nncf-quantize calibrates on the task's training split, and it has no rows")
        validation = rows[-p.validation_rows:] if p.max_drop is not None else []
        calibration = rows[:len(rows) - len(validation)][:p.subset_size]
        if p.max_drop is not None and len(calibration) < 8:
            raise ValueError(f"accuracy control holds out {len(validation)} of the {len(rows)} training rows to "
                             "validate on, leaving fewer than 8 to calibrate on: lower validation_rows")
        graph = onnx.load(str(model.onnx_path))
        kw = dict(subset_size=len(calibration), fast_bias_correction=p.fast_bias_correction,
                  model_type=self._model_type(p, graph), ignored_scope=_ignored(p.ignored_scope))
        if p.preset:
            kw["preset"] = getattr(nncf.QuantizationPreset, p.preset.upper())
        ctx.notes["calibration"] = {"rows": len(calibration), "from": "the training split"}
        ctx.notes["model_type"] = "transformer" if kw["model_type"] is not None else "none"
        with _nncf_log() as log, working_directory(ctx.work_dir):  # NNCF's debug graphs land in the step's folder
            if p.max_drop is None:
                quantized = nncf.quantize(graph, nncf.Dataset(calibration), advanced_parameters=_advanced(p), **kw)
            else:
                metric = _metric(ctx.task, model.onnx_path, validation)
                quantized = nncf.quantize_with_accuracy_control(
                    graph, nncf.Dataset(calibration), nncf.Dataset(validation), metric,
                    max_drop=p.max_drop, drop_type=nncf.DropType.ABSOLUTE,
                    advanced_quantization_parameters=_advanced(p),
                    advanced_accuracy_restorer_parameters=_restorer(p), **kw)
        if p.max_drop is not None:
            ctx.notes["accuracy_control"] = {"max_drop": p.max_drop, "metric": ctx.task.primary,
                                             "validated_on": f"{len(validation)} training rows held out of calibration",
                                             **_reverted(log)}
        out = ctx.work_dir / "model.onnx"
        onnx.save(quantized, str(out))
        model.onnx_path = out
        record_kernels(out, ctx.notes)
        return model

    @staticmethod
    def _model_type(p, graph):
        import nncf

        if p.model_type == "auto":
            return nncf.ModelType.TRANSFORMER if any(n.op_type == "Softmax" for n in graph.graph.node) else None
        return nncf.ModelType.TRANSFORMER if p.model_type == "transformer" else None


class NncfCompressWeightsParams(StepParams):
    mode: Literal["int8_sym", "int8_asym", "int4_sym", "int4_asym"] = Field(
        "int4_sym", description="weight precision and scheme (int4 weights become MatMulNBits nodes)")
    group_size: int = Field(128, description="int4: weights per quantization group (-1: one per output channel)")
    ratio: float = Field(1.0, gt=0, le=1, description="int4: the share of layers in int4, the rest int8 (the most "
                         "sensitive by NNCF's metric stay int8)")
    all_layers: bool = Field(False, description="int4 also for the embeddings and the output projection")
    awq: bool = Field(False, description="data-aware AWQ (activation-aware scaling) on training text")
    scale_estimation: bool = Field(False, description="data-aware scale estimation on training text")
    subset_size: int = Field(64, gt=0, description="data-aware methods: training rows to calibrate on")


@register
class NncfCompressWeights(Step):
    name = "nncf-compress-weights"
    summary = "NNCF weight-only int8 / int4 of the ONNX graph (decoder LMs), with data-aware AWQ / scale estimation"
    details = ("Acts on MatMuls with constant weights; int4 makes MatMulNBits nodes (ONNX Runtime and OpenVINO run "
               "them), int8 dequantizes weights in the graph. `awq` and `scale_estimation` calibrate on the "
               "task's training text.")
    Params = NncfCompressWeightsParams
    consumes = "onnx"
    libraries = ("nncf", "onnx", "onnxruntime")

    @classmethod
    def precision(cls, params: dict):
        return "int4" if str(params.get("mode", "int4_sym")).startswith("int4") else "int8"

    @classmethod
    def weight_only(cls, params: dict) -> bool:
        return True

    def run(self, model, params, ctx):
        import nncf
        import onnx

        p = NncfCompressWeightsParams.model_validate(params)
        data_aware = p.awq or p.scale_estimation
        src = Path(model.onnx_path)
        # A graph over protobuf's 2 GB keeps its weights in external data. Loaded whole, NNCF's shape
        # inference cannot serialize it; NNCF reads the weights itself from their folder instead, for its
        # data-free modes (the data-aware ones run the graph in ORT from one protobuf, so they need < 2 GB).
        external = _external_data_bytes(src)
        external = external if external > EXTERNAL_DATA_BYTES else 0  # a smaller graph is loaded whole
        if external and data_aware:
            raise ValueError(f"awq / scale_estimation run the graph from one protobuf, and this graph keeps "
                             f"{external / 1e9:.1f} GB of weights in external data (over protobuf's 2 GB): use "
                             "the data-free form (awq: false, scale_estimation: false)")
        kw = dict(mode=getattr(nncf.CompressWeightsMode, p.mode.upper()))
        if p.mode.startswith("int4"):
            kw.update(group_size=p.group_size, ratio=p.ratio, all_layers=p.all_layers)
        if data_aware:
            rows = _rows(ctx.task.train_batches if ctx.task is not None else [])
            if not rows:
                raise ValueError("awq / scale_estimation calibrate on the task's training split, and it has no rows")
            kw.update(dataset=nncf.Dataset(graph_feeds(model.onnx_path, rows[:p.subset_size])), awq=p.awq,
                      scale_estimation=p.scale_estimation, subset_size=min(p.subset_size, len(rows)))
        if external:
            kw["advanced_parameters"] = nncf.AdvancedCompressionParameters(
                backend_params={"external_data_dir": str(src.parent.resolve())})
        with _nncf_log(), working_directory(ctx.work_dir):
            compressed = nncf.compress_weights(onnx.load(str(src), load_external_data=not external), **kw)
        out = ctx.work_dir / "model.onnx"
        if external:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(compressed, str(src.parent))  # what NNCF left as it was
        large = _tensor_bytes(compressed) > EXTERNAL_DATA_BYTES
        onnx.save(compressed, str(out), save_as_external_data=large, location=out.name + ".data" if large else None)
        nodes = [n.op_type for n in compressed.graph.node]
        ctx.notes["weight_compression"] = {"mode": p.mode, "matmul_nbits_nodes": nodes.count("MatMulNBits"),
                                           "dequantize_nodes": nodes.count("DequantizeLinear"),
                                           "data_aware": [m for m in ("awq", "scale_estimation") if getattr(p, m)]}
        model.onnx_path = out
        record_kernels(out, ctx.notes)
        return model


def _external_data_bytes(path: Path) -> int:
    """Bytes of the graph at `path` kept in external data files (0 when all of it is in the protobuf)."""
    return sum(f.stat().st_size for f in onnx_files(path)[1:] if f.exists())


def _tensor_bytes(model) -> int:
    from onnx.external_data_helper import _get_all_tensors

    return sum(len(t.raw_data) for t in _get_all_tensors(model))


# ----------------------------------------------------------------------------- data and metric
def _rows(batches: list[dict]) -> list[dict]:
    """The batches cut into single rows: NNCF's subset sizes count items, and a row is one sample."""
    return [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(len(next(iter(b.values()))))]


def _metric(task, float_path, validation: list[dict]):
    """NNCF's validation function: the task's primary metric of a graph on the validation rows, against
    the float graph's outputs there (and the training labels for a classifier); higher is better, so
    a lower-is-better metric (perplexity) is negated. Sessions are reused while NNCF passes one graph."""
    from runtime.infer import onnx_outputs

    labels = None
    if task.type == "classification" and task.train_labels is not None:
        labels = np.asarray(task.train_labels)[-len(validation):]  # the held-out rows are the split's last
    judge = replace(task, reference=onnx_outputs(float_path, validation), labels=labels)
    sign = -1.0 if judge.summary()["lower_is_better"] else 1.0
    cache: dict = {}

    def validate(graph, items):
        key = id(graph)
        if key not in cache:
            import onnxruntime as ort

            cache.clear()
            so = ort.SessionOptions()
            so.log_severity_level = 3
            cache[key] = ort.InferenceSession(graph.SerializeToString(), so, providers=["CPUExecutionProvider"])
        items = list(items)
        if len(items) == len(validation):
            return sign * judge.metrics(onnx_outputs(cache[key], items))[task.primary], None
        # NNCF ranks layers on single rows: the metric of one row against that row's reference.
        one = replace(judge, reference=judge.reference[_index(validation, items[0])][None], labels=None
                      if labels is None else labels[_index(validation, items[0])][None])
        return sign * one.metrics(onnx_outputs(cache[key], items))[task.primary], None

    return validate


def _index(rows: list[dict], item: dict) -> int:
    return next(i for i, r in enumerate(rows) if all(r[k] is item[k] or np.array_equal(r[k], item[k]) for k in r))


def _ignored(scope: Optional[IgnoredScope]):
    import nncf

    if scope is None:
        return None
    return nncf.IgnoredScope(names=scope.names, patterns=scope.patterns, types=scope.types, validate=False)


def _advanced(p: NncfQuantizeParams):
    if p.smooth_quant_alpha is None:
        return None
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    return AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=p.smooth_quant_alpha))


def _restorer(p: NncfQuantizeParams):
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    a = AdvancedAccuracyRestorerParameters()
    if p.max_reverted is not None:
        a.max_num_iterations = p.max_reverted
    return a


@contextlib.contextmanager
def _nncf_log():
    """NNCF's log lines, collected (the accuracy control's list of reverted layers is only there) and
    kept off the console, where its progress bars would break the workbench's own."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("nncf")
    handler, level, propagate = Keep(), logger.level, logger.propagate
    saved = logger.handlers[:]
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.DEBUG)  # the quantizers accuracy control removes are logged at DEBUG
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield lines
    finally:
        logger.handlers, logger.propagate = saved, propagate
        logger.setLevel(level)


def _reverted(lines: list[str]) -> dict:
    """What NNCF's accuracy control changed, from its log (nowhere else says it): the groups of quantizers
    it removed one by one, the operations that went back to float, and its drop after each step."""
    out: dict = {"groups_removed": 0, "quantizers_removed": [], "reverted": [], "log": []}
    for line in lines:
        head, *rest = line.strip().splitlines() or [""]
        if head.startswith("Removed a block of"):
            out["quantizers_removed"] += [r.strip() for r in rest if r.strip()]
        elif head.startswith("Reverted ") and "operations" in head:
            out["groups_removed"] += 1
        elif "were reverted back to the floating-point precision" in head:
            out["summary"] = head.rstrip(":")
            out["reverted"] = [r.strip() for r in rest if r.strip()]
        elif "drop" in head.lower() or head.startswith("Metric of"):
            out["log"].append(head)
    return out
