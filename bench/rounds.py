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
from typing import Any, Callable, Iterator, Optional

import numpy as np

from bench.cells import run_cell
from bench.protocol import combine
from core.processes import stop_requested

KEEP_SAMPLES = 1000  # raw samples kept per process in results.json (every k-th beyond that, in time order)
# Other processes' CPU (plus steal) above this, in cores, makes a process re-measured. Several Ray
# nodes started on one machine (a cluster rehearsed locally) are each other's noise by construction:
# WORKBENCH_BUSY_LIMIT_CORES raises the limit there; the readings are recorded either way.
BUSY_LIMIT_CORES = float(os.environ.get("WORKBENCH_BUSY_LIMIT_CORES", 0.3))
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
    MEASUREMENT = ("backend", "device", "path", "io", "batch_size", "seq_len", "threads", "timing", "seed", "entry",
                   "new_tokens", "scenario", "options", "prompts_by_len")

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


def measure_process(spec: dict, timeout_s: float, work_dir: Path,
                    memory_limit_mb: Optional[float]) -> tuple[bool, dict]:
    """One process of a cell, with the noise meter around it, measured again (a bounded number of
    times) when the rest of the machine was busy. Returns (failed, record). Runs where the cell
    runs: in the run's own process locally, inside a Ray task on the cell's node (bench.ray_executor).
    `ran` spans every attempt: the time this process held the machine."""
    began = time.time()
    for attempt in range(RETRIES + 1):
        with NoiseMeter() as noise:
            result = run_cell(spec, timeout_s, work_dir, memory_limit_mb)
        if result["status"] == "failed":
            return True, result
        if noise.busy and attempt < RETRIES:
            continue
        return False, {**result, "attempts": attempt + 1, "noise": {**noise.reading, "busy": noise.busy},
                       "ran": [round(began, 3), round(time.time(), 3)]}
    raise AssertionError("unreachable")


class LocalExecutor:
    """Today's executor and the default: every process on this machine, one at a time, in order."""

    name = "local"

    def run_round(self, todo: list[tuple[Any, dict, dict]], round_: int, timeout_s: float, work_dir: Path,
                  memory_limit_mb: Optional[float]) -> Iterator[tuple[Any, bool, dict]]:
        """`todo`: (key, job, spec) in the round's order; yields (key, failed, record) as each ends."""
        for key, job, spec in todo:
            if stop_requested():  # a Ctrl-C that Python swallowed somewhere still stops the run here
                raise KeyboardInterrupt
            failed, record = measure_process(spec, timeout_s, work_dir, memory_limit_mb)
            yield key, failed, record

    def run_once(self, job: dict, timeout_s: float, work_dir: Path, memory_limit_mb: Optional[float],
                 node: Optional[dict] = None) -> dict:
        """One extra process of a cell (its op-level profile), where the cell ran."""
        return run_cell(job, timeout_s, work_dir, memory_limit_mb)

    def pin(self, job: dict, node_id: str) -> None:
        """Where the rest of a cell must run (a resumed run under Ray); one machine here."""

    def describe(self) -> dict:
        return {"name": self.name}

    def close(self) -> None:
        pass


