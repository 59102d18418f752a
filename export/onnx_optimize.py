"""ONNX Runtime graph optimisation as a step: the optimised graph saved at the basic / extended /
all level, and transformer fusion (Attention, SkipLayerNorm, BiasGelu...) for BERT-like encoders
with onnxruntime.transformers, recording which fusions happened."""
from __future__ import annotations

import shutil
from typing import Literal, Optional

from pydantic import Field

from core.encoders import attention_shape, transformer_config
from export.graph_kernels import record_kernels
from core.steps import Step, StepParams, register

LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class OnnxOptimizeParams(StepParams):
    level: Literal["none", "basic", "extended", "all"] = Field(
        "extended", description="ORT graph optimisation level saved into the file; 'all' adds layout "
        "transforms tied to this machine's CPU, so the file is not portable")
    fusion: Literal["none", "bert"] = Field(
        "none", description="bert: onnxruntime.transformers fusions for BERT-like encoders (MiniLM, BERT, RoBERTa)")
    float16: bool = Field(False, description="convert weights and activations to float16 after fusion, inputs "
                          "and outputs kept float32 (onnxruntime.transformers' converter; for GPU providers: "
                          "ORT's CPU provider has no float16 kernel for many operators); pair with level: none, "
                          "since the levels rewrite the graph for the CPU provider")
    num_heads: Optional[int] = Field(None, gt=0, description="attention heads; default: from the model's config")
    hidden_size: Optional[int] = Field(None, gt=0, description="hidden size; default: from the model's config")


@register
class OnnxOptimize(Step):
    name = "onnx-optimize"
    details = (
        'With `fusion: bert` the implicit export before it uses the TorchScript-based exporter, whose '
        "attention pattern ORT's fusion recognises; the fusions found are recorded."
    )
    summary = "ONNX Runtime graph optimisation (basic/extended/all) and BERT transformer fusion"
    Params = OnnxOptimizeParams
    consumes = "onnx"
    libraries = ("onnx", "onnxruntime", "onnxruntime-gpu")

    @classmethod
    def precision(cls, params: dict):
        return "fp16" if params.get("float16") else None

    @classmethod
    def formats(cls, params: dict):
        return ("onnx",)

    @classmethod
    def remedy(cls, finding: str, params, cpu_flags: list[str]):
        # ORT's BERT fusion: one Attention node (QAttention once quantized) and fused LayerNorms. It matches
        # encoders (BERT, RoBERTa, MiniLM...); a decoder's attention needs another fusion.
        if finding == "attention-float" and (params is None or params.get("fusion", "none") == "none"):
            return [{"onnx-optimize": {"fusion": "bert"}}]
        return None

    @classmethod
    def exporter_for(cls, params: dict) -> Optional[str]:
        # ORT's fusion patterns match the attention subgraph of the TorchScript-based exporter; on
        # the dynamo exporter's graph they fuse no Attention (seen with torch 2.13 / ORT 1.32).
        return "torchscript" if params.get("fusion") == "bert" else None

    def run(self, model, params, ctx):
        p = OnnxOptimizeParams.model_validate(params)
        src = model.onnx_path
        if p.fusion == "bert":
            from onnxruntime.transformers.optimizer import optimize_model

            cfg = transformer_config(model.source_module)
            found = attention_shape(model.source_module)
            if found is None and cfg is not None:
                found = (cfg.num_attention_heads, cfg.hidden_size)
            heads = p.num_heads if p.num_heads is not None else (found or (None, None))[0]
            hidden = p.hidden_size if p.hidden_size is not None else (found or (None, None))[1]
            if heads is None or hidden is None:
                raise ValueError("fusion 'bert' needs num_heads and hidden_size: the model has no Hugging Face "
                                 "config to read them from, so set them in the step")
            fused = optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0)
            ctx.notes["fusions"] = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
            ctx.notes["fusion_config"] = {"num_heads": heads, "hidden_size": hidden}
            src = ctx.work_dir / "fused.onnx"
            fused.save_model_to_file(str(src))
        if p.float16:
            import onnx
            from onnxruntime.transformers.onnx_model import OnnxModel

            half = OnnxModel(onnx.load(str(src)))
            half.convert_float_to_float16(keep_io_types=True)
            src = ctx.work_dir / "float16.onnx"
            half.save_model_to_file(str(src))
            ctx.notes["float16"] = "weights and activations float16; inputs and outputs float32"
        final = ctx.work_dir / "model.onnx"
        if p.level != "none":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[p.level])
            so.optimized_model_filepath = str(ctx.work_dir / "optimized.onnx")
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])  # writes the optimised graph
            src = ctx.work_dir / "optimized.onnx"
        ctx.notes["level"] = p.level
        if src.parent == ctx.work_dir:
            shutil.move(src, final)
        else:  # nothing was rewritten: copy, never move, a parent's cached graph
            shutil.copy2(src, final)
        model.onnx_path = final
        record_kernels(final, ctx.notes)
        return model
