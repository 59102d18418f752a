"""The pipeline runner: compress (the variant DAG, cached) -> export (+ parity) -> bench (one process
per cell) -> results.json -> report; each stage is a module of workbench/stages. A failing variant,
export or cell is recorded with its reason and the run goes on; results.json is written last,
atomically, so a run directory without it is an unfinished run."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from bench.executors import make_executor
from core import atomic
from core.processes import default_threads, pid_alive
from workbench import results
from workbench.recipe import Recipe
from workbench.run_dir import (close_log, log, new_run_dir, open_log, reason, route_library_loggers, say,
                               watch_status)
from workbench.stages.bench import bench
from workbench.stages.compress import compress
from workbench.stages.export import export
from workbench.variants import VariantCache


class Run:
    """One run of a recipe: its folder, cache, source model and task, and what the stages produce."""

    def __init__(self, recipe: Recipe, out_root: Path = Path("reports"), quick: bool = False):
        self.recipe = recipe
        # Absolute from here on: steps run libraries inside their own folder (working_directory), where a
        # relative path from a relative --out would point inside itself.
        self.out_root = Path(out_root).resolve()
        self.quick = quick
        self.threads = recipe.bench.threads or default_threads()
        self.cache = VariantCache(self.out_root / recipe.name / "cache")
        self.models: dict = {}
        self.keys: dict = {}
        self.gated: dict = {}  # (parent's key, exporter) -> parity of its ONNX export gated before an ONNX step

    @property
    def timing(self) -> dict:
        return results.quick_timing(self.recipe.bench.timing) if self.quick else self.recipe.bench.timing.model_dump()

    def execute(self, resume: Optional[Path] = None) -> Path:
        """Run the recipe into a new run directory, or, with `resume`, finish an interrupted one in
        place: variants and exports come from the cache, measured processes from its journal."""
        started = results.now()
        b = self.recipe.bench
        # First, before any work: an executor that cannot start (no Ray, no cluster there) is the user's to fix.
        self.executor = make_executor(b.executor, b.ray_address, {k: v.model_dump() for k, v in b.placement.items()})
        try:
            self.load()
        except BaseException:
            self.executor.close()
            raise
        self.run_dir = Path(resume).resolve() if resume else new_run_dir(self.out_root, self.recipe.name)
        handler = open_log(self.run_dir)
        self._status("running", started=started, pid=os.getpid(), quick=self.quick,
                     recipe={"path": str(Path(self.recipe.path).resolve()) if self.recipe.path else None,
                             "sha256": self.recipe.sha256},
                     executor={"name": b.executor, "ray_address": b.ray_address})
        watcher = watch_status(self.run_dir / "status.json")
        try:
            if b.executor != "local":
                say(f"executor: {b.executor} ({self.executor.address}; {len(self.executor.nodes())} node(s), "
                    f"started in {self.executor.init_s:.1f} s)")
            say(f"{'resuming' if resume else 'run directory:'} {self.run_dir}")
            if self.quick and len(self.task.eval_batches) > 2:  # a smoke run: two batches show accuracy is scored
                before = self.task.eval_size
                self.task.eval_batches = self.task.eval_batches[:2]
                if self.task.labels is not None:
                    self.task.labels = self.task.labels[:self.task.eval_size]
                self.task.description += f"; --quick: the first {self.task.eval_size} of those {before} scored"
            if self.task.type in ("embedding-fidelity", "language-modeling"):
                from runtime.infer import torch_outputs

                self.task.reference = torch_outputs(self.src.module, self.task.eval_batches)
            search = None
            if self.recipe.search:  # its best candidate joins the variants, so everything below sees it
                from workbench.search import run_search

                search = run_search(self)
            variants, models = compress(self)
            route_library_loggers()  # steps may have loaded more (optimum, bitsandbytes -> transformers)
            artifacts = export(self, models)
            from bench.roofline import annotate, probe

            # The machine's peaks, probed before any cell runs, while nothing of ours is loaded.
            peak = probe(self.threads) if self.recipe.bench.backends else None
            cells, load = bench(self, models, variants, artifacts)
            if peak and any(c.get("latency_ms") for c in cells):
                annotate(cells, variants, peak)
            say("writing results.json, the report and its plots")
            results.write_results(
                self.run_dir, threads=self.threads, started=started, quick=self.quick, timing=self.timing,
                recipe={"name": self.recipe.name, "path": self.recipe.path, "sha256": self.recipe.sha256,
                        "parsed": self.recipe.model_dump(mode="json", by_alias=True)},
                model={"description": self.src.description, "io": self.src.io.to_json(),
                       **({"random_weights": True} if self.src.random_weights else {})},
                task=self.task.summary(),
                variants=variants, artifacts=artifacts, cells=cells, load=load,
                roofline_probe=peak, search=search,
                executor=self.executor.describe())
            log.info("report: %s", self.run_dir / "report.md")
            for journal in (self.run_dir / ".work", self.run_dir / "search" / ".work"):
                (journal / "processes.jsonl").unlink(missing_ok=True)  # all of it is in results.json
            self._status("finished", started=started, finished=results.now())
            log.info("run finished")
            return self.run_dir
        except KeyboardInterrupt:
            self._status("interrupted", started=started, ended=results.now(),
                         reason="interrupted (SIGINT or SIGTERM) before results.json was written; "
                         f"`workbench run --resume {self.run_dir}` finishes it")
            log.error("run interrupted")
            raise
        except BaseException as e:
            self._status("failed", started=started, ended=results.now(), reason=reason(e))
            log.error("run failed: %s", reason(e))
            raise
        finally:
            self.executor.close()
            watcher.stop()
            close_log(handler)

    def load(self) -> None:
        """The source model and the task, before a run folder exists: a model or a data file the run cannot
        use (a RecipeError naming the field) ends it here, with nothing half-written."""
        import torch

        torch.set_num_threads(self.threads)
        from workbench.sources.models import load_model
        from workbench.tasks import build_task

        # Before loading too: in a process that imported transformers earlier (a notebook, a test session), its
        # console handler still holds the stderr of that moment, which may be closed or swapped by now.
        route_library_loggers()
        self.src = load_model(self.recipe, self.quick)
        route_library_loggers()  # now that the model's libraries are loaded
        self._check_lengths()
        self._check_steps_fit()
        self.task = build_task(self.recipe, self.src)

    def _check_lengths(self) -> None:
        """Token counts past the model's positions fail every cell with a tensor-size error: said first, by field."""
        from core.errors import field_error
        from workbench.recipe import model_kind

        config = next((m.config for m in self.src.module.modules() if hasattr(m, "config")), None)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if not limit or "input_ids" not in self.src.io.inputs:
            return
        b, t = self.recipe.bench, self.recipe.task
        asked = {"bench.seq_len": b.seq_len, "task.max_length": getattr(t, "max_length", None),
                 "task.block_size": getattr(t, "block_size", None)}
        if model_kind(self.recipe.model) == "causal-lm":  # a generation holds its prompt and its new tokens
            asked["bench.seq_len"] = b.seq_len + b.new_tokens
            asked.update({f"bench.prompt_lens[{i}]": n + b.new_tokens for i, n in enumerate(b.prompt_lens)})
        for field, n in asked.items():
            if n and n > limit:
                extra = " with bench.new_tokens" if model_kind(self.recipe.model) == "causal-lm" and field.startswith(
                    "bench.") else ""
                section, name = field.split(".")[0], field.split(".")[1].split("[")[0]
                unset = name not in (b if section == "bench" else t).model_fields_set
                raise field_error(self.recipe.where, field, f"asks for {n} tokens{extra}"
                                  f"{' (its default)' if unset else ''}, and the model has positions for {limit} (its "
                                  f"config's max_position_embeddings): set it to at most {limit}")

    def _check_steps_fit(self) -> None:
        """Each torch step's parameters against the source model (`Step.unfit`: e.g. distillation's hidden_weight
        on a model with no transformer layers), and parameters that name modules (`module_fields`, e.g. prune's
        ignored_layers) must name modules of it: either would otherwise fail a variant (or a search candidate)
        mid-run. Pruning, distillation and eager quantization keep module names, so the source model's are the
        names every step sees."""
        import difflib

        from core.errors import field_error
        from core.steps import get_step
        from workbench.recipe import _split_raw
        from workbench.search_space import candidates_of

        names: list[str] = []
        calls = [(f"variants.{vname}.steps[{i}].{c.name}", c.name, c.params)
                 for vname, v in self.recipe.variants.items() for i, c in enumerate(v.steps)]
        if self.recipe.search is not None:
            calls += [(f"search candidate {n + 1}: steps[{i}].{name}", name, params or {})
                      for n, steps in enumerate(candidates_of(self.recipe.search, limit=64))
                      for i, (name, params) in enumerate(map(_split_raw, steps)) if name]
        for where, name, params in calls:
            step = get_step(name)
            if step.consumes == "torch" and (why := step.unfit(params, self.src.module)):
                raise field_error(self.recipe.where, where, why)
            for field in step.module_fields:
                asked = params.get(field) or []
                names = names or [n for n, _ in self.src.module.named_modules() if n]
                unknown = [n for n in asked if n not in names]
                if unknown:
                    near = [m for u in unknown for m in difflib.get_close_matches(u, names, 3)][:8] or names[:8]
                    raise field_error(self.recipe.where, f"{where}.{field}", f"names no module of the model (it has "
                                      f"{len(names)}; some: {', '.join(near)})", value=unknown)

    def _status(self, state: str, **fields) -> None:
        """status.json: running -> finished, failed (with the reason) or interrupted. A run killed
        outright (SIGKILL, out of memory) cannot write it: its watcher process does (run_dir.watch_status)."""
        path = self.run_dir / "status.json"
        keep = {k: v for k, v in (json.loads(path.read_text()).items() if path.exists() else ())
                if k in ("pid", "quick", "recipe", "executor")}
        atomic.write_json(path, {"state": state, **keep, **fields})


