"""The accuracy-aware search (a recipe's `search:` block). Candidates are step lists made from a
template and a space of parameter values. Accuracy is cheap and timing is dear: every candidate is
built (through the variant cache, like any variant) and scored first, one that fails the accuracy
constraint is rejected before it is timed, and the rest are measured on the objective's backend and
batch size in interleaved rounds. The fastest measured candidate becomes an ordinary variant, so
the main bench measures it on every backend like the others; whether its lead over the runner-up
is significant is said, not assumed (unlike a search that stops at the first candidate that passes).

Candidates are scored on the task's evaluation split, the numbers the report shows; the choice among
them is then a selection on that split, which the report's search section states."""
from __future__ import annotations

from typing import Optional

from workbench.run_dir import log, say
from workbench.search_space import apply, grid


class Search:
    def __init__(self, run):
        self.run = run
        r = run.recipe
        self.spec = sp = r.search
        self.backend = sp.objective.backend or r.bench.backends[0]
        self.batch = sp.objective.batch_size or r.report.constraints.batch_size or r.bench.batch_sizes[0]
        self.max_drop = (sp.constraints.max_accuracy_drop if sp.constraints.max_accuracy_drop is not None
                         else r.report.constraints.max_accuracy_drop)
        self.metric = run.task.primary
        self.records: list[dict] = []
        self.seen: dict[str, dict] = {}
        self.calls: dict[str, list] = {}  # candidate -> its validated steps

    # ------------------------------------------------------------------ one batch of candidates
    def evaluate(self, assignments: list[dict]) -> list[dict]:
        """Build, score and (when they pass) time these candidates; returns their records."""
        from workbench.recipe import VariantSpec, _check_steps

        fresh = []
        for a in assignments:
            key = repr(sorted(a.items(), key=lambda kv: kv[0]))
            if key in self.seen or len(self.records) >= self.spec.budget:
                continue
            name = f"{self.spec.name}-c{len(self.records) + 1:02d}"
            rec = {"name": name, "params": a, "steps": apply(self.spec.steps, a), "status": "pending"}
            self.seen[key] = rec
            self.records.append(rec)
            fresh.append(rec)
        if not fresh:
            return []
        r = self.run.recipe
        fmt = _end_format(r, self.spec.from_)
        extra = {}
        for rec in fresh:
            extra[rec["name"]] = VariantSpec.model_validate({"from": self.spec.from_, "steps": []})
            # validated StepCalls, as check_recipe leaves every variant; kept for the winner
            self.calls[rec["name"]] = extra[rec["name"]].steps = _check_steps(
                r, rec["name"], rec["steps"], fmt, r.path or "recipe", "search")[0]
        built, models, proxy = compress_with(r, extra, run_dir=self.run.run_dir / "search", cache=self.run.cache,
                                             task=self.run.task, src=self.run.src, quick=self.run.quick)
        by_name = {b["name"]: b for b in built}
        for rec in fresh:
            b = by_name[rec["name"]]
            rec["cached"] = b.get("cached")
            if b["status"] != "ok":
                rec.update(status="failed", reason=b["error"])
                continue
            rec["accuracy"] = b.get("accuracy")
            drop = -((b.get("accuracy_delta") or {}).get(self.metric, 0.0)) if self.metric else 0.0
            if self.max_drop is not None and self.metric and drop > self.max_drop:
                rec.update(status="rejected", reason=f"{self.metric} drop {drop:.4f} > {self.max_drop} "
                                                     "(rejected before timing)")
        self._time([rec for rec in fresh if rec["status"] == "pending"], proxy, models)
        for rec in fresh:
            log.info("search %s %s: %s %s", rec["name"], rec["params"], rec["status"],
                     rec.get("p50_ms", rec.get("reason")))
        return fresh

    def _time(self, recs: list[dict], proxy, models) -> None:
        from bench.plan import Generation, Target, plan
        from bench.rounds import measure_in_rounds
        from core.backends import BACKENDS
        from core.formats import FORMATS
        from workbench.stages.bench import prompts
        from workbench.stages.export import export_memoised

        cls = BACKENDS[self.backend]
        r, targets = self.run.recipe, []
        for rec in recs:
            model = models[rec["name"]]
            try:
                if model.format != "torch" and cls.format == model.format:
                    path = model.file
                elif model.format != "torch":
                    raise ValueError(f"a variant that is a {model.format} file has no {cls.format} form for {self.backend}")
                elif cls.format in FORMATS:
                    path = proxy.run_dir / "variants" / rec["name"] / FORMATS[cls.format].file_name
                    export_memoised(proxy, cls.format, model.module, proxy.keys[rec["name"]], path)
                else:  # the variant's own module file ("torch")
                    path = self.run.cache.folder(proxy.keys[rec["name"]]) / "module.pt"
            except Exception as e:  # noqa: BLE001 - a candidate that cannot run is recorded
                rec.update(status="failed", reason=f"{type(e).__name__}: {e}")
                continue
            targets.append(Target(rec["name"], {cls.format: {"status": "ok", "reason": None, "path": str(path)}}))
        if not targets:
            return
        work = proxy.run_dir / ".work"
        work.mkdir(parents=True, exist_ok=True)
        # The one planner the report's cells come from: a causal LM's candidates are ranked by per-token
        # decode latency (generation cells), as the report ranks its variants.
        generation = Generation(r.bench.new_tokens, lambda batch: prompts(self.run, batch)) \
            if self.run.src.io.kind == "causal-lm" else None
        cells, jobs = plan(targets, lambda _: [self.backend], [self.batch], io=self.run.src.io,
                           seq_len=r.bench.seq_len, threads=self.run.threads, timing=self.run.timing, seed=r.seed,
                           generation=generation, options_of=r.options_of)
        for cell in cells:
            if cell["status"] is not None:  # the backend cannot run here, or cannot generate
                next(rec for rec in recs if rec["name"] == cell["variant"]).update(status="failed",
                                                                                  reason=cell["reason"])
        jobs = [(cells[i]["variant"], job) for i, job in jobs]
        if not jobs:
            return
        measured = measure_in_rounds(jobs, repeats=self.spec.repeats, seed=r.seed, timeout_s=r.bench.cell_timeout_s,
                                     work_dir=work, memory_limit_mb=r.bench.memory_limit_mb,
                                     threshold=r.bench.timing.stability_threshold,
                                     journal=work / "processes.jsonl",  # a resumed run keeps these too
                                     executor=self.run.executor)
        by = {rec["name"]: rec for rec in recs}
        for name, m in measured.items():
            rec = by[name]
            if m["status"] == "failed":
                rec.update(status="failed", reason=m["reason"])
            else:
                # A causal LM's candidate is a generation cell: its p50 is per decoded token, as in the report.
                rec.update(status="measured", p50_ms=m["latency_ms"]["p50"], ci95=m["latency_ms"]["ci95"],
                           per="decoded token" if "generation" in m else "call", cell=m)

    # ------------------------------------------------------------------ strategies
    def execute(self) -> dict:
        sp = self.spec
        say(f"search: {sp.strategy} over {', '.join(sp.space)}; objective p50 on {self.backend} at batch "
            f"{self.batch}; budget {sp.budget}")
        if sp.strategy == "grid":
            self.evaluate(grid(sp.space))
        else:
            current = {k: v[0] for k, v in sp.space.items()}
            for key, values in sp.space.items():  # one parameter at a time, the others at their best
                self.evaluate([{**current, key: v} for v in values])
                best = self._best(lambda rec: rec["params"] | {key: None} == current | {key: None})
                if best:
                    current = dict(best["params"])
        return self.summary()

    def _best(self, where=lambda rec: True) -> Optional[dict]:
        done = [rec for rec in self.records if rec["status"] == "measured" and where(rec)]
        return min(done, key=lambda rec: rec["p50_ms"]) if done else None

    def _statistic(self) -> str:
        return "p50 per decoded token" if self.run.src.io.kind == "causal-lm" else "p50"

    def summary(self) -> dict:
        from reporting.analysis import faster

        best = self._best()
        ranked = sorted((rec for rec in self.records if rec["status"] == "measured"), key=lambda rec: rec["p50_ms"])
        lead = None
        if len(ranked) > 1:
            ratio = faster(ranked[0]["cell"], ranked[1]["cell"])
            lead = {"runner_up": ranked[1]["name"], "speedup": ratio,
                    "significant": bool(ratio and ratio[1] > 1.0)}
        out = {"strategy": self.spec.strategy, "objective": {"backend": self.backend, "batch_size": self.batch,
                                                               "statistic": self._statistic()},
               "constraints": {"max_accuracy_drop": self.max_drop, "metric": self.metric},
               "selected_on": "the task's evaluation split",
               "candidates": [{k: v for k, v in rec.items() if k != "cell"} for rec in self.records],
               "best": None if best is None else {"candidate": best["name"], "variant": self.spec.name,
                                                  "params": best["params"], "steps": best["steps"],
                                                  "p50_ms": best["p50_ms"], "lead": lead}}
        return out


