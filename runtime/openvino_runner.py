"""Running a model on OpenVINO: compiled with the cell's threads and the recipe's options, a Runner for
one static shape (the cell's), and a greedy generator for causal LMs whose KV cache lives inside the
compiled model as state (the past_key_values inputs / present outputs of the exported graph are made
stateful), as OpenVINO serves LLMs. What OpenVINO really chose is read back from the compiled model
(precision, devices, streams, threads), so a cell says whether it ran bf16, f32 or int8 kernels."""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

from core.backends import Runner

PAST, PRESENT = "past_key_values.", "present."
# What a latency cell asks of OpenVINO unless the recipe says otherwise: one stream, so one request
# has all the cell's threads (OpenVINO's own CPU default hint is LATENCY too).
LATENCY = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
READ_BACK = ("INFERENCE_PRECISION_HINT", "EXECUTION_DEVICES", "NUM_STREAMS", "INFERENCE_NUM_THREADS",
             "PERFORMANCE_HINT", "KV_CACHE_PRECISION")


def properties(threads: Optional[int], options: Optional[dict], protocol: bool = True) -> dict:
    """The compile properties: the cell's threads, the latency protocol, then the recipe's options
    (`bench.options`, already in OpenVINO's property names: see bench.openvino_backends.OpenvinoOptions).
    Without `protocol`, the threads and the options only: what OpenVINO's own defaults give."""
    props = dict(LATENCY) if protocol else {}
    if threads:
        props["INFERENCE_NUM_THREADS"] = int(threads)
    props.update(options or {})
    return props


def read_model(path: str):
    import openvino as ov

    return ov.Core().read_model(str(path))


def compile_model(model, device: str, props: dict):
    import openvino as ov

    core = ov.Core()
    if device not in core.available_devices:
        raise RuntimeError(f"OpenVINO here has devices {core.available_devices}, not {device}")
    return core.compile_model(model, device, props)


def read_back(compiled) -> dict:
    """What the compiled model says it runs with (a property a plugin lacks is left out)."""
    out = {}
    for name in READ_BACK:
        try:
            value = compiled.get_property(name)
        except Exception:  # noqa: BLE001 - not every device plugin has every property
            continue
        if hasattr(value, "get_type_name"):  # an element type: "f32", "bf16", "u8"
            value = value.get_type_name()
        out[name.lower()] = value if isinstance(value, (int, float, list)) else str(value)
    return out


def reshape_static(model, inputs: dict[str, np.ndarray]) -> None:
    """Fix every input to the cell's shape: OpenVINO then plans memory and picks kernels for that one
    shape, as a deployment with a fixed batch and length would."""
    model.reshape({p.get_any_name(): list(inputs[p.get_any_name()].shape) for p in model.inputs
                   if p.get_any_name() in inputs})


class OvRunner(Runner):
    def __init__(self, path: str, device: str, threads: int, options: Optional[dict] = None,
                 static: bool = True, perf_count: bool = False, protocol: bool = True):
        self.path, self.device, self.static = path, device, static
        self.props = properties(threads, options, protocol)
        if perf_count:
            self.props["PERF_COUNT"] = True
        self.model = read_model(path)
        self.names = {p.get_any_name() for p in self.model.inputs}
        self.compiled = None
        self.by_shape: dict = {}  # static shapes: one compiled model and request per shape seen
        self.info = {"threads_requested": threads}
        if not static:
            self.compiled, self.request = self._compile()

    def _compile(self):
        compiled = compile_model(self.model, self.device, self.props)
        self.info.update({"openvino": read_back(compiled), "static_shape": self.static})
        return compiled, compiled.create_infer_request()

    def prepare(self, inputs):
        """(compiled model, request, feed): with static shapes, the model compiled for this feed's shape
        (once per shape: a cell times one; accuracy batches and a serving SUT's batch sizes add others)."""
        feed = {k: np.ascontiguousarray(v) for k, v in inputs.items() if k in self.names}
        if not self.static:
            return self.compiled, self.request, feed
        key = tuple(sorted((k, v.shape) for k, v in feed.items()))
        if key not in self.by_shape:
            reshape_static(self.model, feed)
            self.by_shape[key] = self._compile()
            self.info["shape"] = {k: list(v.shape) for k, v in feed.items()}
        self.compiled, self.request = self.by_shape[key]
        return self.compiled, self.request, feed

    def call(self, prepared):
        compiled, request, feed = prepared
        # infer() returns when the request is done (synchronous), so host time covers the work.
        return request.infer(feed)[compiled.output(0)]

    def outputs(self, prepared) -> np.ndarray:
        return np.asarray(self.call(prepared), dtype=np.float32)

    def compiled_shapes(self) -> Optional[int]:
        return len(self.by_shape) if self.static else None

    def perf_counts(self, prepared) -> list:
        return prepared[1].get_profiling_info()


