"""ONNX Runtime graph optimisation as a step: the optimised graph saved at the basic / extended /
all level, transformer fusion (Attention, SkipLayerNorm, BiasGelu...) for BERT-like encoders with
onnxruntime.transformers, recording which fusions happened, and for Llama-layout decoders the
workbench's own fused graph (export.decoder_graph) in place of the traced one."""
from __future__ import annotations

import shutil
from pathlib import Path
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
    fusion: Literal["none", "bert", "decoder"] = Field(
        "none", description="bert: onnxruntime.transformers fusions for BERT-like encoders (MiniLM, BERT, RoBERTa); "
        "decoder: causal LMs of the Llama layout (Llama, Qwen2, Mistral...) are exported as the workbench's own "
        "fused graph (GroupQueryAttention taking Q|K|V from one MatMul, with rotary and the cache update inside, "
        "SkipSimplifiedLayerNormalization, one MatMul for gate|up, the output projection "
        "its own weight, for the last logits_to_keep positions), built from the weights instead of traced: a "
        "weight-only int4 step after it makes 4 MatMulNBits per layer and quantizes the output projection")
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
        "attention pattern ORT's fusion recognises; the fusions found are recorded. With `fusion: decoder` the "
        "implicit export builds the fused decoder graph (export `exporter: decoder`); a model of another layout "
        "fails the step with the reason (a per-head q/k norm, a non-SiLU MLP, sliding-window layers...)."
    )
    summary = ("ONNX Runtime graph optimisation (basic/extended/all), BERT transformer fusion, and the fused "
               "decoder graph for Llama-layout LMs")
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
        return {"bert": "torchscript", "decoder": "decoder"}.get(params.get("fusion"))

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
        if p.fusion == "decoder":
            self._check_decoder(src, model, ctx)
        if p.float16:
            import onnx
            from onnxruntime.transformers.onnx_model import OnnxModel

            half = OnnxModel(onnx.load(str(src)))
            half.convert_float_to_float16(keep_io_types=True)
            src = ctx.work_dir / "float16.onnx"
            half.save_model_to_file(str(src))
            ctx.notes["float16"] = "weights and activations float16; inputs and outputs float32"
        final = ctx.work_dir / "model.onnx"
        if p.level != "none" and Path(str(src) + ".data").exists():
            # ORT cannot save an optimised graph past 2 GB in one file; it applies the same level at load.
            ctx.notes["level_not_saved"] = "the graph's weights are in an external file; ORT applies the level at load"
        elif p.level != "none":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[p.level])
            so.optimized_model_filepath = str(ctx.work_dir / "optimized.onnx")
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])  # writes the optimised graph
            src = ctx.work_dir / "optimized.onnx"
        ctx.notes["level"] = p.level
        if src.parent == ctx.work_dir:  # an external weights file beside it keeps its name: still found
            shutil.move(src, final)
        elif Path(str(src) + ".data").exists():  # a parent's large graph: its weights file comes too
            _copy_with_data(src, final)
        else:  # nothing was rewritten: copy, never move, a parent's cached graph
            shutil.copy2(src, final)
        model.onnx_path = final
        record_kernels(final, ctx.notes)
        return model

    @staticmethod
    def _check_decoder(src: Path, model, ctx) -> None:
        """The implicit export built the fused decoder graph (exporter_for), or say why it could not."""
        import onnx

        from export.decoder_graph import fused_op_counts, unsupported

        hf = getattr(model.source_module, "model", None)
        why = unsupported(hf) if hf is not None else "not a causal LM"
        if why:
            raise ValueError(f"fusion decoder: {why}; use fusion none (the traced graph) for this model")
        graph = onnx.load(str(src), load_external_data=False)
        counts = fused_op_counts(graph)
        if not counts["GroupQueryAttention"]:
            raise ValueError("fusion decoder: the graph before this step is not the fused decoder graph (put "
                             "onnx-optimize first in the variant's steps, on an unexported model)")
        ctx.notes["fusions"] = counts
        ctx.notes["nodes"] = len(graph.graph.node)


def _copy_with_data(src: Path, final: Path) -> None:
    """A graph whose weights sit in `src.name + '.data'`: re-saved so the weights file is named for `final`."""
    import onnx

    onnx.save(onnx.load(str(src)), str(final), save_as_external_data=True, location=final.name + ".data")
