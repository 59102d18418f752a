"""Runs one measuring process of a cell (bench.worker) and turns whatever happens (raw result, crash,
time-out, memory limit) into a record. Nothing a cell does can stop the run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core import atomic
from core.processes import MB, child_env, locate, memory_bytes


def cell_job(backend: str, path, io_json: dict, batch: int, seq_len: int, threads: int, timing: dict, *,
             seed: int = 0, eval_inputs=None, outputs_path=None, sys_path=(), options=None) -> dict:
    """The job a worker runs: everything it needs, as JSON (see bench.worker). `options`: the backend's engine
    options over its measuring protocol ({}: the protocol alone); None: the engine's own defaults."""
    from core.backends import BACKENDS  # filled by the caller (workbench.plugins.load)

    cls = BACKENDS[backend]
    return {"backend": backend, "backend_module": locate(cls), "device": cls.device, "path": str(path),
            "io": io_json,
            "batch_size": batch, "seq_len": seq_len, "threads": threads, "timing": timing, "seed": seed,
            "eval_inputs": str(eval_inputs) if eval_inputs else None,
            "outputs_path": str(outputs_path) if outputs_path else None, "sys_path": list(sys_path),
            "options": options}


def run_cell(job: dict, timeout_s: float, work_dir: Path, memory_limit_mb: float | None = None) -> dict:
    """Run `job` (see bench.worker) once: {"status": "ok", "reason": None, **raw measurements} or
    {"status": "failed", "reason": ...}."""
    work_dir.mkdir(parents=True, exist_ok=True)
    fd, job_path = tempfile.mkstemp(prefix="job-", suffix=".json", dir=work_dir)
    os.close(fd)
    result_path = Path(job_path).with_suffix(".result.json")
    job = {**job, "result_path": str(result_path)}
    atomic.write_json(Path(job_path), job)
    env = child_env(int(job["threads"]))
    try:
        entry = job.get("entry", "bench.worker")  # bench.profile for a cell's op-level profile
        proc, over = _supervise([sys.executable, "-m", entry, job_path], env, timeout_s, memory_limit_mb)
    finally:
        os.unlink(job_path)
    if proc is None:
        return {"status": "failed", "reason": f"the cell did not finish within {timeout_s:g} s (bench.cell_timeout_s)"}
    if over is not None:
        return {"status": "failed", "reason": f"the cell's process exceeded bench.memory_limit_mb "
                                              f"({memory_limit_mb:g} MB; RSS reached {over / MB:.0f} MB) and was killed"}
    if proc.returncode != 0 or not result_path.exists():
        return {"status": "failed", "reason": _failure_reason(proc)}
    result = json.loads(result_path.read_text())
    result_path.unlink()
    return {"status": "ok", "reason": None, **result}  # raw samples: bench.rounds makes the statistics


def _supervise(cmd, env, timeout_s: float, memory_limit_mb):
    """Run the worker, polling its RSS so a cell over its memory limit is killed and named as such
    (an OOM kill of the whole machine would take the run with it). Returns (completed, rss_over)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        try:
            deadline = time.monotonic() + timeout_s
            over = None
            while child.poll() is None:
                if time.monotonic() > deadline:
                    child.kill()
                    child.wait()
                    return None, None
                if memory_limit_mb is not None:
                    rss = memory_bytes("VmRSS", child.pid)
                    if rss > memory_limit_mb * MB:
                        child.kill()
                        child.wait()
                        over = rss
                        break
                time.sleep(0.02)
        except BaseException:  # interrupted (SIGINT): the measurement stops with the run
            child.kill()
            child.wait()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, child.returncode, out.read(), err.read()), over


def _failure_reason(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode < 0:
        import signal

        sig = signal.Signals(-proc.returncode).name
        why = " (killed: out of memory?)" if sig == "SIGKILL" else ""
        return f"the cell's process died with {sig}{why}"
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    # The last line of a Python traceback names the exception; that is the reason a person needs.
    last = lines[-1] if lines else f"exit code {proc.returncode}, no message"
    return last[:500]
