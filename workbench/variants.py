"""Variant files and the content-addressed cache: a variant is stored under the hash of everything
that made it (parent's hash, steps, model source, task, seed, quick flag, library versions), in a
folder that only appears, by rename, once it is complete. A re-run finds it and skips the work."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from core import atomic
from core.environment import versions
from core.steps import libraries_of
from core.model import ModelIO, VariantModel
from core.modelfile import load_module, onnx_files, save_module

MODULE_FILE = "module.pt"
ONNX_FILE = "model.onnx"


def root_key(recipe) -> str:
    """Hash of the model source; local folders and files count by their size and mtime."""
    spec = recipe.model.model_dump(mode="json")
    files = {}
    for field in ("path", "checkpoint"):
        value = spec.get(field)
        if value and recipe.resolve(value).exists():
            p = recipe.resolve(value)
            for f in ([p] if p.is_file() else sorted(p.rglob("*"))):
                if f.is_file():
                    st = f.stat()
                    files[str(f)] = [st.st_size, int(st.st_mtime)]
    if spec.get("ref"):  # your own nn.Module: its code is the model as much as its weights are
        files.update({str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in ref_sources(spec["ref"],
                                                                                               recipe.resolve("."))})
    return _hash({"model": spec, "files": files, "seed": recipe.seed})


def ref_sources(ref: str, base: Path) -> list[Path]:
    """The Python files a `package.module:callable` found in `base` may be built from: the package's
    whole tree, or the module file and the other .py files beside it (helpers it may import). A module
    found elsewhere (an installed package) counts by the recipe text alone."""
    top = ref.split(":")[0].split(".")[0]
    if (base / top).is_dir():
        return sorted((base / top).rglob("*.py"))
    if (base / f"{top}.py").is_file():
        return sorted(base.glob("*.py"))
    return []


# Bumped when what the built-in tasks feed the steps changes (v2: more stdlib docstring paragraphs,
# length-bucketed text batches; v3: splits of a data file interleaved by class, so calibration and training
# rows come in another order), so that cached distilled or calibrated variants are not reused.
TASK_DATA_VERSION = 3
# Bumped when a graph the workbench builds itself changes (v2: export.decoder_graph marks its cache as written in
# place, which the decode loop then uses; v3: its attention takes Q|K|V packed and turns them itself), so that a
# cached graph without the change is rebuilt, not reused.
GRAPH_VERSION = 3


BASE_LIBRARIES = ("torch", "transformers", "model-workbench")


def variant_key(parent_key: str, steps: list, recipe, quick: bool, other_keys: tuple = ()) -> str:
    """`other_keys`: keys of the other variants the steps read (a distillation teacher)."""
    needed = sorted({*BASE_LIBRARIES, *libraries_of(s.name for s in steps)})
    lib = versions(needed)
    return _hash({
        "parent": parent_key, "others": list(other_keys), "steps": [s.model_dump(mode="json") for s in steps],
        "quick": quick, "data": TASK_DATA_VERSION,
        "seed": recipe.seed, "task": recipe.task.model_dump(mode="json"),
        "export": {"opset": recipe.export.opset, "exporter": recipe.export.exporter, "graphs": GRAPH_VERSION},
        # The libraries every variant depends on, and those its own steps declare (Step.libraries): an
        # upgrade of one rebuilds the variants it made. The parent's key holds its steps' libraries.
        "versions": {k: lib.get(k) for k in needed},
    })


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


class VariantCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def folder(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str, source_module) -> Optional[tuple[VariantModel, dict]]:
        d = self.folder(key)
        if not (d / "record.json").exists():
            return None
        record = json.loads((d / "record.json").read_text())
        io = ModelIO.from_json(record["io"])
        if record["format"] == "torch":
            module = load_module(d / MODULE_FILE)
            return VariantModel(io=io, module=module, source_module=module), record
        if record["format"] != "onnx":  # an engine's own artifact, made by a step (core.model.VariantModel)
            from core.formats import FORMATS

            rel = record.get("file") or FORMATS[record["format"]].file_name
            return VariantModel(io=io, file_path=d / rel, file_format=record["format"],
                                source_module=source_module), record
        return VariantModel(io=io, onnx_path=d / ONNX_FILE, source_module=source_module), record

    def new_workdir(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".building-", dir=self.root))

    def store(self, key: str, workdir: Path, model: VariantModel, record: dict) -> VariantModel:
        """Write the model into `workdir`, then rename the whole folder into place."""
        if model.format == "torch":
            save_module(model.module, workdir / MODULE_FILE)
        elif model.file_path is not None:
            # The step wrote its artifact inside `workdir`: its top-level entry (a file or a folder) is kept.
            record = {**record, "file": str(model.file_path.relative_to(workdir))}
        elif model.onnx_path != workdir / ONNX_FILE:
            files = onnx_files(model.onnx_path)
            for f in files:
                shutil.copy2(f, workdir / (ONNX_FILE if f == files[0] else f.name))
        # Keep only the model's own files: steps leave intermediates (pre-processed graphs) behind.
        keep = {MODULE_FILE, Path(MODULE_FILE).with_suffix(".sha256").name, ONNX_FILE}
        if model.file_path is not None:
            keep.add(Path(record["file"]).parts[0])
        if model.format == "onnx":
            keep |= {f.name for f in onnx_files(workdir / ONNX_FILE)}
        for f in workdir.iterdir():
            if f.name not in keep:
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        atomic.write_json(workdir / "record.json", {**record, "io": model.io.to_json(), "format": model.format})
        final = self.folder(key)
        if final.exists():
            shutil.rmtree(final)
        os.replace(workdir, final)
        if model.format == "onnx":
            model.onnx_path = final / ONNX_FILE
        elif model.file_path is not None:
            model.file_path = final / record["file"]
        return model

    def discard(self, workdir: Path) -> None:
        shutil.rmtree(workdir, ignore_errors=True)


def model_files(model: VariantModel, cache_folder: Path) -> list[Path]:
    if model.format == "torch":
        return [cache_folder / MODULE_FILE, cache_folder / "module.sha256"]
    if model.file_path is not None:
        from core.formats import artifact_files

        return artifact_files(model.format, model.file_path)
    return onnx_files(cache_folder / ONNX_FILE)


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
