"""The ONNX Runtime backends: `ort-cpu`, `ort-cuda` (IOBinding) and `ort-tensorrt`, one execution
provider each, proven by read-back (a silent fallback to the CPU is a failed cell). They profile with
ORT's own profiler, load the recommended graph with the same provider in `snippet`, and read the
kernel census the ONNX steps recorded (which int8 kernels the graph was fused into) for the report."""
from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from typing import ClassVar, Optional

from core.backends import Backend, Runner
from core.findings import Finding
from core.steps import precision_of


def ort_by_op(trace: str, skip_runs: int, per: int) -> dict:
    """Milliseconds per op type from ORT's trace file, over the runs after the first `skip_runs`
    (the profiler is on from the session's start), divided by `per` (calls or tokens)."""
    with open(trace) as fh:
        events = json.load(fh)
    per_op: dict[str, float] = defaultdict(float)
    nodes: dict[str, str] = {}
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    cutoff = runs[skip_runs] if len(runs) > skip_runs else 0
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") and "op_name" in args:
            nodes[e["name"][:-len("_kernel_time")]] = args["op_name"]
            if e["ts"] >= cutoff:
                per_op[args["op_name"]] += e["dur"] / 1e3 / per  # us over the calls -> ms per call
    counts: dict[str, int] = defaultdict(int)
    for op in nodes.values():
        counts[op] += 1
    return {"tool": "onnxruntime profiler", "by_op_ms": dict(per_op), "nodes_by_op": dict(counts)}


def kernels_of(variants: dict, name: str) -> Optional[dict]:
    """The kernel census nearest the variant (its own step's, else an ancestor's): export.graph_kernels
    records it in a step's notes."""
    seen = set()
    while name in variants and name not in seen:
        seen.add(name)
        v = variants[name]
        merged: dict = {}
        for n in v.get("notes") or []:
            merged.update(n)
        k = merged.get("kernels")
        if k and "error" not in k:
            return k
        name = v.get("parent")
    return None


