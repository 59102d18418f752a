"""Runs one cell in a child process and turns whatever happens (result, crash, time-out) into a
cell record. Nothing a cell does can stop the run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from workbench import atomic


def cell_job(backend: str, path, io_json: dict, batch: int, seq_len: int, threads: int, timing: dict, *,
             seed: int = 0, eval_inputs=None, outputs_path=None, sys_path=()) -> dict:
    """The job a worker runs: everything it needs, as JSON (see bench.worker)."""
    from bench.backends import BACKENDS

    return {"backend": backend, "device": BACKENDS[backend].device, "path": str(path), "io": io_json,
            "batch_size": batch, "seq_len": seq_len, "threads": threads, "timing": timing, "seed": seed,
            "eval_inputs": str(eval_inputs) if eval_inputs else None,
            "outputs_path": str(outputs_path) if outputs_path else None, "sys_path": list(sys_path)}


def run_cell(job: dict, timeout_s: float, work_dir: Path) -> dict:
    """Run `job` (see bench.worker) and return {"status": ..., "reason": ..., **measurements}."""
    work_dir.mkdir(parents=True, exist_ok=True)
    fd, job_path = tempfile.mkstemp(prefix="job-", suffix=".json", dir=work_dir)
    os.close(fd)
    result_path = Path(job_path).with_suffix(".result.json")
    job = {**job, "result_path": str(result_path)}
    atomic.write_json(Path(job_path), job)
    threads = str(job["threads"])
    # Thread pools read these at start-up; set them before the child imports anything.
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.worker", job_path], capture_output=True, text=True,
                              timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"the cell did not finish within {timeout_s:g} s (bench.cell_timeout_s)"}
    finally:
        os.unlink(job_path)
    if proc.returncode != 0 or not result_path.exists():
        return {"status": "failed", "reason": _failure_reason(proc)}
    result = json.loads(result_path.read_text())
    result_path.unlink()
    unstable = not result["stability"]["stable"]
    reason = None
    if unstable:
        s = result["stability"]
        reason = (f"latency did not settle: medians of {len(s['window_medians_ms'])} consecutive windows spread "
                  f"{s['window_spread']:.0%} (threshold {s['threshold']:.0%})")
    return {"status": "unstable" if unstable else "ok", "reason": reason, **result}


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
