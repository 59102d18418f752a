"""Greedy generation with a key/value cache, timed per token: OrtLM runs the one-graph ONNX export
of export.causal_lm_onnx (prefill with an empty past, then one token per step), torch_generate runs
the same greedy decoding through transformers' generate. For the same fp32 model both give the same
token ids; timings are {"prefill_ms": time to first token, "decode_ms": [one per later token]}.

Batches with padding must be left-padded (as for any decoder generation): position ids follow the
attention mask (cumulative sum - 1, as transformers' generate makes them), and each new token goes
at the right end of every row."""
from __future__ import annotations

import contextlib
import itertools
import logging
import time
import warnings

import numpy as np

from runtime.sessions import onnx_session

PAST, PRESENT = "past_key_values.", "present."
# Model metadata (onnx metadata_props) of a graph whose attention appends each step's keys and values inside
# the op (export.decoder_graph: GroupQueryAttention): its decode loop may bind one buffer of the generation's
# full length as both past and present, as ORT GenAI does (past_present_share_buffer).
KV_IN_PLACE = "model_workbench.kv_cache_in_place"


def position_ids(attention_mask: np.ndarray, new: int) -> np.ndarray:
    """Positions of the last `new` tokens: real tokens count from 0; pads get 1, as in generate."""
    pos = np.cumsum(attention_mask, -1) - 1
    pos[attention_mask == 0] = 1
    return pos[:, -new:].astype(np.int64)


class OrtLM:
    """An exported causal LM with its cache as inputs (past_key_values.{i}.key/value) and outputs
    (present.{i}.key/value). `config` (a transformers config's to_dict()) gives the cache's heads and
    head size where the graph's input shapes leave them symbolic."""

    def __init__(self, path_or_session, threads: int | None = None, providers=("CPUExecutionProvider",),
                 config: dict | None = None):
        self.session = (path_or_session if hasattr(path_or_session, "run_with_iobinding")
                        else onnx_session(path_or_session, threads, providers))
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.past_names = [n for n in inputs if n.startswith(PAST)]
        if not self.past_names:
            raise ValueError("the graph has no past_key_values.* inputs: export it with export.causal_lm_onnx")
        self.present_names = [PRESENT + n[len(PAST):] for n in self.past_names]
        self.needs_position_ids = "position_ids" in inputs
        # The fused decoder graph (export.decoder_graph) projects only the last `logits_to_keep` positions.
        self.keeps_logits = "logits_to_keep" in inputs
        self.past_dims = {n: _kv_dims(inputs[n].shape, config) for n in self.past_names}
        self.past_dtype = np.float16 if inputs[self.past_names[0]].type == "tensor(float16)" else np.float32
        # On CUDA the cache stays on the device between steps; only ids, mask and logits cross.
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        meta = self.session.get_modelmeta().custom_metadata_map or {}
        # Checked against the step-by-step loop on CPU only (tests/test_decoder_graph.py: the same logits).
        self.in_place = self.device == "cpu" and self.keeps_logits and meta.get(KV_IN_PLACE) == "1"

    def _feeds(self, ids: np.ndarray, mask: np.ndarray, keep: int | None = None) -> dict[str, np.ndarray]:
        """keep: logits for that many last positions (None: every position), where the graph can say."""
        feeds = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)}
        if self.keeps_logits:
            feeds["logits_to_keep"] = np.array(keep or ids.shape[1], np.int64)
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ascontiguousarray(mask, dtype=np.int64)  # int64, past + new long
        if self.needs_position_ids:
            feeds["position_ids"] = position_ids(mask, ids.shape[1])
        return feeds

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """A cache 0 tokens long: the prefill runs through the same graph as the decode steps."""
        return {n: np.zeros((batch, h, 0, d), self.past_dtype) for n, (h, d) in self.past_dims.items()}

    def prefill_feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """Every input of one prefill pass (ids, mask, positions, an empty cache): what calibration feeds."""
        return {**self._feeds(input_ids, attention_mask), **self._empty_past(len(input_ids))}

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(batch, tokens, vocabulary) logits of one prefill pass, for evaluation and parity."""
        return self.session.run(["logits"], self.prefill_feeds(input_ids, attention_mask))[0]

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, new_tokens: int,
                 step_logits: list | None = None, on_token=None) -> tuple[np.ndarray, dict]:
        """Greedy decoding of exactly `new_tokens` tokens: (ids (batch, new_tokens), timings). The cache stays
        in ORT's values between steps, in one buffer where the graph writes it in place (`_in_place_steps`),
        else passed from each step's presents to the next one's past (`_rebinding_steps`). If `step_logits`
        is a list, each step's last-position logits (batch, vocabulary) are appended to it; `on_token(step)` is
        called as each step's tokens are out (a server answers the first token there)."""
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask, dtype=np.int64)
        steps = self._in_place_steps if self.in_place else self._rebinding_steps
        step_fn = steps(len(ids), ids.shape[1] + new_tokens)
        out = np.empty((len(ids), new_tokens), np.int64)
        times = []
        for step in range(new_tokens):
            t0 = time.perf_counter()
            last = step_fn(ids, mask)  # greedy decoding reads the last position only
            out[:, step] = last.argmax(-1)
            times.append((time.perf_counter() - t0) * 1000)
            if on_token is not None:
                on_token(step)
            if step_logits is not None:
                step_logits.append(last.copy())
            ids = out[:, step:step + 1]
            mask = np.concatenate([mask, np.ones((len(mask), 1), np.int64)], 1)
        return out, {"prefill_ms": times[0] if times else 0.0, "decode_ms": times[1:]}

    def _rebinding_steps(self, batch: int, length: int):
        """One decode step as a function of (ids, mask) -> the last position's logits (`length` unused: the
        cache grows a step at a time): every input and output
        bound anew (a bound output keeps the previous step's shape), the present.* outputs ORT-allocated
        OrtValues bound as the next step's past, so the cache never passes through numpy."""
        io = self.session.io_binding()
        past = self._empty_past(batch)

        def step(ids, mask):
            nonlocal past
            io.clear_binding_inputs()
            io.clear_binding_outputs()
            for name, value in {**self._feeds(ids, mask, keep=1), **past}.items():
                if isinstance(value, np.ndarray):
                    io.bind_cpu_input(name, value)
                else:
                    io.bind_ortvalue_input(name, value)
            io.bind_output("logits", "cpu")  # only the logits come back to the host
            for name in self.present_names:
                io.bind_output(name, self.device)
            self.session.run_with_iobinding(io)
            io.synchronize_outputs()
            values = io.get_outputs()  # in binding order: logits, then the presents
            past = dict(zip(self.past_names, values[1:]))
            return values[0].numpy()[:, -1]
        return step

    def _in_place_steps(self, batch: int, length: int):
        """One decode step for a graph whose attention writes the cache in place (KV_IN_PLACE): one buffer per
        past input, `length` tokens long (the whole generation), is bound as both its past and its present,
        with the logits into one array, once; a step binds only ids, mask and positions. The rebinding step
        binds about a hundred values per step and has every layer copy its whole past into a new present: at
        Qwen2-0.5B shapes on 2 cores that was 6 % of a decode step. Same logits, bit for bit."""
        import onnxruntime as ort

        io = self.session.io_binding()
        for name in self.past_names:
            heads, size = self.past_dims[name]
            cache = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, heads, length, size), self.past_dtype))
            io.bind_ortvalue_input(name, cache)
            io.bind_ortvalue_output(PRESENT + name[len(PAST):], cache)
        vocab = next(o for o in self.session.get_outputs() if o.name == "logits").shape[-1]
        logits = np.zeros((batch, 1, vocab), np.float32)
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        io.bind_cpu_input("logits_to_keep", np.array(1, np.int64))

        def step(ids, mask):
            io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
            io.bind_cpu_input("attention_mask", mask)
            io.bind_cpu_input("position_ids", position_ids(mask, ids.shape[1]))
            self.session.run_with_iobinding(io)
            return logits[:, -1]
        return step


