"""Export: every torch variant to every format in `export.formats` (the format registry says how,
and why a module has none), each file reloaded in a fresh process and checked for parity against
the module it came from. An export that fails or misses the tolerance is a recorded artifact."""
from __future__ import annotations

import json
import shutil
import traceback
from pathlib import Path
from typing import Optional

from core.progress import progress

from core import atomic
from core.formats import FORMATS
from runtime.infer import onnx_outputs, torch_outputs
from core.model import VariantModel
from export.parity import parity, violations
from export.reload import outputs_in_fresh_process
from workbench.run_dir import log, reason
from workbench.variants import GRAPH_VERSION


def export_memoised(run, fmt: str, module, key: Optional[str], dest: Path, exporter: Optional[str] = None) -> dict:
    """Export `module` to `dest` in format `fmt`. When `key` names the module (a variant's cache
    key), the file is kept in the cache and copied on later calls: two ONNX variants of one parent,
    and that parent's own ONNX artifact, then cost one export, not three."""
    spec = run.recipe.export.model_copy(update={"exporter": exporter}) if exporter else run.recipe.export
    cls = FORMATS[fmt]
    if key is None or not cls.shareable(module):
        return cls.export(module, run.src.io, dest, spec)
    memo = run.cache.root / "exports" / f"{key}-{fmt}-{spec.exporter}-{spec.opset}-g{GRAPH_VERSION}"
    if not (memo / "record.json").exists():
        work = run.cache.new_workdir()
        try:
            rec = cls.export(module, run.src.io, work / cls.file_name, spec)
            atomic.write_json(work / "record.json", rec)
            memo.parent.mkdir(parents=True, exist_ok=True)
            work.rename(memo)  # appears whole or not at all
        except OSError:  # another run stored it first
            run.cache.discard(work)
        except BaseException:
            run.cache.discard(work)
            raise
    dest.parent.mkdir(parents=True, exist_ok=True)
    stem = Path(cls.file_name).stem
    for f in cls.files(memo / cls.file_name):  # the graph and its side files (IR weights, external data)
        shutil.copy2(f, dest if f.name == cls.file_name else dest.with_name(dest.stem + f.name[len(stem):]))
    return {**json.loads((memo / "record.json").read_text()), "reused": "exported once for this module, copied"}


def parity_batches(run) -> list[dict]:
    """What parity is checked on: real evaluation inputs where the task has them (they vary in sequence
    length), else two shapes."""
    io = run.src.io
    return run.task.eval_batches[:4] or [io.make(2, 16, seed=1), io.make(3, 24, seed=2)]


def gate_onnx(run, module, graph: Path, what: str) -> dict:
    """Parity of an ONNX graph exported from `module` (in this process), held to export.parity: an ONNX step
    must not quantize or optimise a graph that does not compute what the model does (a trace that kept one
    branch of an `if`), or its variant would be measured and recommended as if it did."""
    batches = parity_batches(run)
    par = parity(torch_outputs(module, batches), onnx_outputs(graph, batches), run.src.io.kind)
    bad = violations(par, run.recipe.export.parity)
    if bad:
        raise ValueError(f"{what} is outside export.parity tolerance ({bad}): the ONNX steps would work on a graph "
                         "that does not compute what the model does (a trace keeps one branch of data-dependent "
                         "Python control flow); fix the export or loosen export.parity")
    return par


def export(run, models: dict[str, Optional[VariantModel]]) -> list[dict]:
    spec = run.recipe.export
    io = run.src.io
    batches = parity_batches(run)
    artifacts = []
    todo = [(n, m) for n, m in models.items() if m is not None]
    bar = progress(total=sum(len(spec.formats) for _ in todo), desc="export", unit="artifact")
    for name, model in todo:
        formats = run.recipe.formats_of(name)
        # Formats the run exports that this variant's own list leaves out: recorded, not made.
        artifacts += [{"variant": name, "format": f, "status": "skipped",
                       "reason": f"not exported for this variant: variants.{name}.formats is {formats}"}
                      for f in spec.formats if f not in formats and model.file_path is None
                      and not (f == "onnx" and model.format == "onnx")]
        bar.update(len(spec.formats) - len(formats))
        if model.format == "torch":
            artifacts.append({"variant": name, "format": "torch", "path": f"variants/{name}/module.pt",
                              "status": "ok", "reason": None, "exporter": "torch.save"})
            reference = torch_outputs(model.module, batches)
            graph = None  # this variant's ONNX file, once exported: formats made from it convert it
            for fmt in formats:
                art = _export_one(run, name, model, fmt, batches, reference, graph)
                if fmt == "onnx" and art["status"] == "ok":
                    graph = run.run_dir / art["path"]
                artifacts.append(art)
                bar.update()
        elif model.file_path is not None:
            artifacts += _engine_artifact_variant(run, name, model, batches)
            bar.update(len(formats))
        else:
            # An ONNX-only variant: its graph is the artifact; parity against its torch ancestor
            # measures what its steps changed on purpose, so no tolerance is applied.
            ref = torch_outputs(model.source_module, batches)
            artifacts.append({"variant": name, "format": "onnx", "path": f"variants/{name}/model.onnx",
                              "status": "ok", "reason": None, "exporter": "produced by the variant's steps",
                              "parity": parity(ref, onnx_outputs(model.onnx_path, batches), io.kind),
                              "parity_note": NOT_GATED})
            for fmt in formats:
                if fmt != "onnx":
                    artifacts.append(_export_one(run, name, model, fmt, batches, ref))
                bar.update()
    bar.close()
    return artifacts