def run_recipe(recipe: Recipe, out_root: Path = Path("reports"), quick: bool = False) -> Path:
    return Run(recipe, out_root, quick).execute()


def resume_run(run_dir: Path) -> Path:
    """Finish an interrupted or killed run in its own directory, with the recipe it was started with."""
    from core.errors import RecipeError
    from workbench.recipe import load_recipe

    run_dir = Path(run_dir)
    status_path = run_dir / "status.json"
    if not status_path.is_file():
        raise RecipeError(f"{run_dir}: no status.json here; --resume takes a run directory")
    status = json.loads(status_path.read_text())
    if status["state"] == "finished":
        raise RecipeError(f"{run_dir}: this run finished; nothing to resume")
    if status["state"] == "running" and pid_alive(status.get("pid")):
        raise RecipeError(f"{run_dir}: this run is still running (pid {status['pid']})")
    spec = status.get("recipe") or {}
    if not spec.get("path") or not Path(spec["path"]).is_file():
        raise RecipeError(f"{run_dir}: its recipe file {spec.get('path')!r} is gone; resume needs the same recipe")
    recipe = load_recipe(spec["path"])
    if recipe.sha256 != spec.get("sha256"):
        raise RecipeError(f"{run_dir}: {spec['path']} changed since the run started; resuming would mix two "
                          "recipes' numbers: run it afresh")
    how = status.get("executor") or {}
    if how.get("name"):  # the executor it was started with, from the command line or the recipe
        recipe.bench.executor, recipe.bench.ray_address = how["name"], how.get("ray_address")
    return Run(recipe, run_dir.parent.parent, bool(status.get("quick"))).execute(resume=run_dir)
