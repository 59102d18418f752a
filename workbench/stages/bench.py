"""Bench: every variant on every backend at every batch size, each measured in `bench.repeats`
processes over interleaved rounds (bench.rounds). A cell that cannot run says why (variant
failed, no artifact of the backend's format, artifact failed, backend unavailable here); a
measured cell gets its accuracy from its own outputs (those of its first process)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from core.progress import progress

from bench.plan import Generation, Target, plan, plan_load
from bench.requests import max_width, rows
from bench.rounds import measure_in_rounds
from core.backends import BACKENDS
from runtime.infer import save_batches
from core.processes import plugin_folders
from workbench.run_dir import log, say


def bench(run, models, variants: list[dict], artifacts: list[dict]) -> tuple[list[dict], list[dict]]:
    """(latency cells, load-scenario cells)."""
    spec = run.recipe.bench
    work = run.run_dir / ".work"
    work.mkdir(parents=True, exist_ok=True)
    eval_path = None
    if spec.accuracy and run.task.type != "none":
        eval_path = work / "eval_inputs.npz"
        save_batches(eval_path, run.task.eval_batches)
    flops = {v["name"]: v.get("flops") for v in variants}
    lm = run.src.io.kind == "causal-lm"  # measured by generation (bench.generate), not by forward passes
    targets = []
    for v in variants:
        name = v["name"]
        arts = {a["format"]: a for a in artifacts if a["variant"] == name}
        own = models[name].format if models.get(name) is not None else "torch"  # what the variant itself is
        kind = None if own == "torch" else "an ONNX graph" if own == "onnx" else f"a {own} artifact"
        targets.append(Target(
            name, arts, root=run.run_dir,
            failed=v.get("error") or "failed" if models.get(name) is None else None,
            missing=lambda fmt, n=name, kind=kind: _missing(n, kind, fmt, run.recipe.export.formats)))
    generation = Generation(spec.new_tokens, lambda batch, n=None: prompts(run, batch, n),
                            lambda name, batch: _kv_bytes(models[name], batch, spec.seq_len + spec.new_tokens),
                            prompt_lens=list(spec.prompt_lens)) if lm else None
    # The recipe's folder (a `python` model source) and any plugin's (a step's module class).
    sys_path = [str(run.recipe.resolve("."))] + plugin_folders()
    cells, jobs = plan(targets, run.recipe.backends_of, spec.batch_sizes, io=run.src.io, seq_len=spec.seq_len,
                       threads=run.threads, timing=run.timing, seed=run.recipe.seed, generation=generation,
                       eval_inputs=eval_path, outputs_dir=work, sys_path=sys_path, options_of=run.recipe.options_of)
    by_key = {(a["variant"], a["format"]): a for a in artifacts}
    for cell in cells:
        art = by_key.get((cell["variant"], cell["format"]))
        if art is not None and "parity" in art:
            cell["parity"] = art["parity"]
        if flops.get(cell["variant"]):
            cell["flops"] = flops[cell["variant"]] * cell["batch_size"]

    # Load scenarios (bench.serve under LoadGen) are measured in the same rounds as the latency cells.
    # --quick shortens every LoadGen test, but not below what early stopping needs to call a server run VALID.
    scenarios = [{**sc.model_dump(), "label": sc.label, **({"min_duration_s": min(sc.min_duration_s, 2.0),
                                                             "min_queries": min(sc.min_queries, _quick_queries(sc))}
                                                            if run.quick else {})}
                 for sc in spec.scenarios]
    load_cells, load_jobs = ([], [])
    if scenarios:
        load_cells, load_jobs = plan_load(targets, scenarios, run.recipe.backends_of, io=run.src.io,
                                          seq_len=spec.seq_len, threads=run.threads, timing=run.timing,
                                          seed=run.recipe.seed, log_root=run.run_dir / "loadgen", sys_path=sys_path,
                                          options_of=run.recipe.options_of, generation=generation,
                                          requests_of=None if lm else _requests(run, work))
    every = jobs + [(("load", i), job) for i, job in load_jobs]

    repeats = min(spec.repeats, 2) if run.quick else spec.repeats
    bar = progress(total=len(every) * repeats, desc=f"bench ({repeats} rounds)", unit="process")
    kept = []

    def advance(i, round_, was_kept):
        c = load_cells[i[1]] if isinstance(i, tuple) else cells[i]
        kept.append(was_kept)
        bar.set_postfix_str(f"round {round_ + 1}: {c['variant']} {c['backend']} "
                            + (c["scenario"] if "scenario" in c else f"b{c['batch_size']}"))
        bar.update()

    # The journal keeps every finished process: a run that is interrupted resumes from it.
    measured = measure_in_rounds(every, repeats=repeats, seed=run.recipe.seed, timeout_s=spec.cell_timeout_s,
                                 work_dir=work, memory_limit_mb=spec.memory_limit_mb,
                                 threshold=spec.timing.stability_threshold, progress=advance,
                                 journal=work / "processes.jsonl", executor=run.executor)
    bar.close()
    if any(k is True for k in kept):
        say(f"bench: kept {sum(k is True for k in kept)} process(es) measured before the run was interrupted, "
            f"measured {sum(k is False for k in kept)}")
    for i, job in jobs:
        cell = cells[i]
        gen = cell.pop("generation", None)
        cell.update(measured[i])
        if gen and "generation" in cell:
            cell["generation"].update(gen)
        outputs = Path(job["outputs_path"])
        if cell["status"] != "failed" and outputs.exists():
            cell["accuracy"] = run.task.metrics(np.load(outputs))
        if outputs.exists():
            outputs.unlink()
        log.info("cell %s %s b%d: %s %s", cell["variant"], cell["backend"], cell["batch_size"], cell["status"],
                 cell.get("latency_ms", {}).get("p50", cell["reason"]))
    for i, _ in load_jobs:
        load_cells[i].update(measured[("load", i)])
        c = load_cells[i]
        log.info("load %s %s %s: %s %s", c["variant"], c["backend"], c["scenario"], c["status"],
                 (c.get("load") or {}).get("server", {}).get("max_qps", c["reason"]))
    for path in [eval_path, *work.glob("requests-*.npz")]:
        if path and path.exists():
            path.unlink()
    if spec.profile and not (run.quick and "profile" not in spec.model_fields_set):
        profile_cells(run, cells, jobs, work)
    return cells, load_cells


def _requests(run, work: Path):
    """requests_of for plan_load: a scenario whose requests are the task's (`inputs: task`) gets the first
    `samples` evaluation rows, each at its own length (bench.requests), in a file per QSL size; None where
    the task has no evaluation inputs (the scenario then serves synthetic inputs, and its cell says so)."""
    files: dict[int, dict] = {}

    def of(sc: dict):
        if sc.get("inputs", "task") != "task" or not run.task.eval_batches:
            return None
        n = int(sc["samples"])
        if n not in files:
            picked, pad = rows(run.task.eval_batches, run.src.io, n)
            path = work / f"requests-{n}.npz"
            save_batches(path, picked)
            files[n] = {"path": str(path), "pad": pad, "cap": max_width(run.task.eval_batches, run.src.io)}
        return files[n]
    return of


def _missing(variant: str, kind, fmt: str, formats: list[str]) -> str:
    """Why `variant` has no artifact of `fmt`. An ONNX-only or engine-artifact variant (`kind` says which)
    has an artifact (or a skipped one saying why) of every listed format, but no torch module and no form
    in a format the recipe does not list."""
    if kind and (fmt == "torch" or fmt not in formats):
        return f"variant '{variant}' is {kind}: no {fmt} artifact"
    return f"format '{fmt}' is not in export.formats"


def prompts(run, batch: int, n: int | None = None) -> np.ndarray:
    """`batch` prompts of `n` tokens (default bench.seq_len), windows of the evaluation text at seeded offsets
    (random tokens when the task has no text): real text, so a generation runs as it would in use."""
    rng = np.random.default_rng(run.recipe.seed + batch + (0 if n is None else 7919 * n))
    n = n or run.recipe.bench.seq_len
    text = np.concatenate([b["input_ids"].reshape(-1) for b in run.task.eval_batches]) \
        if run.task.type == "language-modeling" else run.src.io.make(4, n, seed=run.recipe.seed)["input_ids"].reshape(-1)
    text = np.tile(text, -(-(n + 1) // len(text)))  # a corpus shorter than a prompt repeats
    starts = rng.integers(0, len(text) - n + 1, size=batch)
    return np.stack([text[s:s + n] for s in starts]).astype(np.int64)


def _kv_bytes(model, batch: int, context: int):
    """The KV cache at `context` tokens, from the variant's own config (a pruned model has fewer heads)."""
    from core.lm_summary import kv_cache_bytes

    module = model.module if model.format == "torch" else model.source_module
    config = getattr(getattr(module, "model", None), "config", None)
    return kv_cache_bytes(config, batch, context) if config is not None else None


