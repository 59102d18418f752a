"""GGUF, llama.cpp's model file, made the way llama.cpp users make it: the variant's Hugging Face folder
through llama.cpp's own converter (convert_hf_to_gguf.py, unpacked by scripts/setup_llama_cpp.sh from the
same llama-cpp-python release that runs the file) at f32, then llama.cpp's own quantizer
(`llama_model_quantize`) to the type asked: q8_0, q4_0, q4_k_m (4-bit blocks with the output projection
and some attention / FFN tensors kept at 6 bits), ... Both run in child processes: a converter that
rejects a model, or a quantizer that crashes, costs this artifact or variant, never the run.

The converter insists on a tokenizer it knows. A model whose tokenizer it rejects (a byte-level BPE it
has no pre-tokenizer hash for, such as the built-in one of docstring-gpt and of `weights: random`
models) is converted with a stand-in SentencePiece vocabulary padded to the model's size: token ids,
logits and timings are the model's own, but llama.cpp cannot turn text into the model's tokens with it.
The artifact's record says which vocabulary it carries."""
from __future__ import annotations

import json
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
from runtime.llama_cpp_runner import INSTALL
from runtime.llama_cpp_runner import missing as engine_missing

# llama.cpp's quantization types a recipe may ask for (llama_ftype names without LLAMA_FTYPE_MOSTLY_).
TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_k_s", "q4_0", "q3_k_m", "q2_k")
PRECISION = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "q8_0": "int8"}  # the rest: below 8 bits


def converter_dir() -> Path:
    return Path(os.environ.get("WORKBENCH_LLAMA_CPP_CONVERTER") or Path(sys.prefix) / "share" / "llama.cpp")


def missing() -> Optional[str]:
    """Why GGUF files cannot be made here, or None."""
    if engine_missing():
        return engine_missing()
    if not (converter_dir() / "convert_hf_to_gguf.py").exists():
        return f"llama.cpp's converter is not in {converter_dir()}: {INSTALL}"
    return None


def unsupported(module) -> Optional[str]:
    if hf_model(module) is None:
        return ("GGUF holds Hugging Face causal LMs: llama.cpp's converter reads a Hugging Face folder "
                f"(this is a {type(module).__name__})")
    if any(p.dtype.is_floating_point is False for p in module.parameters()):
        return "the module has quantized (integer) parameters: make the GGUF from a float variant (gguf-quantize)"
    return missing()


def make_gguf(module, path: Path, gguf_type: str = "f32", threads: Optional[int] = None) -> dict:
    """Write `path` (a GGUF of type `gguf_type`) from a CausalLM module; return what happened."""
    why = unsupported(module)
    if why:
        raise RuntimeError(why)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".gguf-") as tmp:
        folder, f32 = Path(tmp) / "hf", Path(tmp) / "model-f32.gguf"
        hf_model(module).save_pretrained(folder, safe_serialization=True)
        tokenizer = getattr(module, "tokenizer", None)
        rec = {"converter": "llama.cpp convert_hf_to_gguf.py (outtype f32)", "type": gguf_type}
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        failed = _convert(folder, f32) if tokenizer is not None else "the module carries no tokenizer"
        if failed:
            for f in folder.iterdir():  # the converter reads tokenizer files first: leave it only the stand-in
                if f.suffix != ".safetensors" and f.name not in ("config.json", "generation_config.json"):
                    f.unlink()
            _stand_in_vocabulary(folder)
            again = _convert(folder, f32)
            if again:
                raise RuntimeError(f"llama.cpp's converter failed: {again}")
            rec["vocabulary"] = (f"stand-in SentencePiece vocabulary padded to the model's size ({failed}): "
                                 "token ids, logits and timings are the model's; llama.cpp cannot tokenize text for it")
        else:
            rec["vocabulary"] = "the model's own tokenizer"
        t1 = time.perf_counter()
        rec["convert_s"] = round(t1 - t0, 3)
        out = Path(tmp) / "model.gguf"
        if gguf_type == "f32":
            f32.rename(out)
        else:
            _quantize(f32, out, gguf_type, threads)
            rec["quantizer"] = f"llama.cpp llama_model_quantize ({gguf_type})"
            rec["quantize_s"] = round(time.perf_counter() - t1, 3)
        os.replace(out, path)  # whole or not at all
    from importlib.metadata import version

    return {**rec, "llama_cpp_python": version("llama-cpp-python"), "seconds": round(time.perf_counter() - t0, 3),
            "bytes": path.stat().st_size}


def _convert(folder: Path, out: Path) -> Optional[str]:
    """Run llama.cpp's converter; None when it wrote `out`, else the end of what it said."""
    script = converter_dir() / "convert_hf_to_gguf.py"
    proc = subprocess.run([sys.executable, str(script), str(folder), "--outfile", str(out), "--outtype", "f32"],
                          capture_output=True, text=True, env=child_env(), timeout=3600)
    if proc.returncode == 0 and out.exists():
        return None
    return f"exit code {proc.returncode}: {last_words(proc.stderr or proc.stdout)}"


def _stand_in_vocabulary(folder: Path) -> None:
    """A small SentencePiece model (trained here, on the docstrings of Python's builtins) as
    `tokenizer.model`: the converter pads it with placeholder tokens to the config's vocab_size."""
    import builtins
    import io

    import sentencepiece as spm

    text = [doc for name in dir(builtins) if (doc := getattr(getattr(builtins, name), "__doc__", None))]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=256,
                                   hard_vocab_limit=False, model_type="bpe", minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())