def run_search(run) -> dict:
    """Run the recipe's search; the best candidate is added to the recipe as variant `search.name`."""
    from workbench.recipe import VariantSpec

    s = Search(run)
    result = s.execute()
    best = result["best"]
    if best:
        v = VariantSpec.model_validate({"from": s.spec.from_, "steps": []})
        # The same steps and parent as the candidate: the same cache key, so it is not built again.
        v.steps = s.calls[best["candidate"]]
        run.recipe.variants[s.spec.name] = v
        say(f"search: best {best['candidate']} {best['params']} at {best['p50_ms']:.3f} ms p50 -> variant "
            f"'{s.spec.name}'")
    else:
        say("search: no candidate met the constraints and ran; nothing added")
    return result


def compress_with(recipe, extra: dict, *, run_dir, cache, task, src, quick: bool):
    """Build the variants `extra` (name -> VariantSpec) through the cache, with only the recipe's
    variants they and the baseline need, into `run_dir`. Returns (records, models, the run-like
    object the stages saw)."""
    import types

    from workbench.stages.compress import compress

    needed = set(_ancestry(recipe, recipe.report.baseline))
    for v in extra.values():
        needed |= set(_ancestry(recipe, v.from_)) if v.from_ else set()
    sub = recipe.model_copy(update={"variants": {**{n: v for n, v in recipe.variants.items() if n in needed},
                                                 **extra}, "search": None})
    proxy = types.SimpleNamespace(recipe=sub, run_dir=run_dir, cache=cache, quick=quick, task=task, src=src,
                                  gated={})
    records, models = compress(proxy)
    return records, models, proxy


def _ancestry(recipe, name: str) -> list[str]:
    """The variant and everything it needs, transitively (parents, distillation teachers)."""
    out, todo = [], [name]
    while todo:
        n = todo.pop(0)
        if n not in out:
            out.append(n)
            todo += recipe.dependencies(n)
    return out


def _end_format(recipe, name: str) -> str:
    from core.steps import get_step

    fmt = "torch"
    for n in reversed(_ancestry_chain(recipe, name)):
        for call in recipe.variants[n].steps:
            step = get_step(call.name)
            fmt = step.consumes if step.produces == "same" else step.produces
    return fmt


def _ancestry_chain(recipe, name: str) -> list[str]:
    out = []
    while name:
        out.append(name)
        name = recipe.variants[name].from_
    return out
