"""This machine's measured limits, for the roofline view: a short fp32 GEMM probe (FLOP/s) and a
memory-copy probe (bytes/s), cached per machine, thread count and torch version. A cell's
`roofline_fraction` is the FLOP/s it reached over the GEMM peak; `bandwidth_fraction` is the
weight bytes it streamed per second over the copy bandwidth (the limit for small batches)."""
from __future__ import annotations

import hashlib
import json
import os
import time

from core import atomic
from core.environment import cpu_model
from core.cache import cache_dir


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def probe(threads: int) -> dict:
    import torch

    key = hashlib.sha1(f"{cpu_model()}|{threads}|{torch.__version__}".encode()).hexdigest()[:12]
    path = cache_dir() / f"roofline-cpu-v2-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    try:
        n = 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        gemm = _best_seconds(lambda: torch.mm(a, b), 10)
        src = torch.empty(32 * 1024 * 1024)  # 128 MiB, far beyond any cache
        dst = torch.empty_like(src)
        copy = _best_seconds(lambda: dst.copy_(src), 5)
    finally:
        torch.set_num_threads(old)
    busy = load_before > 0.5 * (os.cpu_count() or 1)
    result = {"device": "cpu", "threads": threads, "peak_flops_per_s": 2 * n ** 3 / gemm,
              "peak_bytes_per_s": 2 * src.numel() * 4 / copy,  # read + write
              "method": f"best of 10 fp32 {n}x{n} torch.mm; best of 5 copies of 128 MiB", "cpu": cpu_model(),
              "load_average_before": round(load_before, 2), "measured_under_load": busy}
    if not busy:  # a peak measured while other work ran is too low: use it once, never cache it
        atomic.write_json(path, result)
    return result


def annotate(cells: list[dict], weight_bytes: dict[str, int], peak: dict) -> None:
    """Add achieved rates and fractions of the probed peaks to measured CPU cells."""
    for c in cells:
        lat = c.get("latency_ms")
        if not lat or c.get("device") != "cpu":
            continue
        seconds = lat["p50"] / 1e3
        if c.get("flops"):
            c["achieved_flops_per_s"] = c["flops"] / seconds
            c["roofline_fraction"] = round(c["achieved_flops_per_s"] / peak["peak_flops_per_s"], 4)
        wb = weight_bytes.get(c["variant"])
        if wb:
            c["bandwidth_fraction"] = round(wb / seconds / peak["peak_bytes_per_s"], 4)
