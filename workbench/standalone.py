"""`workbench bench MODEL_FILE`: benchmark one model file without a recipe. Inputs come from the
file's declared inputs (ONNX), or from the `<file>.io.json` that `workbench run` writes beside each
export, or from `--input name=dims:dtype`. Writes a results.json of the run schema and a report."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from core.errors import RecipeError
from runtime.file_inputs import model_io
from core.processes import default_threads
from workbench import results

def bench_file(args) -> int:
    import bench.backends  # noqa: F401 - registers the shipped backends
    from bench.cells import cell_job
    from bench.rounds import measure_in_rounds
    from core.backends import BACKENDS
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
    threads = args.threads or default_threads()
    timing = results.quick_timing(Timing()) if args.quick else Timing().model_dump()
    out = Path(args.out) if args.out else Path("reports") / "bench" / path.stem / dt.datetime.now().strftime(
        "%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started = results.now()
    name = path.stem
    cells, jobs = [], []
    for b in backends:
        for n in args.batch:
            cls = BACKENDS[b]
            cell = {"variant": name, "format": fmt, "backend": b, "device": cls.device, "batch_size": n,
                    "shape": {"seq_len": args.seq_len if io.has_seq() else None}, "status": None, "reason": None}
            why = cls.unavailable()
            if why:
                cell.update(status="skipped", reason=why)
            else:
                jobs.append((len(cells), cell_job(b, path.resolve(), io.to_json(), n, args.seq_len, threads, timing)))
            cells.append(cell)
    repeats = 2 if args.quick else 3
    measured = measure_in_rounds(jobs, repeats=repeats, seed=0, timeout_s=900, work_dir=out / ".work",
                                 memory_limit_mb=None, threshold=Timing().stability_threshold)
    for i, _ in jobs:
        cells[i].update(measured[i])
    for cell in cells:
        lat = cell.get("latency_ms")
        print(f"{cell['backend']:18} batch {cell['batch_size']:4}  " + (
            f"p50 {lat['p50']:.3f} ms [{lat['ci95'][0]:.3f}, {lat['ci95'][1]:.3f}] over {lat['processes']} processes  "
            f"{cell['throughput']:.1f} items/s  {cell['status']}" if lat else f"{cell['status']}: {cell['reason']}"))
    bench_spec = BenchSpec(backends=backends, batch_sizes=args.batch, seq_len=args.seq_len, threads=threads,
                           repeats=repeats)
    # The same document a recipe run writes: a one-variant "recipe" named after the file.
    results.write_results(
        out, threads=threads, started=started, quick=bool(args.quick), timing=timing,
        recipe={"name": f"bench {path.name}", "path": None, "sha256": None,
                "parsed": {"bench": bench_spec.model_dump(mode="json"),
                           "report": {"baseline": name, "constraints": {}}}},
        model={"description": str(path), "io": io.to_json()},
        task={"type": "none", "description": "no task: latency and memory only", "primary": None, "eval_size": 0},
        variants=[{"name": name, "parent": None, "steps": [], "status": "ok", "error": None, "format": fmt,
                   "size_bytes": path.stat().st_size}],
        artifacts=[], cells=cells)
    print(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}")
    return 0