def _quantize(src: Path, dst: Path, gguf_type: str, threads: Optional[int]) -> None:
    proc = subprocess.run([sys.executable, "-m", "export.gguf", "quantize", str(src), str(dst), gguf_type,
                           str(threads or 0)], capture_output=True, text=True, env=child_env(), timeout=3600)
    if proc.returncode != 0 or not dst.exists():
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        raise RuntimeError(f"llama.cpp's quantizer ({gguf_type}) failed with {how}: "
                           f"{last_words(proc.stderr)}")


def quantize_main(src: str, dst: str, gguf_type: str, threads: int) -> int:
    import ctypes

    import llama_cpp

    name = "LLAMA_FTYPE_ALL_F32" if gguf_type == "f32" else f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, name)
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        print(f"llama_model_quantize returned {rc}", file=sys.stderr)
    return int(rc != 0)


def tensor_types(path: Path) -> dict:
    """How many weights of each GGML type the file holds (what llama.cpp's quantizer really did: Q4_K_M
    keeps some tensors at Q6_K), and the parameter count, read with llama.cpp's own gguf-py."""
    sys.path.insert(0, str(converter_dir() / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    return {"params": sum(counts.values()), "weights_by_type": counts}


class GgufFormat(ExportFormat):
    name, file_name = "gguf", "model.gguf"
    suffixes = (".gguf",)
    model_kinds = ("causal-lm",)
    summary = ("llama.cpp's GGUF at f32, by llama.cpp's own converter (Hugging Face causal LMs); "
               "quantized GGUF variants come from the gguf-quantize step")

    @classmethod
    def unsupported(cls, module) -> Optional[str]:
        return unsupported(module)

    @classmethod
    def export(cls, module, io, path: Path, spec) -> dict:
        return make_gguf(module, path, "f32")

    @classmethod
    def load(cls, path: str):
        from runtime.llama_cpp_runner import LlamaCppLM

        lm = LlamaCppLM(path, threads=None, logits=True)
        return lambda b: lm.logits(b["input_ids"], b["attention_mask"])


class GgufQuantizeParams(StepParams):
    type: Literal[TYPES] = Field("q4_k_m", description="llama.cpp's quantization type (q4_k_m: 4-bit K-quants "
                                 "with some tensors at 6 bits, as llama.cpp recommends; q8_0, q4_0: plain blocks)")


@register
class GgufQuantize(Step):
    name = "gguf-quantize"
    summary = "llama.cpp's converter and quantizer: a GGUF of the causal LM (q8_0, q4_0, q4_k_m, ...)"
    details = (
        "The variant becomes a GGUF file, as llama.cpp users make one: the Hugging Face folder through "
        "`convert_hf_to_gguf.py` at f32, then `llama_model_quantize` to `type`. It runs on the `llama-cpp` "
        "backend only, and its accuracy is measured from llama.cpp's own logits. The variant records the "
        "weights per GGML type that llama.cpp wrote (q4_k_m keeps some tensors at q6_k). A tokenizer the "
        "converter rejects is replaced by a stand-in vocabulary (the record says so). Needs `make llama-cpp`."
    )
    Params = GgufQuantizeParams
    consumes, produces = "torch", "gguf"
    libraries = ("llama-cpp-python",)

    @classmethod
    def precision(cls, params: dict) -> Optional[str]:
        t = params.get("type", "q4_k_m")
        return PRECISION.get(t) or ("int4" if t.startswith(("q4", "q3", "q2")) else f"int{t[1]}")

    @classmethod
    def weight_only(cls, params: dict) -> bool:
        return params.get("type", "q4_k_m") not in ("f32", "f16", "bf16")

    @classmethod
    def formats(cls, params: dict):
        return ("gguf",)

    @classmethod
    def check(cls, params, *, recipe, variant, where, field):
        from core.errors import field_error

        if getattr(recipe, "model_kind", None) != "causal-lm":
            raise field_error(where, field, "GGUF holds causal LMs (llama.cpp generates text); this model is "
                              f"a{'n' if str(recipe.model_kind)[0] in 'aeiou' else ''} {recipe.model_kind}",
                              value="gguf-quantize", accepted="a recipe whose model is a causal LM")

    def run(self, model, params, ctx):
        from core.model import VariantModel

        path = ctx.work_dir / GgufFormat.file_name
        ctx.notes.update(make_gguf(model.module, path, params["type"]))
        ctx.notes.update(_types_in_child(path))
        return VariantModel(io=model.io, file_path=path, file_format="gguf", source_module=model.module)


def _types_in_child(path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "export.gguf", "types", str(path)], capture_output=True,
                          text=True, env=child_env(), timeout=600)
    if proc.returncode != 0:
        return {"weights_by_type": f"unread: {last_words(proc.stderr)}"}
    return json.loads(proc.stdout)


def main() -> int:
    from core.processes import die_with_parent

    die_with_parent()
    if sys.argv[1] == "quantize":
        return quantize_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    if sys.argv[1] == "types":
        print(json.dumps(tensor_types(Path(sys.argv[2]))))
        return 0
    raise SystemExit(f"unknown command {sys.argv[1]}")


if __name__ == "__main__":
    sys.exit(main())
