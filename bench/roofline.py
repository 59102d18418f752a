"""This machine's limits, for the roofline view. Two kinds, both shown: a short measured probe (an
fp32 GEMM for FLOP/s, a memory copy for bytes/s; run before any cell, cached per machine, thread
count and torch version) and a paper peak from the CPU's flags, clock and cores, per precision
(fp32, bf16, int8: VNNI and AMX where present). A cell's `roofline_fraction` is the operations it
did per second over the larger of the two for its precision, so it cannot pass 100 %; int8 cells
(a step's precision, Step.precision, is int8 with quantized activations) count against the int8
peak with their ancestor's FLOPs. `bandwidth_fraction` is the weight bytes it streamed per second (embedding
tables left out: a lookup reads a few rows) over the copy bandwidth, never above 1 (see `_bandwidth`)."""
from __future__ import annotations

import hashlib
import json
import os
import time

from core import atomic
from core import cpu
from core.environment import cpu_model
from core.cache import cache_dir
from core.steps import precision_of


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def probe(threads: int, fresh: bool = False) -> dict:
    """The measured peaks (cached per machine unless `fresh`: measured again now)."""
    import torch

    key = hashlib.sha1(f"{cpu_model()}|{threads}|{torch.__version__}".encode()).hexdigest()[:12]
    path = cache_dir() / f"roofline-cpu-v3-{key}.json"
    if path.exists() and not fresh:
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
    result = {"device": "cpu", "threads": threads, "peak_flops_per_s": 2 * n ** 3 / gemm, "paper": paper_peaks(threads),
              "peak_bytes_per_s": 2 * src.numel() * 4 / copy,  # read + write
              "method": f"best of 10 fp32 {n}x{n} torch.mm; best of 5 copies of 128 MiB", "cpu": cpu_model(),
              "load_average_before": round(load_before, 2), "measured_under_load": busy}
    if not busy:  # a peak measured while other work ran is too low: use it once, never cache it
        atomic.write_json(path, result)
    return result


# Operations per cycle per core, by vector unit: two FMA pipes (most server cores since Haswell and
# Zen 2; one-pipe parts make these an upper bound, which a peak must be), an FMA counted as two
# operations. Vendor figures; AMX from Intel's TMUL description (1024 int8 / 512 bf16 MACs a cycle).
FP32_LANES = (("avx512f", 16), ("avx2", 8), ("sse2", 4))
AMX_OPS = {"int8": 2048, "bf16": 1024}


def paper_peaks(threads: int, flags: set[str] | None = None, ghz: float | None = None) -> dict:
    """Peak operations per second per precision from the CPU's flags, clock and the threads used
    (logical CPUs counted as cores: with SMT this overstates, as an upper bound should)."""
    flags = cpu.features() if flags is None else flags
    ghz = cpu.max_clock_ghz() if ghz is None else ghz
    if not ghz:
        return {}
    lanes = next((n for flag, n in FP32_LANES if flag in flags), 4)
    fp32 = lanes * 2 * 2  # lanes x FMA (2 ops) x 2 pipes
    int8 = fp32 * 4 * (2 if cpu.has_int8_dot(flags - {"amx_int8"}) else 1)  # 4 int8 per fp32 lane; VNNI fuses the add
    bf16 = fp32 * (2 if cpu.has_native_bf16(flags - {"amx_bf16"}) else 1)
    if "amx_int8" in flags:
        int8 = max(int8, AMX_OPS["int8"])
    if "amx_bf16" in flags:
        bf16 = max(bf16, AMX_OPS["bf16"])
    scale = threads * ghz * 1e9
    return {"fp32": fp32 * scale, "bf16": bf16 * scale, "int8": int8 * scale, "clock_ghz": ghz,
            "method": f"{threads} threads x {ghz:.2f} GHz x ops/cycle from the CPU flags (fp32 {fp32}, bf16 {bf16}, "
                      f"int8 {int8} per core)"}


def precision(variants: dict, name: str) -> str:
    """The precision a variant's matmuls run in (Step.precision along its lineage): int8 or bf16 where a
    step quantized weights and activations to it; fp32 otherwise (weight-only int4 / nf4 and fp16 on
    the CPU dequantize or convert to fp32 for the arithmetic)."""
    kind, weight_only = precision_of(variants, name)
    return kind if kind in ("int8", "bf16") and not weight_only else "fp32"


def ancestor_flops(variants: dict, name: str):
    """A variant's FLOPs per forward, or its nearest ancestor's: quantization keeps every matmul's
    shape, while the FLOP counter cannot see into quantized kernels."""
    seen = set()
    while name in variants and name not in seen:
        seen.add(name)
        if variants[name].get("flops"):
            return variants[name]["flops"]
        name = variants[name].get("parent")
    return None


def annotate(cells: list[dict], variants: list[dict], peak: dict) -> None:
    """Add achieved rates and fractions of the peaks to measured CPU cells."""
    by_name = {v["name"]: v for v in variants}
    paper = peak.get("paper") or {}
    for c in cells:
        lat = c.get("latency_ms")
        if not lat or c.get("device") != "cpu":
            continue
        seconds = lat["p50"] / 1e3
        kind = precision(by_name, c["variant"])
        flops = c.get("flops") or (ancestor_flops(by_name, c["variant"]) or 0) * c["batch_size"]
        if c.get("generation") and (c.get("shape") or {}).get("seq_len"):
            # A decode step runs one token per sequence, where the counted forward ran the prompt: its
            # FLOPs over the prompt length (the attention over the growing cache is left out).
            flops /= c["shape"]["seq_len"]
        ceiling = max(peak["peak_flops_per_s"] if kind == "fp32" else 0.0, paper.get(kind, 0.0))
        if flops and ceiling:
            c["achieved_flops_per_s"] = flops / seconds
            c["roofline_precision"] = kind
            c["roofline_fraction"] = round(c["achieved_flops_per_s"] / ceiling, 4)
        streamed = (by_name.get(c["variant"]) or {}).get("streamed_weight_bytes")
        if streamed:
            c["streamed_bytes_per_s"] = streamed / seconds
    _bandwidth(cells, peak)


def _bandwidth(cells: list[dict], peak: dict) -> None:
    """`bandwidth_fraction` of each cell: its streamed bytes per second over the copy probe's. A cell that
    streams faster than the probe copied says the probe read low (the machine was busy while it ran): it is
    measured again, now that the cells are done, and the faster probe kept. A cell still above it (weights
    partly in cache) counts as 1, flagged `bandwidth_above_probe` with its own ratio."""
    rated = [c for c in cells if c.get("streamed_bytes_per_s")]
    if not rated:
        return
    if max(c["streamed_bytes_per_s"] for c in rated) > peak["peak_bytes_per_s"] and peak.get("threads"):
        again = probe(peak["threads"], fresh=True)
        if again["peak_bytes_per_s"] > peak["peak_bytes_per_s"]:
            peak.update(peak_bytes_per_s=again["peak_bytes_per_s"],
                        re_measured="the copy probe ran again after the cells: a cell streamed faster than it")
    for c in rated:
        ratio = c.pop("streamed_bytes_per_s") / peak["peak_bytes_per_s"]
        c["bandwidth_fraction"] = round(min(ratio, 1.0), 4)
        if ratio > 1:
            c["bandwidth_above_probe"] = round(ratio, 4)