def _kv_dims(shape, config: dict | None) -> tuple[int, int]:
    """(heads, head size) of a past input shaped (batch, heads, past tokens, head size)."""
    heads, size = shape[1], shape[3]
    if isinstance(heads, int) and isinstance(size, int):
        return heads, size
    if not config:
        raise ValueError(f"the graph's past shape {shape} is symbolic and no config was given")
    from core.lm_summary import cache_shape

    return cache_shape(config)[1:]


class _Stamps:
    """A logits processor that only records when it is called: transformers calls it right after
    each forward pass (the k-th call follows the k-th forward), so the stamps time every token."""

    def __init__(self, cuda: bool, on_token=None):
        self.cuda, self.times, self.on_token = cuda, [], on_token

    def __call__(self, input_ids, scores):
        if self.cuda:
            import torch

            torch.cuda.synchronize()  # the forward's kernels are done, not just queued
        self.times.append(time.perf_counter())
        if self.on_token is not None:
            self.on_token(len(self.times) - 1)
        return scores


@contextlib.contextmanager
def _quiet_generate():
    log = logging.getLogger("transformers.generation")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def torch_generate(hf_model, input_ids, attention_mask, new_tokens: int, device="cpu",
                   step_logits: list | None = None, on_token=None) -> tuple[np.ndarray, dict]:
    """The same greedy decoding with transformers' generate on `hf_model` (already on `device`):
    (ids (batch, new_tokens), timings). If `step_logits` is a list, each step's logits (batch,
    vocabulary) are appended to it; `on_token(step)` is called as each step's logits are out."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    cfg = hf_model.config
    eos = cfg.eos_token_id
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos) or 0
    # A fresh config, not the model's (which may sample, or stop early). No eos: then nothing stops
    # or masks a token (min_new_tokens would set the eos logit to -inf, which plain argmax does not do).
    gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           use_cache=True, pad_token_id=pad)
    stamps = _Stamps(str(device).startswith("cuda"), on_token)
    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64), device=device)
    mask = torch.as_tensor(np.asarray(attention_mask, dtype=np.int64), device=device)
    with _quiet_generate(), torch.inference_mode():
        t0 = time.perf_counter()
        res = hf_model.generate(input_ids=ids, attention_mask=mask, generation_config=gen, use_model_defaults=False,
                                eos_token_id=None, logits_processor=LogitsProcessorList([stamps]),
                                output_logits=step_logits is not None, return_dict_in_generate=True)
    if step_logits is not None:
        step_logits.extend(t.float().cpu().numpy() for t in res.logits)
    t = stamps.times
    timings = {"prefill_ms": (t[0] - t0) * 1000 if t else 0.0,
               "decode_ms": [(b - a) * 1000 for a, b in itertools.pairwise(t)]}
    return res.sequences[:, ids.shape[1]:].cpu().numpy(), timings
