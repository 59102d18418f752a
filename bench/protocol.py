"""The timing protocol and its statistics: warm-up, then time until both a minimum number of
iterations and a minimum time are reached; percentiles, a bootstrap interval of the median, and a
stability verdict computed from the raw samples, which are kept."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

WINDOWS = 5  # the samples are cut into this many consecutive windows for the stability check


def measure(timed_call: Callable[[], float], *, warmup: int, min_iters: int, min_seconds: float,
            max_seconds: float) -> dict:
    """Return {"warmup_ms": [...], "samples_ms": [...], "capped": bool}."""
    warm = [timed_call() for _ in range(warmup)]
    samples: list[float] = []
    t0 = time.perf_counter()
    capped = False
    while True:
        samples.append(timed_call())
        elapsed = time.perf_counter() - t0
        if len(samples) >= min_iters and elapsed >= min_seconds:
            break
        if elapsed >= max_seconds:
            capped = len(samples) < min_iters  # stopped by the time cap before min_iters
            break
    return {"warmup_ms": warm, "samples_ms": samples, "capped": capped}


def bootstrap_ci(samples, stat=np.median, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of `stat` over the samples."""
    a = np.asarray(samples, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boots = stat(a[rng.integers(0, len(a), size=(n_boot, len(a)))], axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(lo), float(hi)


def stability(samples, threshold: float) -> dict:
    """A cell is stable when the medians of consecutive windows agree within `threshold` (relative
    spread); a drift or a noisy neighbour shows up as windows that disagree."""
    a = np.asarray(samples, dtype=np.float64)
    if len(a) < WINDOWS * 2:
        return {"stable": True, "window_spread": None, "threshold": threshold, "note": "too few samples to judge"}
    medians = [float(np.median(w)) for w in np.array_split(a, WINDOWS)]
    spread = (max(medians) - min(medians)) / float(np.median(a))
    return {"stable": bool(spread <= threshold), "window_spread": round(spread, 4), "threshold": threshold,
            "window_medians_ms": [round(m, 5) for m in medians]}


def summarize(samples, batch_size: int) -> dict:
    a = np.asarray(samples, dtype=np.float64)
    p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])
    lo, hi = bootstrap_ci(a)
    latency = {"p50": p50, "p90": p90, "p95": p95, "p99": p99, "mean": a.mean(), "std": a.std(ddof=1) if len(a) > 1
               else 0.0, "min": a.min(), "n": len(a), "ci95": [lo, hi]}
    latency = {k: (round(float(v), 6) if not isinstance(v, (list, int)) else v) for k, v in latency.items()}
    latency["ci95"] = [round(lo, 6), round(hi, 6)]
    return {"latency_ms": latency, "throughput": round(batch_size * 1e3 / float(p50), 3)}


def ratio_ci(baseline_samples, samples, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Speedup of `samples` over `baseline_samples` as a ratio of medians (>1: faster), with a 95 %
    bootstrap interval from resampling both sets independently."""
    a = np.asarray(baseline_samples, dtype=np.float64)
    b = np.asarray(samples, dtype=np.float64)
    rng = np.random.default_rng(seed)
    ma = np.median(a[rng.integers(0, len(a), size=(n_boot, len(a)))], axis=1)
    mb = np.median(b[rng.integers(0, len(b), size=(n_boot, len(b)))], axis=1)
    lo, hi = np.percentile(ma / mb, [2.5, 97.5])
    return float(np.median(a) / np.median(b)), float(lo), float(hi)
