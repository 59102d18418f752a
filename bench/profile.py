"""Where a cell's time goes, op by op: `python -m bench.profile JOB.json`, a process of its own after
the timed ones (a profiler slows what it watches, so its figures never enter the latency numbers).

ONNX Runtime cells run a session with ORT's profiler on; torch cells run under torch.profiler; a
causal LM's cells generate under them. Both give milliseconds per call (per generated token) by op type, which reporting.diagnosis turns into a plain-words answer to
"why isn't this variant faster?"."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import defaultdict

PROFILE_CALLS = 20
WARMUP_CALLS = 3


def _ort_profile(job: dict, inputs: dict) -> dict:
    from bench.backends import OrtRunner

    with tempfile.TemporaryDirectory() as tmp:
        runner = OrtRunner(job["path"], job["backend"], int(job["threads"]),
                           profile_prefix=os.path.join(tmp, "ort"))
        prepared = runner.prepare(inputs)
        for _ in range(WARMUP_CALLS):
            runner.call(prepared)
        for _ in range(PROFILE_CALLS):
            runner.call(prepared)
        return _ort_by_op(runner.session.end_profiling(), WARMUP_CALLS, PROFILE_CALLS)


def _ort_by_op(trace: str, skip_runs: int, per: int) -> dict:
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
    return {"tool": "onnxruntime profiler", "by_op_ms": dict(per_op), "nodes_by_op": _count(nodes.values())}


PROFILE_GENERATIONS = 3


def _generation_profile(job: dict) -> dict:
    """A causal LM's cell: whole greedy generations (prefill and decode) under the profiler, per
    generated token, after one generation of warm-up."""
    import numpy as np

    from core.backends import BACKENDS

    backend = BACKENDS[job["backend"]]
    prompts = np.asarray(job["prompts"], dtype=np.int64)
    mask, n = np.ones_like(prompts), int(job["new_tokens"])
    per = PROFILE_GENERATIONS * n
    if backend.format == "onnx":
        import onnxruntime as ort

        from runtime.decode import OrtLM

        with tempfile.TemporaryDirectory() as tmp:
            so = ort.SessionOptions()
            so.enable_profiling, so.profile_file_prefix = True, os.path.join(tmp, "ort")
            so.intra_op_num_threads, so.inter_op_num_threads = int(job["threads"]), 1
            so.log_severity_level = 3
            lm = OrtLM(ort.InferenceSession(job["path"], so, providers=[backend.provider]))
            for _ in range(1 + PROFILE_GENERATIONS):
                lm.generate(prompts, mask, n)
            out = _ort_by_op(lm.session.end_profiling(), n, per)
    else:
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.set_num_threads(int(job["threads"]))
        gen = backend.load_generator(job["path"], int(job["threads"]))
        gen.generate(prompts, mask, n)
        cuda = backend.device == "cuda"
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(PROFILE_GENERATIONS):
                gen.generate(prompts, mask, n)
        out = {"tool": "torch.profiler", "by_op_ms": {
            ev.key: (ev.self_device_time_total if cuda else ev.self_cpu_time_total) / 1e3 / per
            for ev in prof.key_averages() if (ev.self_device_time_total if cuda else ev.self_cpu_time_total) > 0}}
    return {**out, "per": "generated token (prefill included)"}


def _torch_profile(job: dict, inputs: dict) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from core.backends import BACKENDS

    backend = BACKENDS[job["backend"]]
    torch.set_num_threads(int(job["threads"]))
    runner = backend.load(job["path"], int(job["threads"]))
    prepared = runner.prepare(inputs)
    for _ in range(WARMUP_CALLS):
        runner.call(prepared)
    cuda = backend.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILE_CALLS):
            runner.call(prepared)
        if cuda:
            torch.cuda.synchronize()
    per_op = {}
    for ev in prof.key_averages():
        us = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        if us > 0:
            per_op[ev.key] = us / 1e3 / PROFILE_CALLS
    return {"tool": "torch.profiler", "by_op_ms": per_op}


def _count(values) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for v in values:
        out[v] += 1
    return dict(out)


def run(job: dict) -> dict:
    from core.backends import BACKENDS
    from core.model import ModelIO
    from core.processes import import_located

    import_located(job["backend_module"])
    for p in job.get("sys_path", []):
        sys.path.insert(0, p)
    inputs = ModelIO.from_json(job["io"]).make(int(job["batch_size"]), int(job["seq_len"]), seed=job.get("seed", 0))
    fmt = BACKENDS[job["backend"]].format
    if job.get("new_tokens"):  # a causal LM's generation cell
        out = _generation_profile(job)
    else:
        out = _ort_profile(job, inputs) if fmt == "onnx" else _torch_profile(job, inputs)
    total = sum(out["by_op_ms"].values())
    top = sorted(out["by_op_ms"].items(), key=lambda kv: -kv[1])
    return {**out, "by_op_ms": {k: round(v, 4) for k, v in top}, "op_total_ms": round(total, 4),
            "calls": PROFILE_CALLS}


def main() -> int:
    from bench.worker import serve

    return serve(run)


if __name__ == "__main__":
    sys.exit(main())