def profile_cells(run, cells: list[dict], jobs: list, work: Path) -> None:
    """One profiling process per measured cell at the report's batch size (not torch.compile, whose
    profile would be of compilation): time by op type, for the report's diagnosis."""
    spec = run.recipe.bench
    batch = run.recipe.report.constraints.batch_size or spec.batch_sizes[0]
    todo = [(i, job) for i, job in jobs if cells[i]["batch_size"] == batch and cells[i]["status"] in ("ok", "unstable")
            and not BACKENDS[cells[i]["backend"]].compiles]
    bar = progress(total=len(todo), desc="op-level profiles", unit="cell")
    for i, job in todo:
        c = cells[i]
        bar.set_postfix_str(f"{c['variant']} {c['backend']}")
        # On the node that measured the cell, when that was not this machine (bench.executor: ray).
        result = run.executor.run_once({**job, "entry": "bench.profile", "eval_inputs": None, "outputs_path": None},
                                       spec.cell_timeout_s, work, spec.memory_limit_mb, node=c.get("node"))
        if result["status"] == "ok":
            c["profile"] = {k: v for k, v in result.items() if k not in ("status", "reason")}
        else:
            c["profile"] = {"error": result["reason"]}
            log.warning("profile of %s %s failed: %s", c["variant"], c["backend"], result["reason"])
        bar.update()
    bar.close()


def _quick_queries(sc) -> int:
    from bench.serving import early_stopping_queries

    return max(200, early_stopping_queries(sc.percentile)) if sc.type == "server" else 200
