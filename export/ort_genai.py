"""ONNX Runtime GenAI's model, made the way its users make one: the variant's Hugging Face folder through
onnxruntime-genai's own model builder (`python -m onnxruntime_genai.models.builder -p int4 -e cpu`), which
writes a decode graph of its own (GroupQueryAttention with rotary embeddings, SkipSimplifiedLayerNorm,
MatMulNBits at int4 / int8) with `genai_config.json` and the tokenizer into one folder. The builder runs in
a child process: a model it cannot build costs this variant, never the run. The `ort-genai` backend
generates with that folder through onnxruntime-genai's own generator."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from core.formats import ExportFormat
from core.processes import child_env, last_words
from core.lm import hf_model
from core.steps import Step, StepParams, register
from runtime.ort_genai_runner import missing

FOLDER, CONFIG = "genai", "genai_config.json"


def build(module, out: Path, precision: str, extra: dict) -> dict:
    """Write the builder's folder at `out` (whole or not at all) from a CausalLM module."""
    hf = hf_model(module)
    if hf is None:
        raise RuntimeError("ORT GenAI's builder reads a Hugging Face causal LM folder; this is a "
                           f"{type(module).__name__}")
    why = missing()
    if why:
        raise RuntimeError(why)
    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".genai-") as tmp:
        src, dst = Path(tmp) / "hf", Path(tmp) / "out"
        hf.save_pretrained(src, safe_serialization=True)
        if getattr(module, "tokenizer", None) is not None:
            module.tokenizer.save_pretrained(src)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(dst),
               "-p", precision, "-e", "cpu", "-c", str(Path(tmp) / "cache")]
        if extra:
            cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                              env={**child_env(), "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0 or not (dst / CONFIG).exists():
            raise RuntimeError(f"ORT GenAI's model builder failed (exit code {proc.returncode}): "
                               f"{last_words(proc.stderr or proc.stdout)}")
        os.replace(dst, out)
    from importlib.metadata import version

    return {"builder": f"onnxruntime_genai.models.builder -p {precision} -e cpu", "extra_options": extra,
            "onnxruntime_genai": version("onnxruntime-genai"), "seconds": round(time.perf_counter() - t0, 3)}


class OrtGenaiBuildParams(StepParams):
    precision: Literal["int4", "int8", "fp32"] = Field(
        "int4", description="the builder's precision for the CPU (int4 / int8: MatMulNBits weights)")
    extra_options: dict[str, str] = Field(default_factory=dict, description=(
        "the builder's own --extra_options (e.g. {accuracy_level: '4', block_size: '32'}); none: its defaults, "
        "what a user of ORT GenAI gets"))


@register
class OrtGenaiBuild(Step):
    name = "ort-genai-build"
    summary = "ONNX Runtime GenAI's model builder: its own int4 / int8 / fp32 decode graph and genai_config.json"
    details = (
        "The variant becomes the folder ORT GenAI's model builder writes from the Hugging Face model (a graph "
        "with fused attention and its own KV-cache layout, `genai_config.json`, the tokenizer). It runs on the "
        "`ort-genai` backend only; its accuracy comes from the builder graph's own logits. Needs "
        "onnxruntime-genai (installed with the CPU extra)."
    )
    Params = OrtGenaiBuildParams
    consumes, produces = "torch", "ort-genai"
    libraries = ("onnxruntime-genai", "onnxruntime")

    @classmethod
    def precision(cls, params: dict) -> Optional[str]:
        p = params.get("precision", "int4")
        return None if p == "fp32" else p

    @classmethod
    def weight_only(cls, params: dict) -> bool:
        return params.get("precision", "int4") != "fp32"

    @classmethod
    def formats(cls, params: dict):
        return ("ort-genai",)

    @classmethod
    def check(cls, params, *, recipe, variant, where, field):
        from core.errors import field_error

        if recipe.model_kind != "causal-lm":
            raise field_error(where, field, f"ORT GenAI builds causal LMs; this model is a {recipe.model_kind}",
                              value="ort-genai-build", accepted="a recipe whose model is a causal LM")

    def run(self, model, params, ctx):
        from core.model import VariantModel

        folder = ctx.work_dir / FOLDER
        ctx.notes.update(build(model.module, folder, params["precision"], params["extra_options"]))
        return VariantModel(io=model.io, file_path=folder / CONFIG, file_format="ort-genai",
                            source_module=model.module)


class OrtGenaiFormat(ExportFormat):
    name, file_name = "ort-genai", f"{FOLDER}/{CONFIG}"
    model_kinds = ("causal-lm",)
    summary = "ONNX Runtime GenAI's model folder (genai_config.json and its graph), made by the ort-genai-build step"

    @classmethod
    def unsupported(cls, module) -> Optional[str]:
        return "an ORT GenAI model folder is made by the ort-genai-build step (a variant of its own)"

    @classmethod
    def load(cls, path: str):
        from runtime.ort_genai_runner import GenaiLM

        lm = GenaiLM(path, threads=None)
        return lambda b: lm.logits(b["input_ids"], b["attention_mask"])

    @classmethod
    def files(cls, path: Path) -> list[Path]:
        return sorted(f for f in Path(path).parent.rglob("*") if f.is_file())
