"""`workbench bench MODEL_FILE`: benchmark one model file without a recipe. Inputs come from the
file's declared inputs (ONNX), or from the `<file>.io.json` that `workbench run` writes beside each
export, or from `--input name=dims:dtype`. Writes a results.json of the run schema and a report."""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from workbench import atomic
from workbench.errors import RecipeError
from workbench.model import ModelIO

ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
             "tensor(int32)": "int32"}


def io_from_onnx(path: Path) -> ModelIO:
    """Symbolic first dimension -> batch, other symbolic dimensions -> seq. Integer inputs named like
    masks get ones; other integer inputs (token ids) get values below 1000, valid in any vocabulary."""
    from workbench.infer import onnx_session

    sess = onnx_session(path)
    inputs = {}
    for i in sess.get_inputs():
        if i.type not in ORT_TYPES:
            raise RecipeError(f"{path}: input {i.name!r} has type {i.type}; supported: {sorted(ORT_TYPES)}")
        dims = []
        for k, d in enumerate(i.shape):
            dims.append(d if isinstance(d, int) else ("batch" if k == 0 else "seq"))
        dtype = ORT_TYPES[i.type]
        spec = {"shape": dims, "dtype": dtype}
        if dtype.startswith("int"):
            spec.update(low=1, high=2) if "mask" in i.name else spec.update(low=0, high=1000)
        inputs[i.name] = spec
    return ModelIO(inputs=inputs, kind="embedding", output=sess.get_outputs()[0].name)


def parse_input(text: str) -> tuple[str, dict]:
    """`name=batch,3,224,224:float32` -> ("name", {"shape": [...], "dtype": ...})."""
    try:
        name, rest = text.split("=", 1)
        dims, _, dtype = rest.partition(":")
        shape = [d if d in ("batch", "seq") else int(d) for d in dims.split(",")]
    except ValueError:
        raise RecipeError(f"--input {text!r}: expected name=dims:dtype, e.g. pixels=batch,3,224,224:float32") from None
    dtype = dtype or "float32"
    if dtype not in ("float32", "float16", "int64", "int32"):
        raise RecipeError(f"--input {text!r}: dtype {dtype!r}; accepted: float32, float16, int64, int32")
    return name, {"shape": shape, "dtype": dtype, "low": 0, "high": 2}


def model_io(path: Path, inputs: list[str] | None) -> ModelIO:
    if inputs:
        return ModelIO(inputs=dict(parse_input(t) for t in inputs), kind="embedding")
    sidecar = path.with_name(path.name + ".io.json")
    if sidecar.exists():
        import json

        return ModelIO.from_json(json.loads(sidecar.read_text()))
    if path.suffix == ".onnx":
        return io_from_onnx(path)
    raise RecipeError(f"{path}: a TorchScript or .pt2 file declares no input shapes; give --input name=dims:dtype "
                      f"(e.g. --input pixels=batch,1,8,8:float32)")


def bench_file(args) -> int:
    from bench.backends import BACKENDS, unavailable
    from bench.cells import cell_job, run_cell
    from bench.report import write_report
    from workbench.environment import fingerprint
    from workbench.pipeline import quick_timing
    from workbench.recipe import BenchSpec, Timing

    path = Path(args.model_file)
    if not path.is_file():
        raise RecipeError(f"MODEL_FILE {str(path)!r}: no such file")
    fmt = {".onnx": "onnx", ".pt2": "torch-export"}.get(path.suffix, "torchscript")
    backends = args.backend or [{"onnx": "ort-cpu", "torch-export": "torch-export-cpu"}.get(fmt, "torchscript-cpu")]
    for b in backends:
        if b not in BACKENDS:
            raise RecipeError(f"--backend {b!r} is not a backend. Accepted: {', '.join(BACKENDS)}")
        if BACKENDS[b].format != fmt:
            ok = [n for n, i in BACKENDS.items() if i.format == fmt]
            raise RecipeError(f"--backend {b!r} runs {BACKENDS[b].format} files, not {fmt}. Accepted for "
                              f"{path.name}: {', '.join(ok)}")
    if any(n <= 0 for n in args.batch):
        raise RecipeError(f"--batch {args.batch}: batch sizes must be positive")
    io = model_io(path, getattr(args, "input", None))
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    timing = quick_timing(Timing()) if args.quick else Timing().model_dump()
    out = Path(args.out) if args.out else Path("reports") / "bench" / path.stem / dt.datetime.now().strftime(
        "%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    name = path.stem
    cells = []
    for b in backends:
        for n in args.batch:
            info = BACKENDS[b]
            cell = {"variant": name, "format": fmt, "backend": b, "device": info.device, "batch_size": n,
                    "shape": {"seq_len": args.seq_len if io.has_seq() else None}, "status": None, "reason": None}
            why = unavailable(b)
            if why:
                cell.update(status="skipped", reason=why)
            else:
                cell.update(run_cell(cell_job(b, path.resolve(), io.to_json(), n, args.seq_len, threads, timing),
                                     timeout_s=900, work_dir=out / ".work"))
            cells.append(cell)
            lat = cell.get("latency_ms")
            print(f"{b:18} batch {n:4}  " + (f"p50 {lat['p50']:.3f} ms  p95 {lat['p95']:.3f} ms  "
                                             f"{cell['throughput']:.1f} items/s  {cell['status']}" if lat
                                             else f"{cell['status']}: {cell['reason']}"))
    bench_spec = BenchSpec(backends=backends, batch_sizes=args.batch, seq_len=args.seq_len, threads=threads)
    results = {
        "schema_version": 1,
        "recipe": {"name": f"bench {path.name}", "path": None, "sha256": None,
                   "parsed": {"bench": bench_spec.model_dump(mode="json"),
                              "report": {"baseline": name, "constraints": {}}}},
        "environment": fingerprint(threads),
        "model": {"description": str(path), "io": io.to_json()},
        "task": {"type": "none", "description": "no task: latency and memory only", "primary": None,
                 "eval_size": 0},
        "timing": timing, "started": started,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "quick": bool(args.quick),
        "variants": [{"name": name, "parent": None, "steps": [], "status": "ok", "error": None, "format": fmt,
                      "size_bytes": path.stat().st_size}],
        "artifacts": [], "cells": cells,
    }
    atomic.write_json(out / "results.json", results)
    write_report(out)
    print(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}")
    return 0
