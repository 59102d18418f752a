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
    if any(type(m).__module__.startswith("bitsandbytes") for m in module.modules()):
        module = restore_bitsandbytes(module)
    return module


def onnx_files(path: Path) -> list[Path]:
    """The .onnx file and any external-data files saved beside it."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    extra = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return [path] + [path.parent / x for x in sorted(extra)]


def restore_bitsandbytes(module):
    """Give unpickled bitsandbytes layers their weight classes back.

    torch.save pickles a Parameter subclass as a plain Parameter carrying the subclass's attributes,
    so a reloaded Linear4bit's weight is no longer a Params4bit (nor a Linear8bitLt's an Int8Params).
    On the CPU that goes unnoticed; moved to CUDA, the weight's bytes move but its quantization
    state (absmax, SCB) stays in host memory, and the first kernel reads it from there: an illegal
    memory access (seen on an H200). Rewrapped, `.to(device)` moves both again."""
    import bitsandbytes as bnb

    for m in module.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, bnb.nn.Linear4bit) and w is not None and not isinstance(w, bnb.nn.Params4bit):
            state = w.__dict__
            m.weight = bnb.nn.Params4bit(
                w.data, requires_grad=False, quant_state=state.get("quant_state"),
                blocksize=state.get("blocksize"), compress_statistics=state.get("compress_statistics", True),
                quant_type=state.get("quant_type", "fp4"), quant_storage=state.get("quant_storage", w.dtype),
                module=m, bnb_quantized=state.get("bnb_quantized", True))
        elif isinstance(m, bnb.nn.Linear8bitLt) and w is not None and not isinstance(w, bnb.nn.Int8Params):
            state = w.__dict__
            m.weight = bnb.nn.Int8Params(w.data, requires_grad=False,
                                         has_fp16_weights=state.get("has_fp16_weights", False),
                                         CB=state.get("CB"), SCB=state.get("SCB"))
    return module
