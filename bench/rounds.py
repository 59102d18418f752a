"""Cells measured in interleaved rounds. Every cell is measured once per round, each time in a new
process; round r measures all cells in a seeded shuffled order before round r + 1 starts. Drift
over the run (frequency, heat, a neighbour that comes and goes) then hits every cell alike instead
of whichever cell ran last, and two cells measured in the same round can be compared as a pair.

Around each process the parent reads what else the machine was doing (CPU time of other processes,
steal, clock); a process measured on a busy machine is measured again, a bounded number of times."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from bench.cells import run_cell
from bench.protocol import combine
from core.processes import stop_requested

KEEP_SAMPLES = 1000  # raw samples kept per process in results.json (every k-th beyond that, in time order)
BUSY_LIMIT_CORES = 0.3  # other processes' CPU (plus steal) above this, in cores, makes a process re-measured
RETRIES = 2  # re-measurements of one process on a busy machine, at most


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, steal) jiffies of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


def _own_cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the cell process among them)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _clock_mhz() -> Optional[float]:
    files = glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq")
    values = []
    for f in files:
        try:
            values.append(int(Path(f).read_text()) / 1000)
        except (OSError, ValueError):
            continue
    return round(float(np.mean(values)), 1) if values else None


class NoiseMeter:
    """What the rest of the machine did while one cell process ran."""

    def __enter__(self):
        self.t0, self.jiffies, self.own = time.monotonic(), _cpu_jiffies(), _own_cpu_seconds()
        self.mhz_before = _clock_mhz()
        return self

    def __exit__(self, *exc):
        hz = os.sysconf("SC_CLK_TCK")
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        busy, steal = (b - a for a, b in zip(self.jiffies, _cpu_jiffies()))
        own = _own_cpu_seconds() - self.own
        self.reading = {"seconds": round(elapsed, 3),
                        "other_cpu_cores": round(max(busy / hz - own, 0.0) / elapsed, 3),
                        "steal_cores": round(steal / hz / elapsed, 3),
                        "clock_mhz": [self.mhz_before, _clock_mhz()] if self.mhz_before else None,
                        "loadavg_1m": round(os.getloadavg()[0], 2)}
        return False

    @property
    def busy(self) -> bool:
        return self.reading["other_cpu_cores"] + self.reading["steal_cores"] > BUSY_LIMIT_CORES


class Journal:
    """Every finished process of a run, one JSON line each, appended as it ends: a run that is
    interrupted or killed keeps what it measured, and `workbench run --resume` measures only the
    processes that are missing. A line is keyed by the job's fingerprint (everything that defines
    the measurement) and its round; a torn last line, from a kill mid-write, is ignored."""

    def __init__(self, path: Optional[Path]):
        self.path, self.done = path, {}
        if path and path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.done[(rec["job"], rec["round"])] = rec

    # What defines a measurement; not where a child finds plugin modules (sys_path) or writes outputs.
    MEASUREMENT = ("backend", "device", "path", "io", "batch_size", "seq_len", "threads", "timing", "seed")

    @classmethod
    def fingerprint(cls, job: dict) -> str:
        what = {k: job.get(k) for k in cls.MEASUREMENT}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def get(self, job: dict, round_: int) -> Optional[dict]:
        return self.done.get((self.fingerprint(job), round_))

    def add(self, job: dict, round_: int, failed: bool, record: dict) -> None:
        if self.path is None:
            return
        line = json.dumps({"job": self.fingerprint(job), "round": round_, "failed": failed, "record": record})
        with open(self.path, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def measure_in_rounds(jobs: list[tuple[Any, dict]], *, repeats: int, seed: int, timeout_s: float, work_dir: Path,
                      memory_limit_mb: Optional[float], threshold: float,
                      progress: Callable[[Any, int, bool], None] = lambda key, round_, kept: None,
                      journal: Optional[Path] = None) -> dict[Any, dict]:
    """`jobs`: (key, bench.cells job). Returns key -> the cell's measured fields (status, reason,
    latency_ms, throughput, stability, repeats, memory, cold, threads, noise). Only round 0's
    job keeps `eval_inputs`: accuracy comes from one process's outputs. With a `journal` file,
    processes already recorded there are kept, not measured again (progress gets kept=True)."""
    processes: dict[Any, list] = {key: [] for key, _ in jobs}
    failures: dict[Any, dict] = {}
    book = Journal(journal)
    rng = np.random.default_rng(seed)
    for round_ in range(repeats):
        for i in rng.permutation(len(jobs)):
            if stop_requested():  # a Ctrl-C that Python swallowed somewhere still stops the run here
                raise KeyboardInterrupt
            key, job = jobs[int(i)]
            if key in failures:
                progress(key, round_, True)
                continue
            kept = book.get(job, round_)
            if kept:
                (failures.__setitem__(key, kept["record"]) if kept["failed"]
                 else processes[key].append(kept["record"]))
                progress(key, round_, True)
                continue
            spec = {**job, "eval_inputs": None, "outputs_path": None} if round_ else job
            for attempt in range(RETRIES + 1):
                with NoiseMeter() as noise:
                    result = run_cell(spec, timeout_s, work_dir, memory_limit_mb)
                if result["status"] == "failed":
                    failures[key] = {**result, "round": round_}
                    book.add(job, round_, True, failures[key])
                    break
                if noise.busy and attempt < RETRIES:
                    continue
                processes[key].append({**result, "round": round_, "attempts": attempt + 1,
                                       "noise": {**noise.reading, "busy": noise.busy}})
                book.add(job, round_, False, processes[key][-1])
                break
            progress(key, round_, False)
    return {key: (_failed(failures[key], processes[key]) if key in failures
                  else _cell(processes[key], int(job["batch_size"]), threshold))
            for key, job in jobs}


def thin(samples: list) -> dict:
    """The raw samples a results.json keeps of one process: all of them up to KEEP_SAMPLES, else every
    k-th in time order (`samples_stride` k), which keeps their distribution and their drift. The
    cell's own statistics were computed from all of them; a fast cell takes 30,000 samples a second."""
    stride = -(-len(samples) // KEEP_SAMPLES)
    return {"samples_ms": samples[::stride], "samples_stride": stride}


def _failed(failure: dict, done: list) -> dict:
    reason = failure["reason"]
    if done:
        reason += f" (in round {failure['round'] + 1}; {len(done)} earlier process(es) of this cell had finished)"
    return {"status": "failed", "reason": reason}


def _cell(processes: list[dict], batch: int, threshold: float) -> dict:
    stats = combine(processes, batch, threshold)
    first = processes[0]
    repeats = [{"round": p["round"], "p50": round(float(np.median(p["samples_ms"])), 6), "n": len(p["samples_ms"]),
                "started": p["started"], "attempts": p["attempts"], "noise": p["noise"],
                "capped_by_max_seconds": p["capped_by_max_seconds"], **thin(p["samples_ms"]),
                "warmup_ms": p["warmup_ms"], **({"cold": p["cold"]} if i else {})}
               for i, p in enumerate(processes)]
    # Memory is read in a phase that does not depend on timing, so processes agree; the median
    # guards against one that met a page-cache or allocator hiccup.
    memory = {k: int(np.median([p["memory"][k] for p in processes if k in p["memory"]]))
              for k in first["memory"]}
    reason = stats.pop("unstable_reason")
    return {"status": "unstable" if reason else "ok", "reason": reason, **stats, "repeats": repeats,
            "memory": memory, "cold": first["cold"], "threads": first["threads"],
            "noise": {"other_cpu_cores_max": max(p["noise"]["other_cpu_cores"] for p in processes),
                      "steal_cores_max": max(p["noise"]["steal_cores"] for p in processes),
                      "remeasured": sum(p["attempts"] - 1 for p in processes)}}
