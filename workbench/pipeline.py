"""The pipeline runner: compress (the variant DAG, cached) -> export (+ parity) -> bench (one process
per cell) -> results.json -> report. A failing variant, export or cell is recorded with its reason
and the run goes on; results.json is written last, atomically, so a run directory without it is
an unfinished run."""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from workbench import atomic
from workbench.environment import fingerprint
from workbench.model import VariantModel
from workbench.recipe import Recipe
from workbench.steps import StepContext, get_step
from workbench.variants import VariantCache, link_or_copy, model_files, root_key, variant_key

SCHEMA_VERSION = 1
EXPORT_FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "torch-export": "model.pt2"}
log = logging.getLogger("workbench")


def quick_timing(timing) -> dict:
    """--quick: a smoke run; the report says so, and its numbers are not for decisions."""
    t = timing.model_dump()
    t.update(warmup=min(t["warmup"], 2), min_iters=min(t["min_iters"], 5), min_seconds=min(t["min_seconds"], 0.25),
             max_seconds=min(t["max_seconds"], 10.0))
    return t


def new_run_dir(root: Path, name: str) -> Path:
    base = root / name
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        d = base / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            d.mkdir(parents=True)
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run directory under {base}")


def _setup_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the console gets progress bars and short lines; details go to run.log
    return handler


def _say(msg: str) -> None:
    log.info(msg)
    tqdm.write(msg)


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:500]


def _no_export_form(module, fmt: str) -> Optional[str]:
    """Why `module` has no `fmt` form (layers the format has no operator for), or None."""
    kinds = {type(m).__module__.split(".")[0] if type(m).__module__.startswith("bitsandbytes")
             else type(m).__module__ for m in module.modules()}
    if fmt != "onnx":
        if "bitsandbytes" in kinds:  # its layers call Python autograd functions that tracing cannot record
            return (f"bitsandbytes layers have no {fmt} form (their matmuls are Python autograd functions); "
                    "benchmark the module itself on torch-cpu / torch-cuda")
        return None
    if any(k.startswith("torch.ao.nn.quantized.dynamic") for k in kinds):
        return ("PyTorch dynamic-int8 layers (quantized::linear_dynamic) have no ONNX export; quantize the ONNX "
                "graph with the onnx-quantize step instead")
    if "bitsandbytes" in kinds:
        return ("bitsandbytes layers have no ONNX export; for an int8 / int4 ONNX graph use the onnx-quantize "
                "step on the unquantized parent")
    return None


