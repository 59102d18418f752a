"""Running an ORT GenAI model folder with onnxruntime-genai's own generator: greedy search (no sampling) of
exactly `new_tokens` tokens, the cell's threads set on the decoder's session through a config overlay.
A request's time to first token runs from making its generator (as a server does per request) through
`append_tokens` (the prefill) to the first token; each later `generate_next_token` is one decode step.
Per-token logits for accuracy come from a prefill's `logits` output, row by row."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np


def missing() -> Optional[str]:
    """Why onnxruntime-genai cannot run here, or None (found, not imported)."""
    from core.processes import module_missing

    return module_missing("onnxruntime_genai", "onnxruntime-genai is not installed "
                          "(pip install 'onnxruntime-genai>=0.13,<0.16')")


class GenaiLM:
    def __init__(self, path: str, threads: Optional[int] = None, options: Optional[dict] = None):
        import onnxruntime_genai as og

        self.og = og
        folder = str(Path(path).parent)
        config = og.Config(folder)
        config.clear_providers()  # the CPU
        session = {"intra_op_num_threads": int(threads)} if threads else {}
        session.update((options or {}).get("session_options") or {})
        if session:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        self.model = og.Model(config)
        from importlib.metadata import version

        self.info = {"ort_genai": {"version": version("onnxruntime-genai"), "session_options": session},
                     "kv_cache": "ORT GenAI's own (its generator's)"}

    def _generator(self, batch: int, length: int):
        params = self.og.GeneratorParams(self.model)
        # min_length = max_length: exactly that many tokens, whatever the model says of end-of-sequence.
        params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=batch)
        return self.og.Generator(self.model, params)

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, new_tokens: int,
                 step_logits: Optional[list] = None, on_token=None) -> tuple[np.ndarray, dict]:
        ids = np.ascontiguousarray(input_ids, dtype=np.int32)
        out = np.empty((len(ids), new_tokens), np.int64)
        times = []
        t0 = time.perf_counter()
        gen = self._generator(len(ids), ids.shape[1] + new_tokens)
        gen.append_tokens(ids)
        for step in range(new_tokens):
            if step:
                t0 = time.perf_counter()
            gen.generate_next_token()
            out[:, step] = np.asarray(gen.get_next_tokens()).reshape(len(ids))
            times.append((time.perf_counter() - t0) * 1e3)
            if on_token is not None:
                on_token(step)
            if step_logits is not None:
                step_logits.append(np.asarray(gen.get_logits(), np.float32).reshape(len(ids), -1))
        return out, {"prefill_ms": times[0], "decode_ms": times[1:]}

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(batch, tokens, vocabulary): each row's prefill over its unmasked tokens (padding stays zero)."""
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        out = None
        for row in range(len(ids)):
            where = np.flatnonzero(mask[row])
            if where.size == 0:
                continue
            gen = self._generator(1, int(where.size) + 1)
            gen.append_tokens(np.ascontiguousarray(ids[row, where][None], dtype=np.int32))
            logits = np.asarray(gen.get_output("logits"), np.float32)
            logits = logits.reshape(-1, logits.shape[-1])  # (tokens, vocabulary)
            if len(logits) != where.size:
                raise ValueError(f"the graph returned logits for {len(logits)} of {where.size} prompt positions "
                                 "(built with prune_lm_head?): per-token accuracy cannot be measured")
            if out is None:
                out = np.zeros((*ids.shape, logits.shape[-1]), np.float32)
            out[row, where] = logits
        return out if out is not None else np.zeros((*ids.shape, 1), np.float32)