NOT_GATED = "against the torch ancestor; not gated (the steps changed it)"


def _engine_artifact_variant(run, name: str, model: VariantModel, batches) -> list[dict]:
    """The one artifact of a variant that is an engine's own file (a GGUF, an ORT GenAI folder), made by its
    step, with parity of that engine's logits (in a fresh process) against its torch ancestor, not gated;
    every other format is out of its reach."""
    fmt = model.format
    rel = model.file_path.relative_to(run.cache.folder(run.keys[name]))
    art = {"variant": name, "format": fmt, "path": f"variants/{name}/{rel}", "status": "ok", "reason": None,
           "exporter": "produced by the variant's steps",
           "parity_checked_in": "a fresh process, after reloading the file", "parity_note": NOT_GATED}
    try:
        ref = torch_outputs(model.source_module, batches)
        art["parity"] = parity(ref, outputs_in_fresh_process(fmt, model.file_path, batches), run.src.io.kind)
    except Exception as e:  # noqa: BLE001 - an engine that cannot run the file is a recorded artifact
        log.error("parity of %s/%s failed:\n%s", name, fmt, traceback.format_exc())
        art.update(status="failed", reason=reason(e))
    others = [{"variant": name, "format": f, "status": "skipped", "reason": f"variant '{name}' is a {fmt} artifact "
               f"(made by its steps for that engine): it has no {f} form"}
              for f in run.recipe.export.formats if f != fmt]
    return [art, *others]


def unreachable(recipe, name: str, fmt: str) -> Optional[str]:
    """Why a step along variant `name`'s lineage keeps it from format `fmt` (`Step.formats`), or None."""
    from core.steps import get_step

    seen = set()
    while name and name not in seen:
        seen.add(name)
        v = recipe.variants[name]
        for call in v.steps:
            reach = get_step(call.name).formats(call.params)
            if reach is not None and fmt not in reach:
                return (f"variant '{name}' has a `{call.name}` step {call.params}, whose result reaches only "
                        f"{', '.join(reach)}, not {fmt}")
        name = v.from_
    return None


def _export_one(run, name: str, model: VariantModel, fmt: str, batches, reference,
                graph: Optional[Path] = None) -> dict:
    """One artifact of variant `name` in format `fmt`, reloaded in a fresh process for parity. A format that
    can be made from an ONNX graph (`from_onnx`) converts `graph` (the variant's ONNX artifact) or, for an
    ONNX-only variant, the variant itself, whose parity against its torch ancestor is then not gated."""
    art = {"variant": name, "format": fmt, "status": "ok", "reason": None}
    cls = FORMATS[fmt]
    onnx_only = model.format == "onnx"
    if onnx_only:
        graph = model.onnx_path
        why_not = None if hasattr(cls, "from_onnx") else f"variant '{name}' is an ONNX graph; {fmt} needs a torch module"
    else:
        why_not = cls.unsupported(model.module) or unreachable(run.recipe, name, fmt)
    if why_not:
        return {**art, "status": "skipped", "reason": why_not}
    try:
        path = run.run_dir / "variants" / name / cls.file_name
        if graph is not None and hasattr(cls, "from_onnx"):
            art.update(cls.from_onnx(graph, path, run.recipe.export))
            if not onnx_only:
                art["made_from"] = "the variant's ONNX artifact"
        else:
            art.update(export_memoised(run, fmt, model.module, run.keys.get(name), path))
        out = outputs_in_fresh_process(fmt, path, batches)
        art["parity_checked_in"] = "a fresh process, after reloading the file"
        art["path"] = str(path.relative_to(run.run_dir))
        atomic.write_json(path.with_name(path.name + ".io.json"), run.src.io.to_json())
        art["parity"] = parity(reference, out, run.src.io.kind)
        if onnx_only:
            art["parity_note"] = NOT_GATED
        else:
            bad = violations(art["parity"], run.recipe.export.parity)
            if bad:
                art.update(status="failed", reason=f"parity outside export.parity tolerance: {bad}")
    except Exception as e:  # noqa: BLE001 - an export that fails is a recorded cell
        log.error("export %s/%s failed:\n%s", name, fmt, traceback.format_exc())
        art.update(status="failed", reason=reason(e))
    return art
