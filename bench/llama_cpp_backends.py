"""The `llama-cpp` backend: a GGUF (a gguf-quantize variant, or a torch variant's `gguf` export at f32) run
by llama.cpp through llama-cpp-python, as the CPU LLM users deploy it. It measures causal LMs by generation
only, one sequence at a time (batch 1: llama-cpp-python's Llama decodes one sequence), with the cell's
threads for both the prompt and the decode steps. `bench.options.llama-cpp` sets llama.cpp's own knobs
(weight repacking, batch sizes, flash attention, a quantized KV cache), recorded in the cell. llama.cpp
runs in the cell's own process, so a crash of the engine (a segfault) is that cell's failure with its
signal, and the run goes on."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from core.backends import Backend
from core.findings import Finding


class LlamaCppOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    use_extra_bufts: Optional[bool] = Field(
        None, description="repack weights into the CPU's preferred layout (llama.cpp's extra buffer types, e.g. "
        "AMX tiles); default: llama.cpp's own (on). Its AMX path has crashed on some CPUs: false turns it off")
    n_batch: Optional[int] = Field(None, ge=1, description="prompt tokens per llama_decode call (llama-cpp-python's "
                                   "default 512)")
    n_ubatch: Optional[int] = Field(None, ge=1, description="physical batch size inside a decode call (default 512)")
    flash_attn: Optional[bool] = Field(None, description="llama.cpp's fused flash attention (default off)")
    kv_cache_type: Optional[Literal["f16", "q8_0", "q4_0"]] = Field(
        None, description="KV cache precision (llama.cpp's type_k / type_v; default f16); q8_0 / q4_0 turn on "
        "flash attention, which llama.cpp needs to quantize the V cache")
    n_ctx: Optional[int] = Field(None, ge=16, description="context size to allocate (default: the prompt and new "
                                 "tokens, rounded up to a power of two, at least 512)")


class LlamaCpp(Backend):
    name, format, device = "llama-cpp", "gguf", "cpu"
    summary = "llama.cpp (llama-cpp-python) on the CPU: GGUF files, causal LMs by generation, batch 1"
    imports = ("llama_cpp",)
    libraries = ("llama-cpp-python",)
    generates = True
    max_batch = 1
    max_batch_why = "llama-cpp-python's Llama generates one sequence at a time: only batch 1 is measured"
    Options = LlamaCppOptions

    @classmethod
    def unavailable(cls) -> Optional[str]:
        from runtime.llama_cpp_runner import missing

        return missing()

    @classmethod
    def load(cls, path: str, threads: int, options: Optional[dict] = None):
        raise NotImplementedError("llama-cpp measures causal LMs by generation only")

    @classmethod
    def load_generator(cls, path: str, threads: int, options: Optional[dict] = None):
        from runtime.llama_cpp_runner import LlamaCppLM

        return LlamaCppLM(path, threads, options, logits=False)

    @classmethod
    def snippet(cls) -> Optional[str]:
        return '''from llama_cpp import Llama

llm = Llama(str(MODEL), n_ctx=2048, verbose=False)
print(llm("def fibonacci(n):", max_tokens=32)["choices"][0]["text"])
output = inputs["input_ids"]  # llama.cpp takes text or token ids: see llm.eval / llm.generate
'''

    @classmethod
    def findings(cls, cell: dict, variants: dict, cpu_flags: list[str]) -> list[str]:
        found = []
        info = ((cell.get("threads") or {}).get("llama_cpp") or {})
        if info.get("use_extra_bufts") is False and {"amx_int8", "avx512_vnni", "avx_vnni"} & set(cpu_flags):
            found.append(Finding("llama.cpp ran with weight repacking off (use_extra_bufts: false): its repacked "
                                 "int8 dot-product kernels for this CPU were not used"))
        return found