def make_stateful(model) -> list[str]:
    """Turn the graph's explicit KV cache (past_key_values.* inputs, present.* outputs) into OpenVINO
    state, as OpenVINO's LLM deployments run; returns the state's input names."""
    from openvino._offline_transformations import apply_make_stateful_transformation

    past = [p.get_any_name() for p in model.inputs if p.get_any_name().startswith(PAST)]
    if not past:
        raise ValueError("the graph has no past_key_values.* inputs: export it with export.causal_lm_onnx")
    apply_make_stateful_transformation(model, {n: PRESENT + n[len(PAST):] for n in past})
    return past


class OvLM:
    """Greedy generation on a stateful compiled model: one request, its state reset and sized to the
    batch before the prefill, then one token per step; ids, mask and logits cross, the cache never does."""

    def __init__(self, path: str, device: str = "CPU", threads: Optional[int] = None, options: Optional[dict] = None,
                 protocol: bool = True):
        model = read_model(path)
        self.kv_dims = {}
        for p in model.inputs:
            name = p.get_any_name()
            if name.startswith(PAST):
                shape = p.get_partial_shape()
                self.kv_dims[name] = (shape[1].get_length(), shape[3].get_length())  # (heads, head size)
        make_stateful(model)
        self.names = {p.get_any_name() for p in model.inputs}
        self.compiled = compile_model(model, device, properties(threads, options, protocol))
        self.request = self.compiled.create_infer_request()
        self.logits_port = self.compiled.output("logits")
        self.info = {"openvino": read_back(self.compiled), "kv_cache": "OpenVINO state (stateful model)"}

    def _reset(self, batch: int) -> None:
        import openvino as ov

        self.request.reset_state()
        # The state's initial value is 0 tokens of batch 0; the prefill needs batch rows of 0 tokens.
        for state in self.request.query_state():
            heads, size = next(d for n, d in self.kv_dims.items() if state.name.startswith(n))
            state.state = ov.Tensor(np.zeros((batch, heads, 0, size), np.float32))

    def _step(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        from runtime.decode import position_ids

        feed = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)}
        if "attention_mask" in self.names:
            feed["attention_mask"] = np.ascontiguousarray(mask, dtype=np.int64)
        if "position_ids" in self.names:
            feed["position_ids"] = position_ids(mask, ids.shape[1])
        if "logits_to_keep" in self.names:  # the fused decoder graph: logits for every position asked for
            feed["logits_to_keep"] = np.array(ids.shape[1], np.int64)
        return self.request.infer(feed)[self.logits_port]

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self._reset(len(input_ids))
        return np.array(self._step(input_ids, attention_mask), dtype=np.float32)

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, new_tokens: int,
                 step_logits: Optional[list] = None, on_step=None, on_token=None) -> tuple[np.ndarray, dict]:
        """Greedy decoding of exactly `new_tokens` tokens, as runtime.decode.OrtLM.generate; `on_step()` is
        called after each step, outside its time (the profiler reads the step's counters there), and
        `on_token(step)` as each step's tokens are out."""
        mask = np.asarray(attention_mask, dtype=np.int64)
        ids = np.asarray(input_ids)
        out = np.empty((len(ids), new_tokens), np.int64)
        times = []
        self._reset(len(ids))
        for step in range(new_tokens):
            t0 = time.perf_counter()
            last = self._step(ids, mask)[:, -1]
            nxt = last.argmax(-1)
            times.append((time.perf_counter() - t0) * 1e3)
            if on_token is not None:
                on_token(step)
            if on_step is not None:
                on_step()
            if step_logits is not None:
                step_logits.append(np.array(last, dtype=np.float32))
            out[:, step] = nxt
            ids = nxt[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((len(mask), 1), np.int64)], 1)
        return out, {"prefill_ms": times[0], "decode_ms": times[1:]}
