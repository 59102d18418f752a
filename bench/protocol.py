"""The timing protocol and its statistics: inside a cell's process, warm-up, then time until both a
minimum number of iterations and a minimum time are reached (`measure`, raw samples only); in the
parent, a cell's figures from its processes (`combine`), speedups paired by round and the
comparison of two runs, each with a bootstrap interval over processes, and stability verdicts."""
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


# ----------------------------------------------------------------------------- across processes
# A cell is measured in several processes, one per round (bench.rounds). Most of the variation on a
# shared machine lies between processes and over time (frequency, placement, neighbours), so every
# interval below resamples processes, not just the samples inside one.
N_BOOT = 2000
MIN_SAMPLES = 10  # fewer samples than this cannot show whether a process settled


def median_draws(samples, n: int, rng) -> np.ndarray:
    """`n` draws of the median of a bootstrap resample of `samples`, without building the resamples:
    the median of m resampled values sits at the Beta((m+1)/2, (m+1)/2) quantile of the samples."""
    a = np.asarray(samples, dtype=np.float64)
    half = (len(a) + 1) / 2
    return np.quantile(a, rng.beta(half, half, size=n))


def _median_over_resampled_groups(draws: np.ndarray, rng) -> np.ndarray:
    """`draws` is (group, draw): for each draw, pick as many groups as there are, with replacement,
    and take the median of their values in that draw."""
    k, n = draws.shape
    pick = rng.integers(0, k, size=(n, k))
    return np.median(draws[pick, np.arange(n)[:, None]], axis=1)


def hierarchical_median_draws(per_process: list, n: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """Draws of the median of process medians: resample the processes, then each chosen process's
    samples. Its spread is what a rerun of the cell would see."""
    rng = np.random.default_rng(seed)
    return _median_over_resampled_groups(np.stack([median_draws(s, n, rng) for s in per_process]), rng)


def mixture_percentiles(per: list, qs) -> np.ndarray:
    """Percentiles of the processes' samples with every process weighing the same, however many samples it
    took: a process slowed down takes fewer samples in the same seconds, so pooling them as they come would
    all but drop it from the tail (p50 of the process medians could then sit above a pooled p95)."""
    values = np.concatenate(per)
    weights = np.concatenate([np.full(len(a), 1.0 / len(a)) for a in per]) / len(per)
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    at = np.cumsum(w) - w / 2  # each sample at the middle of its weight (Hazen's plotting position)
    return np.interp(np.asarray(qs, dtype=np.float64) / 100.0, at, v)


def combine(processes: list[dict], batch_size: int, threshold: float) -> dict:
    """One cell from its processes' raw results: p50 is the median of the process medians, its 95 %
    interval comes from `hierarchical_median_draws`; p90..p99 and the mean weigh every process the same
    (`mixture_percentiles`), so a tail is never under the p50. Returns latency_ms, throughput, stability
    (within each process and between them) and `unstable_reason` (None when the cell may be called stable)."""
    per = [np.asarray(p["samples_ms"], dtype=np.float64) for p in processes]
    medians = np.array([np.median(a) for a in per])
    pooled = np.concatenate(per)
    p50 = float(np.median(medians))
    lo, hi = np.percentile(hierarchical_median_draws(per), [2.5, 97.5])
    p90, p95, p99 = mixture_percentiles(per, [90, 95, 99])
    latency = {"p50": p50, "p90": p90, "p95": p95, "p99": p99, "mean": np.mean([a.mean() for a in per]),
               "std": pooled.std(ddof=1) if len(pooled) > 1 else 0.0, "min": pooled.min()}
    latency = {k: round(float(v), 6) for k, v in latency.items()}
    latency.update(n=int(len(pooled)), processes=len(per), ci95=[round(float(lo), 6), round(float(hi), 6)])
    within = [stability(a, threshold) for a in per]
    between = float((medians.max() - medians.min()) / p50) if len(per) > 1 else 0.0
    reasons = []
    if len(per) > 1 and between > threshold:
        reasons.append(f"the {len(per)} processes' medians spread {between:.0%} (threshold {threshold:.0%})")
    drifting = [s["window_spread"] for s in within if s["window_spread"] is not None and not s["stable"]]
    if drifting:
        reasons.append(f"latency did not settle inside {len(drifting)} process(es): window medians spread up to "
                       f"{max(drifting):.0%} (threshold {threshold:.0%})")
    few = min(len(a) for a in per)
    if few < MIN_SAMPLES:
        reasons.append(f"a process took only {few} samples, too few to judge stability (raise timing.min_seconds "
                       "or min_iters)")
    if any(p.get("capped_by_max_seconds") for p in processes):
        reasons.append("timing.max_seconds stopped a process before timing.min_iters")
    return {"latency_ms": latency, "throughput": round(batch_size * 1e3 / p50, 3),
            "stability": {"between_processes_spread": round(between, 4), "threshold": threshold,
                          "within": [{k: s[k] for k in ("stable", "window_spread")} for s in within]},
            "unstable_reason": "; ".join(reasons) or None}


def round_samples(cell: dict) -> dict[int, list]:
    """round -> that round's samples, for a cell measured in rounds (empty for older results)."""
    return {r["round"]: r["samples_ms"] for r in cell.get("repeats") or [] if r.get("samples_ms")}


def paired_ratio_ci(base: dict, cell: dict, n: int = N_BOOT, seed: int = 0) -> tuple[float, float, float] | None:
    """Speedup of `cell` over `base` (> 1: faster) from the rounds both were measured in: each round
    gives a ratio of medians, measured minutes apart at most, so slow drift cancels. The interval
    resamples rounds, and each round's medians from their samples. None when fewer than two
    rounds pair up; for results without rounds, the ratio of pooled medians (`ratio_ci`)."""
    a, b = round_samples(base), round_samples(cell)
    rounds = sorted(set(a) & set(b))
    if not a and not b and base.get("samples_ms") and cell.get("samples_ms"):
        return ratio_ci(base["samples_ms"], cell["samples_ms"], n_boot=n, seed=seed)
    if len(rounds) < 2:
        return None
    rng = np.random.default_rng(seed)
    point = float(np.median([np.median(a[r]) / np.median(b[r]) for r in rounds]))
    ratios = np.stack([median_draws(a[r], n, rng) / median_draws(b[r], n, rng) for r in rounds])
    lo, hi = np.percentile(_median_over_resampled_groups(ratios, rng), [2.5, 97.5])
    return point, float(lo), float(hi)


def unpaired_ratio_ci(old: dict, new: dict, n: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """p50 of `new` over p50 of `old` (> 1: slower) for cells of two separate runs: each side's
    median of process medians is resampled hierarchically, so the interval carries both runs'
    between-process spread. Older results without processes fall back to their samples."""
    def per_process(c):
        return list(round_samples(c).values()) or [c["samples_ms"]]

    a = hierarchical_median_draws(per_process(old), n, seed)
    b = hierarchical_median_draws(per_process(new), n, seed + 1)
    point = float(np.median([np.median(x) for x in per_process(new)]) /
                  np.median([np.median(x) for x in per_process(old)]))
    lo, hi = np.percentile(b / a, [2.5, 97.5])
    return point, float(lo), float(hi)
