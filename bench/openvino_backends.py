"""The OpenVINO backends: `openvino-cpu`, and `openvino-gpu` (an Intel GPU; a skipped cell where
OpenVINO finds none). They run the `openvino` IR (converted from the variant's ONNX graph, so an int8
Q/DQ graph runs OpenVINO's int8 kernels), reshaped to the cell's static shape, with the cell's threads,
one stream and the LATENCY hint; the recipe's `bench.options.<backend>` set precision, hint, streams or
any raw OpenVINO property. A reference variant's cells compile the IR as read, with the threads alone:
what OpenVINO's defaults give. What OpenVINO really chose (inference precision, devices, streams) is read
back into the cell. Causal LMs generate on a stateful model (the KV cache is OpenVINO state). Op-level
profiles come from OpenVINO's performance counters, with the kernel (exec type) each layer ran."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from core.backends import Backend, Runner
from core.findings import Finding
from core.steps import precision_of


class OpenvinoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inference_precision: Optional[Literal["f32", "bf16", "f16"]] = Field(
        None, description="INFERENCE_PRECISION_HINT; default: OpenVINO's own (bf16 on CPUs with AMX or AVX-512 "
        "BF16, f32 elsewhere; int8 graphs run int8 kernels either way)")
    performance_hint: Optional[Literal["LATENCY", "THROUGHPUT"]] = Field(
        None, description="PERFORMANCE_HINT; default LATENCY (a latency cell is one request at a time)")
    num_streams: Optional[int] = Field(None, ge=1, description="NUM_STREAMS; default 1 (all the cell's threads "
                                       "serve the one request)")
    static_shape: bool = Field(True, description="reshape the model to the cell's batch and sequence length "
                               "before compiling (a deployment with fixed shapes); false: compile it dynamic")
    properties: dict[str, Any] = Field(default_factory=dict, description="further OpenVINO properties by their "
                                       "own names (e.g. {KV_CACHE_PRECISION: u8}); one OpenVINO rejects fails the cell")


def compile_args(options: Optional[dict]) -> dict:
    """How a cell compiles: the recipe's options as OpenVINO properties over the workbench's latency protocol
    (one stream, LATENCY, the cell's static shape). `options` None (a reference variant): OpenVINO's own
    defaults, the model compiled as read (dynamic shapes) with the cell's threads only."""
    if options is None:
        return {"options": {}, "static": False, "protocol": False}
    o = OpenvinoOptions.model_validate(options)
    props = {"INFERENCE_PRECISION_HINT": o.inference_precision, "PERFORMANCE_HINT": o.performance_hint,
             "NUM_STREAMS": None if o.num_streams is None else str(o.num_streams)}
    return {"options": {**{k: v for k, v in props.items() if v is not None}, **o.properties},
            "static": o.static_shape, "protocol": True}


def _by_op(infos, calls: int) -> dict:
    """Milliseconds per call by layer type from performance counters summed over `calls`, the
    kernel (exec type) each type ran with, and how many layers of each type ran."""
    per_op: dict[str, float] = defaultdict(float)
    kernels: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    nodes: dict[str, int] = defaultdict(int)
    for i in infos:
        if str(i.status).endswith("NOT_RUN"):
            continue  # optimised out (fused into a neighbour)
        ms = i.real_time.total_seconds() * 1e3 / calls
        per_op[i.node_type] += ms
        kernels[i.node_type][i.exec_type] += ms
        nodes[i.node_type] += 1
    return {"tool": "openvino performance counters (PERF_COUNT)", "by_op_ms": dict(per_op),
            "nodes_by_op": dict(nodes), "kernels_by_op": {k: dict(v) for k, v in kernels.items()}}


class OpenvinoBackend(Backend):
    format = "openvino"
    ov_device: ClassVar[str]
    imports = ("openvino",)  # an OpenVINO deployment does not load torch, so neither does its cell
    libraries = ("openvino",)
    generates = True
    Options = OpenvinoOptions

    @classmethod
    def unavailable(cls) -> Optional[str]:
        try:
            import openvino as ov
        except ImportError:
            return "OpenVINO is not installed (pip install openvino)"
        devices = ov.Core().available_devices
        if cls.ov_device not in devices:
            return f"OpenVINO finds no {cls.ov_device} device here (it has {devices})"
        return None

    @classmethod
    def load(cls, path: str, threads: int, options: Optional[dict] = None) -> Runner:
        from runtime.openvino_runner import OvRunner

        return OvRunner(path, cls.ov_device, threads, **compile_args(options))

    @classmethod
    def load_generator(cls, path: str, threads: int, options: Optional[dict] = None):
        from runtime.openvino_runner import OvLM

        args = compile_args(options)
        return OvLM(path, cls.ov_device, threads, args["options"], protocol=args["protocol"])

    @classmethod
    def profile(cls, path: str, inputs: dict, threads: int, calls: int, warmup: int, options: Optional[dict] = None):
        from runtime.openvino_runner import OvRunner

        runner = OvRunner(path, cls.ov_device, threads, perf_count=True, **compile_args(options))
        prepared = runner.prepare(inputs)
        for _ in range(warmup):
            runner.call(prepared)
        totals: dict = {}
        for _ in range(calls):  # the counters hold the last call only: sum them call by call
            runner.call(prepared)
            totals = _merge(totals, runner.perf_counts(prepared))
        return _by_op(totals.values(), calls)

    @classmethod
    def profile_generation(cls, path: str, prompts, new_tokens: int, threads: int, generations: int,
                           options: Optional[dict] = None) -> dict:
        import numpy as np

        from runtime.openvino_runner import OvLM

        args = compile_args(options)
        lm = OvLM(path, cls.ov_device, threads, {**args["options"], "PERF_COUNT": True}, protocol=args["protocol"])
        mask = np.ones_like(prompts)
        lm.generate(prompts, mask, new_tokens)  # warm-up
        totals: dict = {}
        steps: list = []
        for _ in range(generations):
            lm.generate(prompts, mask, new_tokens, on_step=lambda: steps.append(lm.request.get_profiling_info()))
        for infos in steps:
            totals = _merge(totals, infos)
        return _by_op(totals.values(), generations * new_tokens)

    @classmethod
    def snippet(cls) -> Optional[str]:
        return f'''import openvino as ov

core = ov.Core()
model = core.read_model(str(MODEL))
model.reshape({{p.get_any_name(): list(inputs[p.get_any_name()].shape) for p in model.inputs}})
compiled = core.compile_model(model, {cls.ov_device!r}, {{"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}})
print("OpenVINO runs it at", compiled.get_property("INFERENCE_PRECISION_HINT"), "on", compiled.get_property("EXECUTION_DEVICES"))
output = compiled({{p.get_any_name(): inputs[p.get_any_name()] for p in model.inputs}})[compiled.output(0)]
'''

    @classmethod
    def findings(cls, cell: dict, variants: dict, cpu_flags: list[str]) -> list[str]:
        found = []
        kernels = ((cell.get("profile") or {}).get("kernels_by_op") or {})
        matmuls = {k: v for op, ks in kernels.items() if op in ("FullyConnected", "MatMul", "Convolution")
                   for k, v in ks.items()}
        precision, weight_only = precision_of(variants, cell["variant"])
        if precision == "int8" and not weight_only and matmuls and not any(_int8(k) for k in matmuls):
            found.append(Finding(f"OpenVINO ran no int8 kernel for its matrix products ({', '.join(sorted(matmuls))})"
                                 ": the int8 graph runs in float", "float-op-left-out"))
        total = sum((cell.get("profile") or {}).get("by_op_ms", {}).values()) or 0
        ref = sum(v for ks in kernels.values() for k, v in ks.items() if k.startswith("ref"))
        if total and ref / total > 0.2:
            found.append(Finding(f"{ref / total:.0%} of its op time is in OpenVINO reference kernels (exec type "
                                 "ref_*): layers with no optimised kernel for this CPU and precision"))
        ran = ((cell.get("threads") or {}).get("openvino") or {}).get("inference_precision_hint")
        if ran == "bf16" and not {"amx_bf16", "avx512_bf16"} & set(cpu_flags):
            found.append(Finding("OpenVINO ran it in bf16 on a CPU without AMX or AVX-512 BF16 (emulated)",
                                 "bf16-emulated"))
        return found


def _int8(exec_type: str) -> bool:
    return exec_type.upper().endswith(("_I8", "_U8"))


def _merge(totals: dict, infos) -> dict:
    """Sum one call's counters into `totals` (by layer name)."""
    for i in infos:
        if i.node_name in totals:
            totals[i.node_name].real_time += i.real_time
        else:
            totals[i.node_name] = _Info(i)
    return totals


class _Info:
    """A copy of one layer's counter (OpenVINO reuses its objects between calls)."""

    def __init__(self, i):
        self.node_name, self.node_type, self.exec_type = i.node_name, i.node_type, i.exec_type
        self.real_time, self.status = i.real_time, i.status


class OpenvinoCPU(OpenvinoBackend):
    name, device, ov_device = "openvino-cpu", "cpu", "CPU"
    summary = "OpenVINO runtime, CPU plugin (IR reshaped to the cell's shape, LATENCY hint, one stream)"


class OpenvinoGPU(OpenvinoBackend):
    name, device, ov_device = "openvino-gpu", "intel-gpu", "GPU"
    summary = "OpenVINO runtime, GPU plugin (an Intel GPU)"
