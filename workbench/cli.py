"""The `workbench` command. Exit codes: 0 the run finished (failed cells are in the report),
2 the recipe or the arguments are invalid, 3 `compare --fail-if-slower` found a slower cell,
130 interrupted (SIGINT / SIGTERM; the run directory says so and can be resumed), 1 anything else."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional

from core.errors import RecipeError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 too; keep its message one line, without usage noise
        raise RecipeError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="workbench", description="Compress, export and benchmark PyTorch models from a recipe.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run a recipe end to end and write its report")
    r.add_argument("recipe", nargs="?", help="the recipe file (not with --resume)")
    r.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="finish an interrupted or killed run in place: only the missing measurements are made")
    r.add_argument("--out", default="reports", help="root folder of run directories (default: reports)")
    r.add_argument("--quick", action="store_true", help="shrink timing and training budgets for a smoke run")
    r.add_argument("--executor", choices=["local", "ray"], default=None,
                   help="where cell processes run (default: the recipe's bench.executor, else local): ray runs each "
                   "one as a Ray task")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --executor ray: join the cluster there (what `ray start --head` prints); "
                   "default: start a local Ray instance")

    v = sub.add_parser("validate", help="check a recipe, then load its model and data as a run would first; "
                       "compress and measure nothing")
    v.add_argument("recipe")
    v.add_argument("--recipe-only", action="store_true",
                   help="check the recipe file alone: do not load the model or read the data files")

    rep = sub.add_parser("report", help="rebuild a run's report from its results.json")
    rep.add_argument("run_dir")

    sg = sub.add_parser("suggest", help="write RUN_DIR/suggested.yaml: the run's recipe plus a variant for every "
                        "fix its report's diagnosis names, so the next run measures the advice")
    sg.add_argument("run_dir")

    b = sub.add_parser("bench", help="benchmark one model file (.onnx, TorchScript .pt, torch.export .pt2) "
                       "without a recipe")
    b.add_argument("model_file")
    b.add_argument("--backend", nargs="+", default=None,
                   help="backends (default: the first CPU backend that runs the file's format; `workbench list` "
                   "names them)")
    b.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes")
    b.add_argument("--seq-len", type=int, default=128)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--out", default=None, help="folder for results.json (default: reports/bench/<file>/<time>)")
    b.add_argument("--input", action="append", default=None, metavar="NAME=DIMS:DTYPE",
                   help="declare an input (needed for TorchScript / .pt2 files without a .io.json), "
                   "e.g. pixels=batch,1,8,8:float32; repeat for several")
    b.add_argument("--quick", action="store_true")

    c = sub.add_parser("compare", help="side-by-side of two runs, with which differences are significant")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.add_argument("--margin", default="5%", help="changes whose 95%% interval stays within this are noise")
    c.add_argument("--fail-if-slower", default=None, metavar="PCT",
                   help="exit 3 when a cell is slower by more than PCT (its whole interval), e.g. 5%%")
    c.add_argument("--out", default=None, help="folder for compare.md/json/png (default: RUN_B/compare-vs-A)")

    sv = sub.add_parser("sensitivity", help="per-node quantization sensitivity (int8 or weight-only) of a variant whose last step "
                        "measures it (`workbench list` names the steps), and the fewest nodes to keep in float for a "
                        "fidelity target")
    sv.add_argument("recipe")
    sv.add_argument("--variant", required=True)
    sv.add_argument("--target", type=float, default=None, help="fidelity (cosine to the float graph) to reach")
    sv.add_argument("--out", default="reports", help="root folder (default: reports)")
    sv.add_argument("--quick", action="store_true")

    sub.add_parser("list", help="steps, backends, built-in models and data, and which backends run here")
    return p


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from core.processes import clear_stop, request_stop

    # SIGTERM (a scheduler, `kill`) ends a run as Ctrl-C does: recorded as interrupted, resumable.
    saved = {}
    clear_stop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            saved[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread (an embedding application): leave its handlers alone
            pass
    try:
        args = build_parser().parse_args(argv)
        return _dispatch(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished variants are cached and measured processes kept; "
              "`workbench run --resume RUN_DIR` finishes the run", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence prints a message, not a traceback
        if os.environ.get("WORKBENCH_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set WORKBENCH_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_command(recipe=None, out="reports", *, quick: bool = False, executor: Optional[str] = None,
                ray_address: Optional[str] = None, resume=None) -> Path:
    """`workbench run` with plain arguments, shared by the command line and `workbench.api.run`: run
    `recipe` (a recipe file's path, or a `workbench.recipe.Recipe` already loaded) into a new run
    directory under `out`, or with `resume` (a run directory) finish an interrupted run in place.
    `executor` / `ray_address` override the recipe's bench.executor / bench.ray_address. Returns the
    run directory. Raises RecipeError for an invalid recipe or arguments; prints nothing itself and
    leaves signal handling to its caller (`main` turns SIGINT / SIGTERM into a resumable stop)."""
    from bench.executors import EXECUTORS
    from workbench.pipeline import resume_run, run_recipe
    from workbench.recipe import Recipe, load_recipe

    if bool(recipe) == bool(resume):
        raise RecipeError("workbench run: give a recipe file, or --resume RUN_DIR (not both)")
    if resume:
        return resume_run(Path(resume))
    if executor is not None and executor not in EXECUTORS:
        raise RecipeError(f"workbench run: unknown executor {executor!r}. Accepted: {', '.join(EXECUTORS)}")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if ray_address and (executor or recipe.bench.executor) != "ray":
        raise RecipeError("workbench run: --ray-address goes with --executor ray (or bench.executor: ray)")
    if executor:
        recipe.bench.executor = executor
    if ray_address:
        recipe.bench.ray_address = ray_address
    from workbench.run_dir import writable_folder

    writable_folder(out, "--out")  # last of the checks: it makes the folder
    return run_recipe(recipe, Path(out), quick=quick)


def _dispatch(args) -> int:
    from workbench.recipe import load_recipe

    if args.command == "validate":
        recipe = load_recipe(args.recipe)
        print(f"{args.recipe}: valid ({len(recipe.variants)} variants, backends {', '.join(recipe.all_backends())})")
        if not args.recipe_only:  # what `run` checks before its run folder: the model and the data it reads
            from workbench.pipeline import Run

            run = Run(recipe)
            run.load()
            print(f"  model: {run.src.description}")
            print(f"  task: {run.task.description}")
        return 0
    if args.command == "run":
        run_dir = run_command(args.recipe, args.out, quick=args.quick, executor=args.executor,
                              ray_address=args.ray_address, resume=args.resume)
        print(f"report: {run_dir / 'report.md'}")
        print(f"        {run_dir / 'report.html'}")
        return 0
    if args.command == "suggest":
        from workbench import plugins
        from workbench.suggest import write_suggested

        plugins.load()
        path, found = write_suggested(Path(args.run_dir))
        for s in found:
            print(f"  {s['name']:32} for {s['for']}: {s['kind']}")
        print(f"{len(found)} suggested variant(s) in {path}" + (f"\nrun them: workbench run {path}" if found else ""))
        return 0
    if args.command == "report":
        run_dir = Path(args.run_dir)
        from reporting.analysis import read_results

        read_results(run_dir)  # a folder that is not a finished run is said so, by what it is
        from reporting.report import write_report
        from workbench import plugins

        plugins.load()  # the report asks the step and backend registries what their names mean
        write_report(run_dir)
        print(f"report: {run_dir / 'report.md'}")
        return 0
    if args.command == "bench":
        from workbench.standalone import bench_file

        bench_file(args.model_file, backends=args.backend, batch_sizes=args.batch, seq_len=args.seq_len,
                   threads=args.threads, inputs=args.input, out=args.out, quick=args.quick)
        return 0
    if args.command == "compare":
        from reporting.compare import run_compare

        return run_compare(args)
    if args.command == "sensitivity":
        from workbench.sensitivity import run_sensitivity

        if args.target is not None and not 0 < args.target <= 1:
            raise RecipeError(f"--target {args.target}: a fidelity in (0, 1], e.g. 0.999")
        run_dir = run_sensitivity(load_recipe(args.recipe), args.variant, args.target, Path(args.out), args.quick)
        print(f"sensitivity: {run_dir / 'sensitivity.md'}")
        return 0
    if args.command == "list":
        return _list()
    raise RecipeError(f"unknown command {args.command!r}")


def _list() -> int:
    from core.backends import BACKENDS
    from core.formats import FORMATS
    from core.steps import describe_steps
    from workbench import plugins

    plugins.load()
    from core.environment import versions

    print("steps (recipe `variants.<name>.steps`):")
    steps = describe_steps()
    width = max(len(s[0]) for s in steps)
    for name, consumes, produces, summary in steps:
        print(f"  {name:{width}} {consumes:>5} -> {consumes if produces == 'same' else produces:5}  {summary}")
    print("\nbackends (recipe `bench.backends`; engine versions installed here):")
    for name, cls in BACKENDS.items():
        why = cls.unavailable()
        installed = ", ".join(f"{k} {v}" for k, v in versions(list(cls.libraries)).items() if v)
        print(f"  {name:20} {'usable here' if why is None else 'not here: ' + why}"
              + (f"  [{installed}]" if installed else ""))
    print("\nexport formats (recipe `export.formats`):")
    for name, cls in FORMATS.items():
        print(f"  {name:14} {cls.file_name:22} {cls.summary}")
    print("\nbuilt-in models: digits-cnn (classifier, 1x8x8), minilm-l6 (sentence embeddings), docstring-gpt "
          "(causal LM)")
    print("built-in data:   digits (classification), stdlib-docstrings (embedding-fidelity, language-modeling)")
    external = plugins.external()
    print(f"\nplugins (entry points `{plugins.GROUP}`): "
          + (", ".join(f"{n} = {v}" for n, v in external) if external else "none installed"))
    for name, value, why in plugins.FAILED:
        print(f"  {name} ({value}) failed to load: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