def measure_in_rounds(jobs: list[tuple[Any, dict]], *, repeats: int, seed: int, timeout_s: float, work_dir: Path,
                      memory_limit_mb: Optional[float], threshold: float,
                      progress: Callable[[Any, int, bool], None] = lambda key, round_, kept: None,
                      journal: Optional[Path] = None, executor=None) -> dict[Any, dict]:
    """`jobs`: (key, bench.cells job). Returns key -> the cell's measured fields (status, reason,
    latency_ms, throughput, stability, repeats, memory, cold, threads, noise; node under Ray). Only
    round 0's job keeps `eval_inputs`: accuracy comes from one process's outputs. With a `journal`
    file, processes already recorded there are kept, not measured again (progress gets kept=True; None
    for the later rounds of a cell that failed).
    `executor` runs each round's processes (LocalExecutor by default; bench.ray_executor spreads
    them over a cluster); every round ends before the next starts, wherever its processes ran."""
    executor = executor or LocalExecutor()
    processes: dict[Any, list] = {key: [] for key, _ in jobs}
    failures: dict[Any, dict] = {}
    book = Journal(journal)
    rng = np.random.default_rng(seed)
    by_key = dict(jobs)
    for round_ in range(repeats):
        todo = []
        for i in rng.permutation(len(jobs)):
            if stop_requested():
                raise KeyboardInterrupt
            key, job = jobs[int(i)]
            if key in failures:  # not measured again once it failed: neither kept nor measured
                progress(key, round_, None)
                continue
            kept = book.get(job, round_)
            if kept:
                (failures.__setitem__(key, kept["record"]) if kept["failed"]
                 else processes[key].append(kept["record"]))
                if (kept["record"].get("node") or {}).get("id"):
                    executor.pin(job, kept["record"]["node"]["id"])
                progress(key, round_, True)
                continue
            todo.append((key, job, {**job, "eval_inputs": None, "outputs_path": None} if round_ else job))
        for key, failed, record in executor.run_round(todo, round_, timeout_s, work_dir, memory_limit_mb):
            if failed:
                failures[key] = {**record, "round": round_}
                book.add(by_key[key], round_, True, failures[key])
            else:
                processes[key].append({**record, "round": round_})
                book.add(by_key[key], round_, False, processes[key][-1])
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
    node = failure.get("node") or (done[0].get("node") if done else None)
    return {"status": "failed", "reason": reason, **({"node": node} if node else {})}


def _cell(processes: list[dict], batch: int, threshold: float) -> dict:
    stats = combine(processes, batch, threshold)
    first = processes[0]
    repeats = [{"round": p["round"], "p50": round(float(np.median(p["samples_ms"])), 6), "n": len(p["samples_ms"]),
                "started": p["started"], "attempts": p["attempts"], "noise": p["noise"],
                "capped_by_max_seconds": p["capped_by_max_seconds"], **thin(p["samples_ms"]),
                **({"ran": p["ran"]} if "ran" in p else {}), **({"node": p["node"]["id"]} if p.get("node") else {}),
                **{k: p[k] for k in ("ray_attempts", "ray_task") if k in p},
                "warmup_ms": p["warmup_ms"], **({"cold": p["cold"]} if i else {})}
               for i, p in enumerate(processes)]
    # Memory is read in a phase that does not depend on timing, so processes agree; the median
    # guards against one that met a page-cache or allocator hiccup.
    memory = {k: int(np.median([p["memory"][k] for p in processes if k in p["memory"]]))
              for k in first["memory"]}
    reason = stats.pop("unstable_reason")
    node = first.get("node")  # under Ray: every process of a cell runs on its first process's node
    if "generation" in first:  # a causal LM's cell (bench.generate): latency is per decoded token
        from bench.generate import merge

        stats["generation"] = merge(processes)
    if "load" in first:  # a load scenario's cell (bench.serve): LoadGen's figures, merged over rounds
        from bench.serve import merge as merge_load, stability, unstable_reason

        stats["load"] = merge_load(processes)
        stats.pop("throughput", None)  # batch / latency means nothing under a queue
        # Judged on the rate each round found, not on windows of request latencies (bench.serve.unstable_reason).
        reason = unstable_reason(stats["load"], threshold)
        stats["stability"] = stability(stats["load"], threshold)
    return {"status": "unstable" if reason else "ok", "reason": reason, **({"node": node} if node else {}),
            **stats, "repeats": repeats,
            "memory": memory, "cold": first["cold"], "threads": first["threads"],
            "noise": {"other_cpu_cores_max": max(p["noise"]["other_cpu_cores"] for p in processes),
                      "steal_cores_max": max(p["noise"]["steal_cores"] for p in processes),
                      "remeasured": sum(p["attempts"] - 1 for p in processes)}}
