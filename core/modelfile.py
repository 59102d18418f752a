"""Model files this tool writes and reads back: whole pickled torch modules guarded by a sha256
written beside them, and the file list of an ONNX graph (external data included)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from core import atomic


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_module(module, path: Path) -> str:
    """Pickle the whole module (pruned and quantized modules change structure, so a state_dict alone
    cannot rebuild them) and return its sha256, which `load_module` checks before unpickling."""
    import torch

    atomic.write_with(path, lambda tmp: torch.save(module, tmp))
    digest = _sha256(path)
    atomic.write_text(path.with_suffix(".sha256"), digest + "\n")
    return digest


# A step whose layers need mending after unpickling (a library's Parameter subclass that pickles as a
# plain Parameter) names the function that mends them in this attribute of the module it returns, as
# "package.module:function"; load_module calls it. Core so knows no step's library by name.
AFTER_LOAD = "_workbench_after_load"


def load_module(path: str | Path):
    """Load a module file this tool wrote. Unpickling runs code, so only files whose digest matches
    the one written beside them at save time are accepted; user checkpoints never come here
    (they load with weights_only=True)."""
    import torch

    path = Path(path)
    digest_file = path.with_suffix(".sha256")
    if not digest_file.exists() or digest_file.read_text().strip() != _sha256(path):
        raise RuntimeError(f"{path}: not a module file written by model-workbench (digest missing or different)")
    module = torch.load(path, map_location="cpu", weights_only=False).eval()
    hook = getattr(module, AFTER_LOAD, None)
    if hook:  # "package.module:function", named by the step that made the module (see AFTER_LOAD)
        import importlib

        mod, fn = hook.split(":")
        module = getattr(importlib.import_module(mod), fn)(module)
    return module


def module_files(path: Path) -> list[Path]:
    """A module file and the digest beside it that load_module checks."""
    return [Path(path), Path(path).with_suffix(".sha256")]


def onnx_files(path: Path) -> list[Path]:
    """The .onnx file and any external-data files saved beside it."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    extra = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return [path] + [path.parent / x for x in sorted(extra)]