class OrtBackend(Backend):
    format = "onnx"
    provider: ClassVar[str]
    # An ONNX Runtime deployment on CPU does not load torch, so neither does its cell. On CUDA it
    # does: torch's wheels are where the CUDA libraries ORT loads usually come from.
    imports = ("onnxruntime",)
    libraries = ("onnxruntime", "onnxruntime-gpu")
    generates = True

    @classmethod
    def unavailable(cls) -> Optional[str]:
        why = super().unavailable()
        if why:
            return why
        import onnxruntime as ort

        if cls.provider not in ort.get_available_providers():
            hint = " (install the `gpu` extra: onnxruntime-gpu)" if cls.device == "cuda" else ""
            return f"ONNX Runtime here offers {ort.get_available_providers()}, not {cls.provider}{hint}"
        return None

    @classmethod
    def load(cls, path: str, threads: int) -> Runner:
        from runtime.ort_runner import OrtRunner

        return OrtRunner(path, cls.provider, cls.device, threads)

    @classmethod
    def load_generator(cls, path: str, threads: int):
        from runtime.ort_runner import OrtGenerator

        return OrtGenerator(path, cls.provider, threads)

    @classmethod
    def profile(cls, path: str, inputs: dict, threads: int, calls: int, warmup: int) -> dict:
        from runtime.ort_runner import OrtRunner

        with tempfile.TemporaryDirectory() as tmp:
            runner = OrtRunner(path, cls.provider, cls.device, threads, profile_prefix=os.path.join(tmp, "ort"))
            prepared = runner.prepare(inputs)
            for _ in range(warmup + calls):
                runner.call(prepared)
            return ort_by_op(runner.session.end_profiling(), warmup, calls)

    @classmethod
    def profile_generation(cls, path: str, prompts, new_tokens: int, threads: int, generations: int) -> dict:
        import numpy as np
        import onnxruntime as ort

        from runtime.decode import OrtLM
        from runtime.ort_runner import with_cpu_fallback

        with tempfile.TemporaryDirectory() as tmp:
            so = ort.SessionOptions()
            so.enable_profiling, so.profile_file_prefix = True, os.path.join(tmp, "ort")
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            so.log_severity_level = 3
            lm = OrtLM(ort.InferenceSession(path, so, providers=with_cpu_fallback(cls.provider)))
            mask = np.ones_like(prompts)
            for _ in range(1 + generations):  # one generation of warm-up, whose runs are skipped
                lm.generate(prompts, mask, new_tokens)
            return ort_by_op(lm.session.end_profiling(), new_tokens, generations * new_tokens)

    @classmethod
    def snippet(cls) -> Optional[str]:
        from runtime.ort_runner import with_cpu_fallback

        return f'''import onnxruntime as ort

providers = {with_cpu_fallback(cls.provider)!r}
session = ort.InferenceSession(str(MODEL), providers=providers)
# ONNX Runtime falls back to the CPU silently when a provider cannot start: stop rather than run elsewhere.
if session.get_providers()[0] != providers[0]:
    sys.exit(f"ONNX Runtime did not start {{providers[0]}} here (available: {{ort.get_available_providers()}})")


def value_for(i):
    """The io.json's input, or what a decoder graph's first call takes beside the tokens: positions 0..SEQ-1,
    logits for all of them, and an empty key/value cache ([batch, kv heads, 0 past tokens, head size])."""
    if i.name in inputs:
        return inputs[i.name]
    if i.name == "position_ids":
        return np.broadcast_to(np.arange(SEQ, dtype=np.int64), (BATCH, SEQ)).copy()
    if i.name == "logits_to_keep":  # the workbench's fused decoder graph: logits of the last this many positions
        return np.array(SEQ, dtype=np.int64)
    if i.name.startswith("past_key_values"):
        dims = [BATCH if k == 0 else d if isinstance(d, int) else 0 for k, d in enumerate(i.shape)]
        return np.zeros(dims, dtype=np.float16 if "float16" in i.type else np.float32)
    sys.exit(f"the graph takes {{i.name!r}}, which {{MODEL.name}}.io.json does not describe")


feed = {{i.name: value_for(i) for i in session.get_inputs()}}  # an optimised graph may have dropped an input
output = session.run(None, feed)[0]
'''

    @classmethod
    def kernel_census(cls, variants: dict, name: str) -> Optional[dict]:
        return kernels_of(variants, name)

    @classmethod
    def findings(cls, cell: dict, variants: dict, cpu_flags: list[str]) -> list[str]:
        k = kernels_of(variants, cell["variant"])
        if not k:
            return []
        precision, weight_only = precision_of(variants, cell["variant"])
        int8 = precision == "int8" and not weight_only
        found = []
        if int8 and not k.get("int8_kernels"):
            found.append(Finding("ONNX Runtime fused no int8 kernel: the graph still runs in float",
                                 "float-op-left-out"))
        if int8 and k.get("float_weight_matmuls"):
            found.append(Finding(f"{k['float_weight_matmuls']} weight MatMul(s) stayed in float", "float-op-left-out"))
        if k.get("softmax") and not k.get("attention_fused"):
            found.append(Finding("attention is not fused (Softmax and MatMuls run one by one)", "attention-float"))
        return found


class OrtCPU(OrtBackend):
    name, device, summary, provider = "ort-cpu", "cpu", "ONNX Runtime, CPUExecutionProvider", "CPUExecutionProvider"
    default = True


class OrtCUDA(OrtBackend):
    name, device, provider = "ort-cuda", "cuda", "CUDAExecutionProvider"
    summary = "ONNX Runtime, CUDAExecutionProvider (onnxruntime-gpu), inputs and outputs bound on the device"
    imports = ("torch", "onnxruntime")


class OrtTensorRT(OrtBackend):
    name, device, provider = "ort-tensorrt", "cuda", "TensorrtExecutionProvider"
    generates = False  # a KV cache that grows every step would rebuild TensorRT engines: not measured
    summary = "ONNX Runtime, TensorrtExecutionProvider"
    imports = ("torch", "onnxruntime")
    libraries = ("onnxruntime-gpu", "tensorrt")

    @classmethod
    def unavailable(cls) -> Optional[str]:
        why = super().unavailable()
        if why is None and not _tensorrt_libraries():
            # onnxruntime-gpu lists the TensorRT provider whether or not TensorRT itself is installed.
            return ("onnxruntime-gpu has a TensorRT provider, but TensorRT's libraries (libnvinfer) are not "
                    "installed here (pip install tensorrt, matching the CUDA version)")
        return why


def _tensorrt_libraries() -> bool:
    import ctypes
    import ctypes.util

    if ctypes.util.find_library("nvinfer"):
        return True
    for soname in ("libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so"):
        try:
            ctypes.CDLL(soname)
            return True
        except OSError:
            continue
    try:  # the tensorrt pip wheels keep the libraries in their own package folder
        import tensorrt_libs  # noqa: F401

        return True
    except ImportError:
        return False

