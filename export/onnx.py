"""ONNX export with torch.onnx: the dynamo exporter first, the TorchScript-based exporter as a
recorded fallback; batch and sequence axes dynamic; the result checked by onnx.checker. With
exporter `optimum`, Hugging Face models go through optimum's exporter first (export.optimum_onnx)."""
from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path
from typing import Optional

from core.errors import one_line
from core.formats import ExportFormat, module_kinds, needs_external_data
from core.model import ModelIO, dynamic_axes, example_inputs

def export_onnx(module, io_spec: ModelIO, path: Path, *, opset: int = 18, exporter: str = "dynamo") -> dict:
    """Write `path` (and `path.data` for large models); return what happened, for the results."""
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notices
    kwargs = example_inputs(io_spec)
    large = needs_external_data(module)
    record = {"exporter": None, "opset": opset, "fallback_reason": None}
    if exporter == "decoder":  # the fused graph is for causal LMs (export.causal_lm_onnx); this is not one
        record["fallback_reason"] = "exporter decoder builds causal LMs only; this model is exported with dynamo"
    tries = {"optimum": ["optimum", "dynamo", "torchscript"], "dynamo": ["dynamo", "torchscript"],
             "decoder": ["dynamo", "torchscript"]}.get(exporter, ["torchscript"])
    t0 = time.perf_counter()
    for which in tries:
        if which == "optimum":
            try:
                from export.optimum_onnx import export_with_optimum

                record["exporter"] = export_with_optimum(module, io_spec, path, opset=opset, external_data=large)
                break
            except Exception as e:  # noqa: BLE001 - recorded; the torch.onnx exporters come next
                record["fallback_reason"] = f"optimum exporter failed: {type(e).__name__}: {str(e)[:300]}"
                continue
        try:
            # The exporters print progress to stdout; the run log gets the pipeline's own lines.
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module, (), str(path), kwargs=kwargs, input_names=list(io_spec.inputs),
                    output_names=[io_spec.output], dynamic_axes=dynamic_axes(io_spec), opset_version=opset,
                    dynamo=(which == "dynamo"), external_data=large,
                    **({"optimize": True, "verbose": False} if which == "dynamo" else {}))
            record["exporter"] = f"torch.onnx ({which})"
            break
        except Exception as e:  # noqa: BLE001 - any exporter failure is recorded, then the next is tried
            reason = one_line(e, 400)
            if which == tries[-1]:
                raise RuntimeError(f"ONNX export failed ({which} exporter): {reason}") from e
            record["fallback_reason"] = "; ".join(filter(None, [record["fallback_reason"],
                                                                f"dynamo exporter failed: {reason}"]))
    record["seconds"] = round(time.perf_counter() - t0, 3)
    onnx.checker.check_model(str(path))  # path form: works for external data too
    onnx.shape_inference.infer_shapes_path(str(path))
    record["external_data"] = large
    return record


class OnnxFormat(ExportFormat):
    name, file_name = "onnx", "model.onnx"
    suffixes = (".onnx",)
    summary = "ONNX graph (torch.onnx dynamo exporter; TorchScript-based or optimum exporters as configured)"

    @classmethod
    def unsupported(cls, module) -> Optional[str]:
        kinds = module_kinds(module)
        if any(k.startswith("torch.ao.nn.quantized.dynamic") for k in kinds):
            return ("PyTorch dynamic-int8 layers (quantized::linear_dynamic) have no ONNX export; quantize the "
                    "ONNX graph instead (an ONNX quantization step on the unquantized parent)")
        if "bitsandbytes" in kinds:
            return ("bitsandbytes layers have no ONNX export; for an int8 / int4 ONNX graph quantize the ONNX "
                    "graph of the unquantized parent instead")
        if _bf16_convs(module):
            # The exporter writes the graph, but ONNX's Conv types exclude bfloat16: no runtime can load it.
            return ("ONNX's convolutions have no bfloat16 type, so a bf16 graph of this model is invalid "
                    "everywhere; export the fp32 parent and let the engine compute in bf16 (openvino-cpu "
                    "`inference_precision: bf16`, on a CPU with AVX-512 BF16 or AMX)")
        return None

    @classmethod
    def export(cls, module, io, path: Path, spec) -> dict:
        if io.kind == "causal-lm":  # one graph with a KV cache: prefill (empty past) and decode steps
            from export.causal_lm_onnx import export_causal_lm

            return export_causal_lm(module.model, Path(path), opset=spec.opset,
                                    exporter="decoder" if spec.exporter == "decoder" else "auto")
        return export_onnx(module, io, path, opset=spec.opset, exporter=spec.exporter)

    @classmethod
    def shareable(cls, module) -> bool:
        return not needs_external_data(module)  # a graph with external data files is not worth copying around

    @classmethod
    def load(cls, path: str):
        from runtime.sessions import onnx_session

        sess = onnx_session(path)
        names = {i.name for i in sess.get_inputs()}
        if any(n.startswith("past_key_values") for n in names):  # a causal LM's graph: prefill, empty past
            from runtime.decode import OrtLM

            lm = OrtLM(sess)
            return lambda b: lm.logits(b["input_ids"], b["attention_mask"])
        return lambda b: sess.run(None, {k: v for k, v in b.items() if k in names})[0]

    @classmethod
    def files(cls, path):
        from core.modelfile import onnx_files

        return onnx_files(path)  # with any external-data files, which keep their names


def _bf16_convs(module) -> bool:
    """Whether the module has a convolution whose weights are bfloat16."""
    import torch

    return any(isinstance(m, torch.nn.modules.conv._ConvNd) and m.weight.dtype == torch.bfloat16
               for m in module.modules())
