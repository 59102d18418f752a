"""Where a cell's time goes, op by op: `python -m bench.profile JOB.json`, a process of its own after
the timed ones (a profiler slows what it watches, so its figures never enter the latency numbers).

Each backend profiles with its engine's own profiler (`Backend.profile`, `Backend.profile_generation`
for a causal LM's generation cells); this module runs it and ranks the ops. The figures are
milliseconds per call (per generated token) by op type, which reporting.diagnosis turns into a
plain-words answer to "why isn't this variant faster?"."""
from __future__ import annotations

import sys

PROFILE_CALLS = 20
WARMUP_CALLS = 3
PROFILE_GENERATIONS = 3


def run(job: dict) -> dict:
    import numpy as np

    from core.backends import BACKENDS, engine_kwargs
    from core.model import ModelIO
    from core.processes import import_located

    import_located(job["backend_module"])
    for p in job.get("sys_path", []):
        sys.path.insert(0, p)
    backend, threads = BACKENDS[job["backend"]], int(job["threads"])
    if job.get("new_tokens"):  # a causal LM's generation cell
        out = backend.profile_generation(job["path"], np.asarray(job["prompts"], dtype=np.int64),
                                         int(job["new_tokens"]), threads, PROFILE_GENERATIONS,
                                         **engine_kwargs(backend, job))
        out["per"] = "generated token (prefill included)"
    else:
        inputs = ModelIO.from_json(job["io"]).make(int(job["batch_size"]), int(job["seq_len"]),
                                                   seed=job.get("seed", 0))
        out = backend.profile(job["path"], inputs, threads, PROFILE_CALLS, WARMUP_CALLS, **engine_kwargs(backend, job))
    total = sum(out["by_op_ms"].values())
    top = sorted(out["by_op_ms"].items(), key=lambda kv: -kv[1])
    return {**out, "by_op_ms": {k: round(v, 4) for k, v in top}, "op_total_ms": round(total, 4),
            "calls": PROFILE_CALLS}


def main() -> int:
    from bench.worker import serve

    return serve(run)


if __name__ == "__main__":
    sys.exit(main())
