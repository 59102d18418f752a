"""The Python API: what the `workbench` command does, for notebooks and CI scripts, returning data
instead of printing it and raising instead of exiting.

    from workbench import api

    result = api.run("recipes/quickstart.yaml", quick=True)   # or a dict: the parsed recipe
    result.cells[["variant", "backend", "batch_size", "latency_ms.p50"]]  # a pandas DataFrame
    result.recommendation     # Recommended(variant=..., backend=..., speedup=..., ...) or None
    result.report             # reports/<name>/<run id>/report.html

    bench = api.bench_file("model.onnx", batch_sizes=(1, 8), quick=True)  # one model file, no recipe
    diff = api.compare("reports/<name>/<an earlier run id>", result)      # what `workbench compare` says
    assert diff["verdict"]["same_recommendation"] and not diff["significant"]

`run` and `bench_file` go through the same functions as `workbench run` and `workbench bench`
(`workbench.cli.run_command`, `workbench.standalone.bench_file`), and `compare` through the one behind
`workbench compare` (`reporting.compare.compare_runs`), so a run made here is the run the command makes.
An invalid recipe or argument raises `core.errors.RecipeError` (its message names the field and what
is accepted); a failing variant or cell does not raise: it is in `results` and the report, as on the
command line.

Unlike the command, the API installs no signal handler: Ctrl-C (a notebook's interrupt) raises
KeyboardInterrupt in the run, which records the run as interrupted (`workbench run --resume RUN_DIR`
finishes it, for a recipe given as a file). It leaves the caller's process as it found it: the
variables the run sets for its libraries (HF_HUB_OFFLINE, TOKENIZERS_PARALLELISM, unless already
set) are put back when it returns (a library first imported during the run keeps what it read then),
so is torch's thread count, and neither importing this module nor drawing the report touches
matplotlib's backend (the plots are drawn on figures of their own, not through pyplot).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

from core.errors import RecipeError

if TYPE_CHECKING:  # pandas and the recipe's models load with the first call, not with the import
    import pandas as pd

__all__ = ["RunResult", "Recommended", "run", "bench_file", "compare", "load_run", "RecipeError"]

# What `workbench` sets for its libraries (the workbench runs offline); the API sets them for the call only.
_RUN_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Recommended:
    """The report's recommendation (`reporting.analysis.recommend`): the fastest cell meeting the
    recipe's `report.constraints` at `batch_size`. `speedup` is its p50 against the baseline's on
    the same backend and batch, paired by round, with its 95% interval (None where not measurable)."""
    variant: str
    backend: str
    batch_size: int
    p50_ms: float
    p50_ci95: tuple
    speedup: Optional[float]
    speedup_ci95: Optional[tuple]
    metric: Optional[str]  # the task's primary metric, and this cell's score in it
    score: Optional[float]
    unstable: bool
    rules: tuple  # the constraints as applied, in words
    # Against the fastest reference variant at each batch size (results.json's `recommendation.vs_reference`).
    vs_reference: tuple = ()


@dataclass
class RunResult:
    """A finished run directory, read back: `results` is its results.json, `cells` one row per
    cell flattened as in results.csv (columns such as `variant`, `backend`, `batch_size`, `status`,
    `latency_ms.p50`, `latency_ms.ci95_lo`), `recommendation` None when no cell met the constraints."""
    run_dir: Path
    results: dict
    cells: "pd.DataFrame"
    recommendation: Optional[Recommended]
    report: Path
    report_md: Path

    @classmethod
    def load(cls, run_dir: Union[str, Path]) -> "RunResult":
        """Read a run directory (any folder holding a results.json: a recipe run or a bench)."""
        from reporting.analysis import recommend, speedups
        from reporting.report import cells_frame

        run_dir = Path(run_dir)
        path = run_dir / "results.json"
        if not path.is_file():
            raise RecipeError(f"{run_dir}: no results.json here (is this a finished run directory?)")
        results = json.loads(path.read_text())
        rec = recommend(results)
        recommended = None
        if rec.winner is not None:
            w = rec.winner
            sp = speedups(results).get(w.cell_index)
            recommended = Recommended(
                variant=w.variant, backend=w.backend, batch_size=rec.batch_size, p50_ms=w.p50,
                p50_ci95=tuple(w.cell["latency_ms"].get("ci95") or ()), speedup=sp[0] if sp else None,
                speedup_ci95=(sp[1], sp[2]) if sp else None, metric=rec.metric, score=w.score, unstable=w.unstable,
                rules=tuple(rec.rules), vs_reference=rec.vs_reference)
        return cls(run_dir=run_dir, results=results, cells=cells_frame(results), recommendation=recommended,
                   report=run_dir / "report.html", report_md=run_dir / "report.md")


def load_run(run_dir: Union[str, Path]) -> RunResult:
    """A finished run directory (of `run`, `bench_file` or the command line) as a RunResult."""
    return RunResult.load(run_dir)


def run(recipe: Union[str, os.PathLike, dict], out: Union[str, Path] = "reports", quick: bool = False,
        executor: Optional[str] = None, ray_address: Optional[str] = None) -> RunResult:
    """Run a recipe end to end, as `workbench run RECIPE --out OUT [--quick] [--executor E]
    [--ray-address A]` does, into a new run directory `<out>/<recipe name>/<run id>/`.

    `recipe` is a recipe file's path, or the parsed recipe as a dict (what `yaml.safe_load` of the
    file gives; a `workbench.recipe.Recipe` is taken as it is). A dict is checked and run in memory, nothing is written for it: its relative paths
    (a data file, a local model folder, a `python` model's module) resolve against the current
    directory at the time of the call; results.json records `path: null` and the sha256 of the
    dict's canonical JSON; and its run, lacking a recipe file, cannot be finished with `--resume`.
    Raises RecipeError for an invalid recipe or arguments."""
    from workbench.cli import run_command

    if isinstance(recipe, dict):
        recipe = _recipe_from_dict(recipe)
    elif isinstance(recipe, (str, os.PathLike)):
        if not str(recipe):
            raise RecipeError("recipe: give a recipe file's path or the recipe as a dict")
    elif not _is_recipe(recipe):
        raise RecipeError(f"recipe: a recipe file's path or the recipe as a dict, not {type(recipe).__name__}")
    with _run_scope(keep_torch_threads=True):
        run_dir = run_command(recipe, out, quick=quick, executor=executor, ray_address=ray_address)
    return RunResult.load(run_dir)


def bench_file(path: Union[str, Path], backends: Optional[Sequence[str]] = None, batch_sizes: Sequence[int] = (1,),
               seq_len: int = 128, threads: Optional[int] = None, inputs: Optional[Sequence[str]] = None,
               out: Union[str, Path, None] = None, quick: bool = False) -> RunResult:
    """Benchmark one model file (.onnx, TorchScript .pt, torch.export .pt2) without a recipe, as
    `workbench bench` does: `backends` default to the first CPU backend that runs the file's format;
    inputs come from the file's declared inputs, its `<file>.io.json`, or `inputs`
    (["NAME=DIMS:DTYPE", ...], e.g. "pixels=batch,1,8,8:float32"). Writes results.json and the report
    into `out` (default reports/bench/<file>/<time>). Raises RecipeError for a bad argument."""
    from workbench import standalone

    if isinstance(backends, str):
        backends = [backends]
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(batch_sizes, int):
        batch_sizes = [batch_sizes]
    with _run_scope(keep_torch_threads="torch" in sys.modules):
        folder = standalone.bench_file(path, backends=list(backends) if backends else None,
                                       batch_sizes=list(batch_sizes), seq_len=seq_len, threads=threads,
                                       inputs=list(inputs) if inputs else None, out=out, quick=quick, echo=False)
    return RunResult.load(folder)


def compare(run_a: Union[str, Path, RunResult], run_b: Union[str, Path, RunResult], margin: Union[float, str] = 0.05
            ) -> dict:
    """What `workbench compare RUN_A RUN_B --margin M` reports, as data, without writing anything:

    - `verdict`: `recommendation_a` / `recommendation_b` (variant, backend, batch_size, p50 or None),
      `same_recommendation`, `median_change` (the machine-wide drift: median p50 change B vs A over
      the shared cells), `speedups` (each run's speedups against its own baseline, with
      `intervals_overlap`) and `speedups_agreeing` (how many overlap);
    - `cells`: one row per cell measured in both runs: `p50_a`, `p50_b`, `change` (B/A - 1) with
      `change_ci95`, `verdict` ("slower", "faster" or "no significant difference": significant only
      when the whole interval lies beyond `margin`), `cannot_tell` (not significant, but the interval
      also reaches beyond `margin`: a change of that size is not ruled out), `unstable`, `accuracy_change`;
    - `significant`: the rows of `cells` whose verdict is slower or faster;
    - `run_a`, `run_b`, `margin` (a fraction; "5%" is accepted as on the command line).

    A CI gate in the manner of `--fail-if-slower 5%`:
    `[c for c in d["cells"] if c["change_ci95"][0] > 0.05]`. Raises RecipeError when a folder holds no
    results.json or the runs share no measured cell."""
    from reporting.compare import compare_runs

    a = run_a.run_dir if isinstance(run_a, RunResult) else run_a
    b = run_b.run_dir if isinstance(run_b, RunResult) else run_b
    data = compare_runs(a, b, margin)
    return {**data, "significant": [r for r in data["cells"] if r["verdict"] != "no significant difference"]}


# ----------------------------------------------------------------------------- helpers
def _is_recipe(obj: Any) -> bool:
    from workbench.recipe import Recipe

    return isinstance(obj, Recipe)


def _recipe_from_dict(data: dict):
    """Parse and check a recipe given as a dict, as load_recipe does a file (the same checks, the
    same messages), with its relative paths resolving against the current directory."""
    from pydantic import ValidationError

    from workbench.recipe import Recipe, check_recipe
    from workbench.schema_errors import pydantic_error

    where = "recipe (dict)"
    try:
        recipe = _dict_recipe_class().model_validate(data)
    except ValidationError as e:
        raise pydantic_error(e, Recipe, where) from None
    recipe._base = str(Path.cwd())  # absolute now: a later chdir, or a cell's process elsewhere, reads the same files
    recipe._sha256 = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    check_recipe(recipe, where)
    return recipe


def _dict_recipe_class():
    """Recipe for a dict: built on first use (workbench.recipe imports torch) and kept as this
    module's `_DictRecipe`, the name pickle looks it up by."""
    cls = globals().get("_DictRecipe")
    if cls is not None:
        return cls
    from pydantic import PrivateAttr

    from workbench.recipe import Recipe

    class _DictRecipe(Recipe):
        """A Recipe from a dict: no file, so relative paths resolve against `_base`, the folder
        current when it was given (Recipe.resolve would leave them relative)."""
        _base: Optional[str] = PrivateAttr(None)

        def resolve(self, p: str) -> Path:
            q = Path(p).expanduser()
            return q if q.is_absolute() or self._base is None else Path(self._base) / q

    _DictRecipe.__qualname__ = "_DictRecipe"
    globals()["_DictRecipe"] = _DictRecipe
    return _DictRecipe


def __getattr__(name: str):
    if name == "_DictRecipe":
        return _dict_recipe_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def _run_scope(keep_torch_threads: bool) -> Iterator[None]:
    """What a run needs of the process, for the call only: the libraries' environment variables
    (set unless the caller set them) and a clear stop flag; torch's thread count (the run sets it)
    is put back after."""
    from core.processes import clear_stop

    saved_env = {k: os.environ.get(k) for k in _RUN_ENV}
    for k, v in _RUN_ENV.items():
        os.environ.setdefault(k, v)
    threads = None
    if keep_torch_threads:
        import torch

        threads = torch.get_num_threads()
    clear_stop()  # a stop requested under `workbench.cli.main` earlier in this process is not this run's
    try:
        yield
    finally:
        clear_stop()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
