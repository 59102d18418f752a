"""Running a GGUF on llama.cpp (llama-cpp-python's bindings): greedy generation one sequence at a time, timed
as the other generators are (the prompt's evaluation with the first token is TTFT, each later token one
decode step), and per-token logits for accuracy. The engine's own KV cache is kept between steps; the
next token is the argmax of llama.cpp's logits for the last position, read straight from its buffer.
Options are llama.cpp's: `use_extra_bufts` (weight repacking into the CPU's preferred layout, e.g. AMX
tiles), `n_batch` / `n_ubatch` (prompt tokens per decode call), `flash_attn`, and an 8-bit or 4-bit
KV cache (`kv_cache_type`, llama.cpp's `type_k` / `type_v`)."""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import numpy as np

GGML_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # ggml_type values for the KV cache
INSTALL = "run `make llama-cpp` (it compiles llama-cpp-python from source: 8-12 minutes on 2 cores, once)"


def missing() -> Optional[str]:
    """Why llama.cpp cannot run here, or None (found, not imported: the parent never loads llama.cpp)."""
    from core.processes import module_missing

    return module_missing("llama_cpp", f"llama-cpp-python is not installed: {INSTALL}")


@contextlib.contextmanager
def _model_params(use_extra_bufts: Optional[bool]):
    """llama-cpp-python's Llama does not expose llama_model_params.use_extra_bufts: while the model loads,
    its default-params function returns the value asked for."""
    import llama_cpp.llama_cpp as lib

    if use_extra_bufts is None:
        yield
        return
    original = lib.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = bool(use_extra_bufts)
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = original


class LlamaCppLM:
    def __init__(self, path: str, threads: Optional[int] = None, options: Optional[dict] = None, logits: bool = False):
        self.path, self.threads, self.options, self.all_logits = str(path), threads, dict(options or {}), logits
        self.llm = None
        self._load(int(self.options.get("n_ctx") or 512))

    def _load(self, n_ctx: int) -> None:
        from llama_cpp import Llama

        o = self.options
        kv = o.get("kv_cache_type")
        kw = {k: o[k] for k in ("n_batch", "n_ubatch", "flash_attn") if o.get(k) is not None}
        if kv:
            kw.update(type_k=GGML_TYPES[kv], type_v=GGML_TYPES[kv])
            kw.setdefault("flash_attn", True)  # llama.cpp quantizes the V cache only with flash attention
        self.llm = None  # the old context's memory goes before the new one is made
        try:
            with _model_params(o.get("use_extra_bufts")):
                self.llm = Llama(self.path, n_ctx=n_ctx, n_threads=self.threads, n_threads_batch=self.threads,
                                 logits_all=self.all_logits, verbose=False, seed=0, **kw)
        except ValueError as e:
            if not kv:
                raise
            # llama.cpp says only "Failed to create llama_context"; the usual cause of a quantized cache:
            raise ValueError(f"{e} with kv_cache_type {kv}: llama.cpp quantizes the KV cache in blocks of 32 "
                             "values of a head, so the model's head size must be a multiple of 32 (and flash "
                             "attention must run on this build)") from e
        self.n_ctx, self.vocab = n_ctx, self.llm.n_vocab()
        self.info = {"llama_cpp": {"n_ctx": n_ctx, "n_threads": self.llm.n_threads, "n_batch": self.llm.n_batch,
                                   **{k: o[k] for k in ("use_extra_bufts", "n_ubatch", "flash_attn", "kv_cache_type")
                                      if o.get(k) is not None}},
                     "kv_cache": f"llama.cpp's own ({kv or 'f16'})"}

    def _fit(self, tokens: int) -> None:
        """A context of at least `tokens` (llama.cpp sizes its KV cache when the context is made)."""
        if tokens > self.n_ctx:
            self._load(1 << (tokens - 1).bit_length())

    def _last_logits(self) -> np.ndarray:
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.vocab,))

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, new_tokens: int,
                 step_logits: Optional[list] = None, on_token=None) -> tuple[np.ndarray, dict]:
        ids = np.asarray(input_ids)
        if len(ids) != 1:
            raise ValueError("llama-cpp-python generates one sequence at a time (batch 1)")
        self._fit(ids.shape[1] + new_tokens)
        out = np.empty((1, new_tokens), np.int64)
        times = []
        self.llm.reset()
        feed = [int(t) for t in ids[0]]
        for step in range(new_tokens):
            t0 = time.perf_counter()
            self.llm.eval(feed)
            last = self._last_logits()
            nxt = int(last.argmax())
            times.append((time.perf_counter() - t0) * 1e3)
            if on_token is not None:
                on_token(step)
            if step_logits is not None:
                step_logits.append(np.array(last[None], dtype=np.float32))
            out[0, step] = nxt
            feed = [nxt]
        return out, {"prefill_ms": times[0], "decode_ms": times[1:]}

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(batch, tokens, vocabulary) logits, each row evaluated alone over its unmasked tokens (padding
        positions are left at zero: the summaries read only unmasked ones)."""
        if not self.all_logits:  # a generator keeps the last position's logits only: score with a second context
            if getattr(self, "_scorer", None) is None:
                self._scorer = LlamaCppLM(self.path, self.threads, self.options, logits=True)
            return self._scorer.logits(input_ids, attention_mask)
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        self._fit(ids.shape[1])
        out = np.zeros((*ids.shape, self.vocab), np.float32)
        for row in range(len(ids)):
            where = np.flatnonzero(mask[row])
            if where.size == 0:
                continue
            self.llm.reset()
            self.llm.eval([int(t) for t in ids[row, where]])
            out[row, where] = self.llm.scores[:where.size]
        return out
