"""One benchmark cell, in its own process: `python -m bench.worker JOB.json`.

A separate process per cell keeps one cell's memory, threads, compiled kernels and crashes away from
every other. The job says what to load and how to time it; the result is written atomically to
the job's `result_path`, so a crash leaves no result at all rather than half of one."""
from __future__ import annotations

import importlib
import json
import os
import sys
import time


def _nvml_process_bytes():
    """Device memory NVML attributes to this process (nvidia-ml-py, in the `gpu` extra), or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        pid = os.getpid()
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid == pid and p.usedGpuMemory is not None:
                    return int(p.usedGpuMemory)
    except Exception:  # noqa: BLE001 - no NVML, no figure; the torch figures remain
        return None
    return None


MEMORY_CALLS = 3  # untimed calls of the memory phase, after the first


def setup(job: dict):
    """What every measuring process does first: (backend class, torch or None, threads). The libraries
    the backend's deployment loads are imported before the idle baseline so the memory delta is the
    model's; a backend that does not list torch never imports it (no torch thread pool beside its own)."""
    from core.backends import BACKENDS
    from core.processes import import_located

    import_located(job["backend_module"])
    threads = int(job["threads"])
    backend = BACKENDS[job["backend"]]
    modules = {name: importlib.import_module(name) for name in backend.imports}
    torch = modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
    for p in job.get("sys_path", []):
        sys.path.insert(0, p)
    return backend, torch, threads


def run(job: dict) -> dict:
    import numpy as np

    from bench.protocol import measure
    from core.backends import engine_kwargs
    from core.model import ModelIO
    from core.processes import memory_bytes

    backend, torch, threads = setup(job)
    io = ModelIO.from_json(job["io"])
    batch, seq = int(job["batch_size"]), int(job["seq_len"])
    timing = job["timing"]

    # The idle baseline: after the backend's libraries are imported, before the model loads.
    rss_before = memory_bytes("VmRSS")
    started = time.time()
    t0 = time.perf_counter()
    runner = backend.load(job["path"], threads, **engine_kwargs(backend, job))
    load_s = time.perf_counter() - t0
    prepared = runner.prepare(io.make(batch, seq, seed=job.get("seed", 0)))
    on_cuda = torch is not None and job["device"] == "cuda" and torch.cuda.is_available()
    # ONNX Runtime allocates device memory itself: torch's allocator figures would read 0 there, so
    # its cells get NVML's figure alone.
    torch_alloc = on_cuda and backend.uses_torch_allocator
    # What the loaded model and one batch of inputs hold on the device before any call: the
    # weight memory a deployment pays for as long as the model is loaded.
    loaded_bytes = int(torch.cuda.memory_allocated()) if torch_alloc else None
    t0 = time.perf_counter()
    first_ms = runner.timed_call(prepared)  # includes torch.compile / lazy init where the backend has it
    first_wall_ms = (time.perf_counter() - t0) * 1e3

    # The memory phase: a few calls, then the peak. Read here, before the timed loop, it is the
    # model's at this batch size and cannot depend on how many iterations the timing takes.
    if torch_alloc:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(MEMORY_CALLS):
        runner.call(prepared)
    memory = {"peak_rss_delta": max(memory_bytes("VmHWM") - rss_before, 0), "rss_idle_baseline": rss_before}
    if torch_alloc:
        torch.cuda.synchronize()
        memory["cuda_allocated_after_load"] = loaded_bytes
        memory["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated())
        memory["cuda_max_reserved"] = int(torch.cuda.max_memory_reserved())
    if on_cuda:
        nvml = _nvml_process_bytes()
        if nvml is not None:
            memory["nvml_process_device_bytes"] = nvml  # includes the CUDA context, unlike the torch figures

    # Raw samples only: statistics are the parent's job, so nothing of the tool's own grows in here.
    m = measure(lambda: runner.timed_call(prepared), warmup=timing["warmup"], min_iters=timing["min_iters"],
                min_seconds=timing["min_seconds"], max_seconds=timing["max_seconds"])
    result = {"samples_ms": [round(x, 6) for x in m["samples_ms"]], "warmup_ms": [round(x, 6) for x in m["warmup_ms"]],
              "capped_by_max_seconds": m["capped"], "started": round(started, 3), "memory": memory,
              "cold": {"load_s": round(load_s, 4), "first_call_ms": round(first_wall_ms, 3),
                       "first_call_timed_ms": round(first_ms, 3)},
              "threads": {"requested": threads, **runner.info}}
    if backend.compiles:
        # torch.compile compiles on the first call: that is the compile time, kept out of the warm numbers.
        result["cold"]["compile_s"] = round(first_wall_ms / 1e3, 4)

    if job.get("eval_inputs"):
        # Accuracy from the very outputs this backend produces, on the real evaluation split.
        from runtime.infer import load_batches, reduce_outputs

        outs = [reduce_outputs(runner.outputs(runner.prepare(b)), b) for b in load_batches(job["eval_inputs"])]
        np.save(job["outputs_path"], np.concatenate(outs).astype(np.float32))
    return result


def main() -> int:
    return serve(run)


def serve(run_job) -> int:
    """A measuring process's main: the job from the file named on the command line, the result
    written atomically to its `result_path` (a crash leaves none rather than half of one)."""
    from core import atomic
    from core.processes import die_with_parent

    die_with_parent()
    with open(sys.argv[1]) as fh:
        job = json.load(fh)
    atomic.write_json(job["result_path"], run_job(job))
    return 0


if __name__ == "__main__":
    sys.exit(main())
