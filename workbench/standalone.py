"""`workbench bench MODEL_FILE`: benchmark one model file without a recipe. Inputs come from the
file's declared inputs (ONNX), or from the `<file>.io.json` that `workbench run` writes beside each
export, or from `--input name=dims:dtype`. Writes a results.json of the run schema and a report."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from core.errors import RecipeError
from runtime.file_inputs import load_onnx, model_io
from core.processes import default_threads
from workbench import results

def bench_file(path, *, backends=None, batch_sizes=(1,), seq_len: int = 128, threads=None, inputs=None, out=None,
               quick: bool = False, echo: bool = True) -> Path:
    """Measure the file at `path` on `backends` (default: the first CPU backend that runs its format) at
    each batch size; write results.json and the report into `out` (default reports/bench/<file>/<time>)
    and return that folder. `inputs`: ["NAME=DIMS:DTYPE", ...] where the file does not declare them."""
    from bench.plan import Target, plan
    from bench.rounds import measure_in_rounds
    from core.backends import BACKENDS, default_for_format
    from core.formats import format_for_file, suffixes_accepted
    from workbench import plugins
    from workbench.recipe import BenchSpec, Timing

    plugins.load()
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"MODEL_FILE {str(path)!r}: no such file")
    fmt = format_for_file(path)
    if fmt is None:
        raise RecipeError(f"MODEL_FILE {str(path)!r}: no export format here reads files named like this. Accepted "
                          f"suffixes: {', '.join(suffixes_accepted())}")
    default = default_for_format(fmt)
    backends = list(backends or ([default] if default else []))
    if not backends:
        raise RecipeError(f"MODEL_FILE {str(path)!r}: no backend here runs {fmt} files")
    for b in backends:
        if b not in BACKENDS:
            raise RecipeError(f"--backend {b!r} is not a backend. Accepted: {', '.join(BACKENDS)}")
        if BACKENDS[b].format != fmt:
            ok = [n for n, i in BACKENDS.items() if i.format == fmt]
            raise RecipeError(f"--backend {b!r} runs {BACKENDS[b].format} files, not {fmt}. Accepted for "
                              f"{path.name}: {', '.join(ok)}")
    batch_sizes = list(batch_sizes)
    if not batch_sizes or any(n <= 0 for n in batch_sizes):
        raise RecipeError(f"--batch {batch_sizes}: batch sizes must be positive")
    if threads is not None and threads <= 0:
        raise RecipeError(f"--threads {threads}: a number of threads is 1 or more (default: every core, "
                          f"{default_threads()} here)")
    sess = load_onnx(path) if fmt == "onnx" else None  # read once, for the inputs and the check
    io = model_io(path, inputs, sess)
    check_runs(path, fmt, io, sess)
    del sess  # the cells load the file in their own processes
    if out is not None:
        from workbench.run_dir import writable_folder

        writable_folder(out, "--out")
    threads = threads or default_threads()
    timing = results.quick_timing(Timing()) if quick else Timing().model_dump()
    out = Path(out) if out else Path("reports") / "bench" / path.stem / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started = results.now()
    name = path.stem
    target = Target(name, {fmt: {"status": "ok", "reason": None, "path": str(path.resolve())}})
    cells, jobs = plan([target], lambda _: backends, batch_sizes, io=io, seq_len=seq_len, threads=threads,
                       timing=timing)
    repeats = 2 if quick else 3
    measured = measure_in_rounds(jobs, repeats=repeats, seed=0, timeout_s=900, work_dir=out / ".work",
                                 memory_limit_mb=None, threshold=Timing().stability_threshold)
    for i, _ in jobs:
        cells[i].update(measured[i])
    for cell in cells if echo else ():
        lat = cell.get("latency_ms")
        print(f"{cell['backend']:18} batch {cell['batch_size']:4}  " + (
            f"p50 {lat['p50']:.3f} ms [{lat['ci95'][0]:.3f}, {lat['ci95'][1]:.3f}] over {lat['processes']} processes  "
            f"{cell['throughput']:.1f} items/s  {cell['status']}" if lat else f"{cell['status']}: {cell['reason']}"))
    bench_spec = BenchSpec(backends=backends, batch_sizes=batch_sizes, seq_len=seq_len, threads=threads,
                           repeats=repeats)
    # The same document a recipe run writes: a one-variant "recipe" named after the file.
    results.write_results(
        out, threads=threads, started=started, quick=bool(quick), timing=timing,
        recipe={"name": f"bench {path.name}", "path": None, "sha256": None,
                "parsed": {"bench": bench_spec.model_dump(mode="json"),
                           "report": {"baseline": name, "constraints": {}}}},
        model={"description": str(path), "io": io.to_json()},
        task={"type": "none", "description": "no task: latency and memory only", "primary": None, "eval_size": 0},
        variants=[{"name": name, "parent": None, "steps": [], "status": "ok", "error": None, "format": fmt,
                   "size_bytes": path.stat().st_size}],
        artifacts=[], cells=cells)
    if echo:
        print(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}")
    return out


def check_runs(path: Path, fmt: str, io, sess=None) -> None:
    """Load the file here and call it once at batch 1, before any cell: a file that is not what its name says
    (a state_dict saved as .pt, a CSV named .onnx) or inputs it does not take are the command's to fix (a
    RecipeError naming them), not a failed cell with the engine's last sentence in it. `sess`: the ONNX file's
    session where the caller loaded it already."""
    from core.errors import one_line

    x = io.make(1, 16, seed=0)
    shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in x.items())
    if fmt == "onnx":
        sess = sess or load_onnx(path)
        declared = {i.name: i.shape for i in sess.get_inputs()}
        if any(n.startswith("past_key_values") for n in declared):
            raise RecipeError(f"MODEL_FILE {str(path)!r} is a decoder graph with a key/value cache (past_key_values.*): "
                              "`workbench bench` times one call on fixed inputs, and a language model is measured by "
                              "generation (time to first token, per-token decode) in a recipe: model: {source: hf, "
                              "path: FOLDER, head: causal-lm}")
        wrong = sorted(set(x) ^ set(declared))
        if wrong:
            raise RecipeError(f"--input: the graph's inputs are {declared}; given {sorted(x)}. Name each of the "
                              "graph's inputs once, or leave --input out to use the graph's own declaration")
        try:
            sess.run(None, x)
        except Exception as e:  # noqa: BLE001
            raise RecipeError(f"MODEL_FILE {str(path)!r} does not run on {shapes}: the graph declares {declared} "
                              f"({one_line(e, 300)})") from None
    elif fmt in ("torchscript", "torch-export"):
        import torch

        try:
            module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
        except Exception as e:  # noqa: BLE001
            what = "TorchScript (torch.jit.save)" if fmt == "torchscript" else "a torch.export program (.pt2)"
            try:
                torch.load(str(path), weights_only=True, map_location="cpu")
                hint = (" It is a state_dict or checkpoint saved with torch.save: benchmark it through a recipe "
                        "(model.source: python with model.checkpoint), or save torch.jit.trace(model, example) first")
            except Exception:  # noqa: BLE001
                hint = ""
            raise RecipeError(f"MODEL_FILE {str(path)!r}: not {what} ({one_line(e, 200)}).{hint}") from None
        try:
            with torch.inference_mode():
                module(**{k: torch.from_numpy(v) for k, v in x.items()})
        except Exception as e:  # noqa: BLE001
            raise RecipeError(f"MODEL_FILE {str(path)!r} does not run on {shapes} (from --input or its .io.json): "
                              f"{one_line(e, 300)}") from None