class Run:
    def __init__(self, recipe: Recipe, out_root: Path = Path("reports"), quick: bool = False):
        self.recipe = recipe
        self.out_root = Path(out_root)
        self.quick = quick
        self.threads = recipe.bench.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                else os.cpu_count() or 1)
        self.cache = VariantCache(self.out_root / recipe.name / "cache")

    # ------------------------------------------------------------------ the whole run
    def execute(self) -> Path:
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.run_dir = new_run_dir(self.out_root, self.recipe.name)
        handler = _setup_log(self.run_dir)
        try:
            _say(f"run directory: {self.run_dir}")
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
                from workbench.infer import torch_outputs

                self.task.reference = torch_outputs(self.src.module, self.task.eval_batches)
            variants, models = self.compress()
            artifacts = self.export(models)
            cells = self.bench(models, variants, artifacts)
            from bench.roofline import annotate, probe

            peak = probe(self.threads) if any(c.get("latency_ms") for c in cells) else None
            if peak:
                annotate(cells, {v["name"]: v.get("weight_bytes") for v in variants}, peak)
            results = {
                "schema_version": SCHEMA_VERSION,
                "recipe": {"name": self.recipe.name, "path": self.recipe.path, "sha256": self.recipe.sha256,
                           "parsed": self.recipe.model_dump(mode="json", by_alias=True)},
                "environment": {**fingerprint(self.threads), "roofline_probe": peak},
                "model": {"description": self.src.description, "io": self.src.io.to_json()},
                "task": {"type": self.task.type, "description": self.task.description, "primary": self.task.primary,
                         "eval_size": self.task.eval_size},
                "timing": self.timing,
                "started": started,
                "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "quick": self.quick,
                "variants": variants,
                "artifacts": artifacts,
                "cells": cells,
            }
            atomic.write_json(self.run_dir / "results.json", results)
            from bench.report import write_report

            write_report(self.run_dir)
            log.info("report: %s", self.run_dir / "report.md")
            return self.run_dir
        finally:
            log.removeHandler(handler)
            handler.close()

    @property
    def timing(self) -> dict:
        return quick_timing(self.recipe.bench.timing) if self.quick else self.recipe.bench.timing.model_dump()

    # ------------------------------------------------------------------ compress
    def compress(self) -> tuple[list[dict], dict[str, Optional[VariantModel]]]:
        from workbench.infer import variant_outputs
        from workbench.model_stats import files_size, onnx_stats, torch_stats

        recipe = self.recipe
        models: dict[str, Optional[VariantModel]] = {}
        self.models = models  # steps look up other variants (a distillation teacher) here
        keys: dict[str, str] = {}
        self.keys = keys  # the export stage reuses ONNX files exported under these keys
        records = []
        for name in tqdm(recipe.order(), desc="compress", unit="variant"):
            v = recipe.variants[name]
            rec = {"name": name, "parent": v.from_, "steps": [s.model_dump(mode="json") for s in v.steps],
                   "status": "ok", "error": None}
            records.append(rec)
            models[name] = None
            if v.from_ and models.get(v.from_) is None:
                rec.update(status="failed", error=f"its parent variant '{v.from_}' failed")
                continue
            parent = models[v.from_] if v.from_ else VariantModel(io=self.src.io, module=self.src.module,
                                                                  source_module=self.src.module)
            parent_source = parent.module if parent.format == "torch" else parent.source_module
            others = tuple(keys.get(d, "failed") for d in recipe.dependencies(name) if d != v.from_)
            key = keys[name] = variant_key(keys[v.from_] if v.from_ else root_key(recipe), v.steps, recipe, self.quick,
                                           others)
            t0 = time.perf_counter()
            try:
                hit = self.cache.load(key, parent_source)
                if hit:
                    model, stored = hit
                    rec.update(cached=True, notes=stored["notes"])
                    log.info("variant %s: reused from cache %s", name, key)
                else:
                    self._build(name, v.steps, parent, key, keys[v.from_] if v.from_ else root_key(recipe))
                    # Measure what was saved, not the object that was saved: the cells load the file too.
                    model, stored = self.cache.load(key, parent_source)
                    rec.update(cached=False, notes=stored["notes"])
                    log.info("variant %s: built in %.1f s", name, time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - one variant failing never stops the run
                log.error("variant %s failed:\n%s", name, traceback.format_exc())
                tqdm.write(f"variant {name} failed: {_reason(e)}")
                rec.update(status="failed", error=_reason(e))
                continue
            models[name] = model
            rec["format"] = model.format
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            files = model_files(model, self.cache.folder(key))
            vdir = self.run_dir / "variants" / name
            for f in files:
                link_or_copy(f, vdir / f.name)
            rec["files"] = [str((vdir / f.name).relative_to(self.run_dir)) for f in files]
            rec["size_bytes"] = files_size(files)
            stats = (torch_stats(model.module, model.io, recipe.bench.seq_len) if model.format == "torch"
                     else onnx_stats(model.onnx_path))
            rec.update(stats)
            if self.task.type != "none":
                rec["accuracy"] = self.task.metrics(variant_outputs(model, self.task.eval_batches))
        base = next((r for r in records if r["name"] == recipe.report.baseline), None)
        for r in records:
            if base and base.get("accuracy") and r.get("accuracy"):
                r["accuracy_delta"] = {k: round(r["accuracy"][k] - base["accuracy"][k], 6) for k in r["accuracy"]}
            if base and base.get("params") and r.get("params"):
                r["params_ratio"] = round(r["params"] / base["params"], 4)
        return records, models

    def _onnx_export(self, module, key: Optional[str], dest: Path, exporter: str) -> dict:
        """Export `module` to `dest`. When `key` names the module (a variant's cache key), the file is
        kept in the cache and copied on later calls: two ONNX variants of one parent, and that
        parent's own ONNX artifact, then cost one export, not three."""
        from export.onnx import export_onnx, needs_external_data

        opset = self.recipe.export.opset
        if key is None or needs_external_data(module):  # a graph with external data files is not worth copying around
            return export_onnx(module, self.src.io, dest, opset=opset, exporter=exporter)
        memo = self.cache.root / "onnx-exports" / f"{key}-{exporter}-{opset}"
        if not (memo / "record.json").exists():
            work = self.cache.new_workdir()
            try:
                rec = export_onnx(module, self.src.io, work / "model.onnx", opset=opset, exporter=exporter)
                atomic.write_json(work / "record.json", rec)
                memo.parent.mkdir(parents=True, exist_ok=True)
                work.rename(memo)  # appears whole or not at all
            except OSError:  # another run stored it first
                self.cache.discard(work)
            except BaseException:
                self.cache.discard(work)
                raise
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(memo / "model.onnx", dest)
        return {**json.loads((memo / "record.json").read_text()), "reused": "exported once for this module, copied"}

    def _build(self, name: str, steps, parent: VariantModel, key: str, parent_key: str) -> None:
        """Apply the steps to the parent and store the result in the cache under `key`."""
        work = self.cache.new_workdir()
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
                    rec = self._onnx_export(model.module, parent_key if same else None, exported,
                                            step.exporter_for(call.params) or self.recipe.export.exporter)
                    notes.append({"step": "onnx export (implicit, before an ONNX step)", **rec})
                    model = VariantModel(io=model.io, onnx_path=exported, source_module=model.module)
                ctx = StepContext(work_dir=work, task=self.task, quick=self.quick, seed=self.recipe.seed, variant=name,
                                  export=self.recipe.export, lookup=lambda n: self.models.get(n))
                t0 = time.perf_counter()
                model = step.run(model, call.params, ctx)
                notes.append({"step": call.name, "seconds": round(time.perf_counter() - t0, 3), **ctx.notes})
            self.cache.store(key, work, model, {"variant": name, "notes": notes})
        except BaseException:
            self.cache.discard(work)
            raise

    # ------------------------------------------------------------------ export
    def export(self, models: dict[str, Optional[VariantModel]]) -> list[dict]:
        from export.parity import parity, violations
        from export.reload import outputs_in_fresh_process
        from export.torch_export import export_pt2
        from export.torchscript import export_torchscript
        from workbench.infer import onnx_outputs, torch_outputs

        spec = self.recipe.export
        io = self.src.io
        # Real evaluation inputs where the task has them (they vary in sequence length), else two shapes.
        batches = self.task.eval_batches[:4] or [io.make(2, 16, seed=1), io.make(3, 24, seed=2)]
        artifacts = []
        todo = [(n, m) for n, m in models.items() if m is not None]
        bar = tqdm(total=sum(len(spec.formats) for _ in todo), desc="export", unit="artifact")
        for name, model in todo:
            vdir = self.run_dir / "variants" / name
            if model.format == "torch":
                artifacts.append({"variant": name, "format": "torch", "path": f"variants/{name}/module.pt",
                                  "status": "ok", "reason": None, "exporter": "torch.save"})
                reference = torch_outputs(model.module, batches)
                for fmt in spec.formats:
                    art = {"variant": name, "format": fmt, "status": "ok", "reason": None}
                    why_not = _no_export_form(model.module, fmt)
                    if why_not:
                        art.update(status="skipped", reason=why_not)
                        artifacts.append(art)
                        bar.update()
                        continue
                    try:
                        path = vdir / EXPORT_FILES[fmt]
                        if fmt == "onnx":
                            art.update(self._onnx_export(model.module, self.keys.get(name), path, spec.exporter))
                        elif fmt == "torchscript":
                            art.update(export_torchscript(model.module, io, path))
                        else:
                            art.update(export_pt2(model.module, io, path))
                        out = outputs_in_fresh_process(fmt, path, batches)
                        art["parity_checked_in"] = "a fresh process, after reloading the file"
                        art["path"] = str(path.relative_to(self.run_dir))
                        atomic.write_json(path.with_name(path.name + ".io.json"), io.to_json())
                        art["parity"] = parity(reference, out, io.kind)
                        bad = violations(art["parity"], spec.parity)
                        if bad:
                            art.update(status="failed", reason=f"parity outside export.parity tolerance: {bad}")
                    except Exception as e:  # noqa: BLE001 - an export that fails is a recorded cell
                        log.error("export %s/%s failed:\n%s", name, fmt, traceback.format_exc())
                        art.update(status="failed", reason=_reason(e))
                    artifacts.append(art)
                    bar.update()
            else:
                # An ONNX-only variant: its graph is the artifact; parity against its torch ancestor
                # measures what its steps changed on purpose, so no tolerance is applied.
                ref = torch_outputs(model.source_module, batches)
                artifacts.append({"variant": name, "format": "onnx", "path": f"variants/{name}/model.onnx",
                                  "status": "ok", "reason": None, "exporter": "produced by the variant's steps",
                                  "parity": parity(ref, onnx_outputs(model.onnx_path, batches), io.kind),
                                  "parity_note": "against the torch ancestor; not gated (the steps changed it)"})
                for fmt in spec.formats:
                    if fmt != "onnx":
                        artifacts.append({"variant": name, "format": fmt, "status": "skipped",
                                          "reason": f"variant '{name}' is an ONNX graph; {fmt} needs a torch module"})
                    bar.update()
        bar.close()
        return artifacts

    # ------------------------------------------------------------------ bench
    def bench(self, models, variants: list[dict], artifacts: list[dict]) -> list[dict]:
        from bench.backends import BACKENDS, unavailable
        from bench.cells import cell_job, run_cell

        spec = self.recipe.bench
        work = self.run_dir / ".work"
        eval_path = None
        if spec.accuracy and self.task.type != "none":
            from workbench.infer import save_batches

            eval_path = work / "eval_inputs.npz"
            save_batches(eval_path, self.task.eval_batches)
        by_key = {(a["variant"], a["format"]): a for a in artifacts}
        flops = {v["name"]: v.get("flops") for v in variants}
        seq = spec.seq_len if self.src.io.has_seq() else None
        cells = []
        plan = [(v["name"], b, n) for v in variants for b in spec.backends for n in spec.batch_sizes]
        sys_path = [str(self.recipe.resolve("."))]
        bar = tqdm(plan, desc="bench", unit="cell")
        for name, backend, batch in bar:
            bar.set_postfix_str(f"{name} {backend} b{batch}")
            info = BACKENDS[backend]
            cell = {"variant": name, "format": info.format, "backend": backend, "device": info.device,
                    "batch_size": batch, "shape": {"seq_len": seq}, "status": None, "reason": None}
            cells.append(cell)
            art = by_key.get((name, info.format))
            why_not = unavailable(backend)
            if models.get(name) is None:
                cell.update(status="failed", reason=f"variant '{name}' failed: "
                            f"{next(v['error'] for v in variants if v['name'] == name)}")
            elif art is None:
                cell.update(status="skipped", reason=(
                    f"variant '{name}' is an ONNX graph: no {info.format} artifact" if models[name].format == "onnx"
                    else f"format '{info.format}' is not in export.formats"))
            elif art["status"] != "ok":
                cell.update(status=art["status"], reason=f"{info.format} artifact {art['status']}: {art['reason']}")
            elif why_not:
                cell.update(status="skipped", reason=why_not)
            else:
                outputs = work / f"outputs-{len(cells)}.npy"
                job = cell_job(backend, self.run_dir / art["path"], self.src.io.to_json(), batch, spec.seq_len,
                               self.threads, self.timing, seed=self.recipe.seed, eval_inputs=eval_path,
                               outputs_path=outputs, sys_path=sys_path)
                cell.update(run_cell(job, spec.cell_timeout_s, work, spec.memory_limit_mb))
                if cell["status"] != "failed" and outputs.exists():
                    cell["accuracy"] = self.task.metrics(np.load(outputs))
                    outputs.unlink()
                log.info("cell %s %s b%d: %s %s", name, backend, batch, cell["status"],
                         cell.get("latency_ms", {}).get("p50", cell["reason"]))
            if art is not None and "parity" in art:
                cell["parity"] = art["parity"]
            if flops.get(name):
                cell["flops"] = flops[name] * batch
        bar.close()
        if eval_path and eval_path.exists():
            eval_path.unlink()
        return cells


def run_recipe(recipe: Recipe, out_root: Path = Path("reports"), quick: bool = False) -> Path:
    return Run(recipe, out_root, quick).execute()
