"""Checks the harness against the simplest honest measurement: `python -m bench.ort_harness_check
MODEL.onnx` alternates a harness cell (bench.cells.run_cell, its own process) with a plain loop of
`InferenceSession.run` (also its own process, same threads, same inputs), several rounds, and
reports both p50s, their ratio, and how far the harness p50s spread across rounds.

Alternating in one session spreads slow drifts of the machine over both sides."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import bench.ort_backends  # noqa: F401 - registers the ONNX Runtime backends this check compares against
from core.processes import child_env, default_threads

PLAIN_LOOP = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
from core.model import ModelIO
path, io_json, batch, seq, threads, iters = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
names = {i.name for i in sess.get_inputs()}
inputs = {k: v for k, v in ModelIO.from_json(json.loads(io_json)).make(batch, seq).items() if k in names}
for _ in range(10):
    sess.run(None, inputs)
samples = []
for _ in range(iters):
    t0 = time.perf_counter()
    sess.run(None, inputs)
    samples.append((time.perf_counter() - t0) * 1e3)
print(json.dumps({"p50": float(np.median(samples)), "n": iters}))
"""


def main(argv=None) -> int:
    from bench.cells import cell_job, run_cell
    from runtime.file_inputs import model_io
    from core import atomic
    from core.environment import fingerprint

    ap = argparse.ArgumentParser(prog="python -m bench.ort_harness_check")
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None, help="write the findings as JSON here")
    args = ap.parse_args(argv)

    path = Path(args.model).resolve()
    io = model_io(path, None)
    timing = {"warmup": 10, "min_iters": args.iters, "min_seconds": 0.0, "max_seconds": 600.0,
              "stability_threshold": 0.25}
    env = child_env(args.threads)
    rounds = []
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            cell = run_cell(cell_job("ort-cpu", path, io.to_json(), args.batch, args.seq_len, args.threads, timing),
                            timeout_s=900, work_dir=Path(work))
            plain = subprocess.run([sys.executable, "-c", PLAIN_LOOP, str(path), json.dumps(io.to_json()),
                                    str(args.batch), str(args.seq_len), str(args.threads), str(args.iters)],
                                   capture_output=True, text=True, env=env, check=True)
            p_plain = json.loads(plain.stdout.strip().splitlines()[-1])["p50"]
            if cell["status"] != "ok":
                raise SystemExit(f"the harness cell failed: {cell['reason']}")
            p_harness = float(np.median(cell["samples_ms"]))  # one process: its own median
            rounds.append({"harness_p50_ms": p_harness, "plain_p50_ms": p_plain, "ratio": p_harness / p_plain,
                           "harness_status": cell["status"]})
            print(f"round {r + 1}: harness p50 {p_harness:.3f} ms | plain loop p50 {p_plain:.3f} ms | "
                  f"ratio {p_harness / p_plain:.3f}")
    h = np.array([x["harness_p50_ms"] for x in rounds])
    summary = {"model": str(path), "batch": args.batch, "seq_len": args.seq_len, "threads": args.threads,
               "rounds": rounds, "max_abs_ratio_deviation": float(max(abs(x["ratio"] - 1) for x in rounds)),
               "harness_p50_spread": float((h.max() - h.min()) / np.median(h)), "environment": fingerprint(args.threads)}
    print(f"harness vs plain loop: worst deviation {summary['max_abs_ratio_deviation']:.1%}; "
          f"harness p50 spread across rounds {summary['harness_p50_spread']:.1%}")
    if args.out:
        atomic.write_json(Path(args.out), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
