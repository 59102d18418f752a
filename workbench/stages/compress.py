"""Compress: build every variant of the recipe in dependency order (parents, teachers first), each
from the content-addressed cache when it was built before. A failing variant is recorded with its
reason and its descendants fail with it; the rest of the run goes on."""
from __future__ import annotations

import time
import traceback
from typing import Optional

from core.progress import progress, write

from runtime.infer import variant_outputs
from core.model import VariantModel
from core.steps import StepContext, get_step
from export.reload import outputs_in_fresh_process
from workbench.model_stats import artifact_stats, files_size, onnx_stats, torch_stats
from workbench.run_dir import log, reason
from workbench.stages.export import export_memoised, gate_onnx
from workbench.variants import link_or_copy, model_files, root_key, variant_key


def compress(run) -> tuple[list[dict], dict[str, Optional[VariantModel]]]:
    """Returns (one record per variant, the variants' models by name; None where one failed)."""
    recipe = run.recipe
    models: dict[str, Optional[VariantModel]] = {}
    run.models = models  # steps look up other variants (a distillation teacher) here
    keys: dict[str, str] = {}
    run.keys = keys  # the export stage reuses files exported under these keys
    records = []
    for name in progress(recipe.order(), desc="compress", unit="variant"):
        v = recipe.variants[name]
        rec = {"name": name, "parent": v.from_, "steps": [s.model_dump(mode="json") for s in v.steps],
               "status": "ok", "error": None}
        if v.suggested is not None:  # written by `workbench suggest`: the report says what the fix gave
            rec["suggested"] = v.suggested.model_dump(by_alias=True)
        if v.reference:  # an engine's own defaults: measured and shown, never recommended
            rec["reference"] = True
        records.append(rec)
        models[name] = None
        if v.from_ and models.get(v.from_) is None:
            rec.update(status="failed", error=f"its parent variant '{v.from_}' failed")
            continue
        parent = models[v.from_] if v.from_ else VariantModel(io=run.src.io, module=run.src.module,
                                                              source_module=run.src.module)
        parent_source = parent.module if parent.format == "torch" else parent.source_module
        others = tuple(keys.get(d, "failed") for d in recipe.dependencies(name) if d != v.from_)
        parent_key = keys[v.from_] if v.from_ else root_key(recipe)
        key = keys[name] = variant_key(parent_key, v.steps, recipe, run.quick, others)
        t0 = time.perf_counter()
        try:
            hit = run.cache.load(key, parent_source)
            if hit:
                model, stored = hit
                rec.update(cached=True, notes=stored["notes"])
                log.info("variant %s: reused from cache %s", name, key)
            else:
                _build(run, name, v.steps, parent, key, parent_key)
                # Measure what was saved, not the object that was saved: the cells load the file too.
                model, stored = run.cache.load(key, parent_source)
                rec.update(cached=False, notes=stored["notes"])
                log.info("variant %s: built in %.1f s", name, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - one variant failing never stops the run
            log.error("variant %s failed:\n%s", name, traceback.format_exc())
            write(f"variant {name} failed: {reason(e)}")
            rec.update(status="failed", error=reason(e))
            continue
        models[name] = model
        rec["format"] = model.format
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        folder = run.cache.folder(key)
        files = model_files(model, folder)
        vdir = run.run_dir / "variants" / name
        for f in files:  # where they lie in the cache (an engine's model folder keeps its layout)
            link_or_copy(f, vdir / f.relative_to(folder))
        rec["files"] = [str((vdir / f.relative_to(folder)).relative_to(run.run_dir)) for f in files]
        rec["size_bytes"] = files_size(files)
        if model.format == "torch":
            rec.update(torch_stats(model.module, model.io, recipe.bench.seq_len))
        elif model.file_path is not None:
            rec.update(artifact_stats(model.format, model.file_path, rec.get("notes") or []))
        else:
            rec.update(onnx_stats(model.onnx_path))
        if run.task.type != "none":
            try:
                rec["accuracy"] = run.task.metrics(_outputs(model, run.task.eval_batches))
            except Exception as e:  # noqa: BLE001 - an engine that cannot run the file costs its accuracy only
                log.error("variant %s: accuracy failed:\n%s", name, traceback.format_exc())
                rec["accuracy_error"] = reason(e)
    failed = [r["name"] for r in records if r["status"] == "failed"]
    if failed:  # the bar counted them as done: say plainly that they are not
        write(f"compress: {len(failed)} of {len(records)} variants failed ({', '.join(failed)}); the run goes on "
              "with the others, and the report says why each failed")
    base = next((r for r in records if r["name"] == recipe.report.baseline), None)
    for r in records:
        if base and base.get("accuracy") and r.get("accuracy"):
            r["accuracy_delta"] = {k: round(r["accuracy"][k] - base["accuracy"][k], 6) for k in r["accuracy"]}
        if base and base.get("params") and r.get("params"):
            r["params_ratio"] = round(r["params"] / base["params"], 4)
    return records, models


def _outputs(model: VariantModel, batches):
    """A variant's outputs on the evaluation batches; an engine artifact's (a GGUF, an ORT GenAI folder) from
    its engine in a child process (an engine crash then costs this variant's accuracy, not the run)."""
    if model.file_path is not None:
        return outputs_in_fresh_process(model.format, model.file_path, batches)
    return variant_outputs(model, batches)


def _build(run, name: str, steps, parent: VariantModel, key: str, parent_key: str) -> None:
    """Apply the steps to the parent and store the result in the cache under `key`."""
    work = run.cache.new_workdir()
    try:
        model = VariantModel(io=parent.io, module=parent.module, onnx_path=parent.onnx_path,
                             source_module=parent.source_module)
        notes = []
        for call in steps:
            step = get_step(call.name)()
            if step.consumes == "onnx" and model.format == "torch":
                exported = work / "exported.onnx"
                # Still the parent's module (no torch step before it in this variant): shareable.
                same = model.module is parent.module
                exporter = step.exporter_for(call.params)
                rec = export_memoised(run, "onnx", model.module, parent_key if same else None, exported, exporter)
                gated = run.gated.get((parent_key, exporter)) if same else None  # one check per shared export
                rec["parity"] = gated or gate_onnx(run, model.module, exported, "the ONNX export before step "
                                                   f"'{call.name}'")
                if same:
                    run.gated[(parent_key, exporter)] = rec["parity"]
                notes.append({"step": "onnx export (implicit, before an ONNX step)", **rec})
                model = VariantModel(io=model.io, onnx_path=exported, source_module=model.module)
            ctx = StepContext(work_dir=work, task=run.task, quick=run.quick, seed=run.recipe.seed, variant=name,
                              export=run.recipe.export, lookup=lambda n: run.models.get(n))
            t0 = time.perf_counter()
            model = step.run(model, call.params, ctx)
            notes.append({"step": call.name, "seconds": round(time.perf_counter() - t0, 3), **ctx.notes})
        run.cache.store(key, work, model, {"variant": name, "notes": notes})
    except BaseException:
        run.cache.discard(work)
        raise
