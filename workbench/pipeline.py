"""The pipeline runner: compress (the variant DAG, cached) -> export (+ parity) -> bench (one process
per cell) -> results.json -> report; each stage is a module of workbench/stages. A failing variant,
export or cell is recorded with its reason and the run goes on; results.json is written last,
atomically, so a run directory without it is an unfinished run."""
from __future__ import annotations

import os
from pathlib import Path

from core import atomic
from core.processes import default_threads
from workbench import results
from workbench.recipe import Recipe
from workbench.run_dir import close_log, log, new_run_dir, open_log, reason, say
from workbench.stages.bench import bench
from workbench.stages.compress import compress
from workbench.stages.export import export
from workbench.variants import VariantCache


class Run:
    """One run of a recipe: its folder, cache, source model and task, and what the stages produce."""

    def __init__(self, recipe: Recipe, out_root: Path = Path("reports"), quick: bool = False):
        self.recipe = recipe
        self.out_root = Path(out_root)
        self.quick = quick
        self.threads = recipe.bench.threads or default_threads()
        self.cache = VariantCache(self.out_root / recipe.name / "cache")
        self.models: dict = {}
        self.keys: dict = {}

    @property
    def timing(self) -> dict:
        return results.quick_timing(self.recipe.bench.timing) if self.quick else self.recipe.bench.timing.model_dump()

    def execute(self) -> Path:
        started = results.now()
        self.run_dir = new_run_dir(self.out_root, self.recipe.name)
        handler = open_log(self.run_dir)
        self._status("running", started=started, pid=os.getpid())
        try:
            say(f"run directory: {self.run_dir}")
            import torch

            torch.set_num_threads(self.threads)
            from workbench.sources.models import load_model
            from workbench.tasks import build_task

            self.src = load_model(self.recipe)
            self.task = build_task(self.recipe, self.src)
            if self.quick:  # a smoke run: two evaluation batches are enough to see that accuracy is scored
                self.task.eval_batches = self.task.eval_batches[:2]
                if self.task.labels is not None:
                    self.task.labels = self.task.labels[:self.task.eval_size]
            if self.task.type == "embedding-fidelity":
                from core.infer import torch_outputs

                self.task.reference = torch_outputs(self.src.module, self.task.eval_batches)
            variants, models = compress(self)
            artifacts = export(self, models)
            from bench.roofline import annotate, probe

            # The machine's peaks, probed before any cell runs, while nothing of ours is loaded.
            peak = probe(self.threads) if self.recipe.bench.backends else None
            cells = bench(self, models, variants, artifacts)
            if peak and any(c.get("latency_ms") for c in cells):
                annotate(cells, variants, peak)
            results.write_results(
                self.run_dir, threads=self.threads, started=started, quick=self.quick, timing=self.timing,
                recipe={"name": self.recipe.name, "path": self.recipe.path, "sha256": self.recipe.sha256,
                        "parsed": self.recipe.model_dump(mode="json", by_alias=True)},
                model={"description": self.src.description, "io": self.src.io.to_json()},
                task={"type": self.task.type, "description": self.task.description, "primary": self.task.primary,
                      "eval_size": self.task.eval_size},
                variants=variants, artifacts=artifacts, cells=cells, roofline_probe=peak)
            log.info("report: %s", self.run_dir / "report.md")
            self._status("finished", started=started, finished=results.now())
            log.info("run finished")
            return self.run_dir
        except KeyboardInterrupt:
            self._status("interrupted", started=started, reason="interrupted (SIGINT) before results.json was written")
            log.error("run interrupted")
            raise
        except BaseException as e:
            self._status("failed", started=started, reason=reason(e))
            log.error("run failed: %s", reason(e))
            raise
        finally:
            close_log(handler)

    def _status(self, state: str, **fields) -> None:
        """status.json: running -> finished, failed (with the reason) or interrupted. A folder that
        says running with no live process behind it is a run that was killed."""
        atomic.write_json(self.run_dir / "status.json", {"state": state, **fields})


def run_recipe(recipe: Recipe, out_root: Path = Path("reports"), quick: bool = False) -> Path:
    return Run(recipe, out_root, quick).execute()
