"""The export-format registry. A format is one class in export/ that subclasses ExportFormat
(registration is automatic): the file it writes, how to export a torch module to it, how to load
it back as a callable (the fresh-process parity check uses that), and why a module has no such form.
A format that can be made from an ONNX graph also defines `from_onnx(onnx_path, path, spec) -> dict`
(OpenVINO IR does): then ONNX-only variants get it too, and torch variants convert their ONNX artifact."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import numpy as np

FORMATS: dict[str, type["ExportFormat"]] = {}
# Above this many weight bytes an ONNX graph cannot live in one protobuf (2 GiB limit).
EXTERNAL_DATA_BYTES = 1_800_000_000


def needs_external_data(module) -> bool:
    return sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES


class ExportFormat:
    name: ClassVar[str]
    file_name: ClassVar[str]
    summary: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]] = ()  # file suffixes that mean this format (`workbench bench FILE`)
    # The model kinds (workbench.recipe.model_kind) it holds, where not every kind: a recipe exporting another
    # kind to it is refused before any work, instead of a skipped artifact after the run made its variants.
    model_kinds: ClassVar[Optional[tuple[str, ...]]] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            FORMATS[cls.name] = cls

    @classmethod
    def unsupported(cls, module) -> Optional[str]:
        """Why `module` has no form in this format (and what to do instead), or None."""
        return None

    @classmethod
    def export(cls, module, io, path: Path, spec: Any) -> dict:
        """Write `path` from `module` (inputs described by `io`, a core.model.ModelIO; `spec` is the
        recipe's export section); return what happened, for the results."""
        raise NotImplementedError

    @classmethod
    def shareable(cls, module) -> bool:
        """Whether one exported file may be copied for every variant that shares the module."""
        return True

    @classmethod
    def load(cls, path: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        """A callable: dict of numpy inputs -> numpy output, on the CPU."""
        raise NotImplementedError

    @classmethod
    def files(cls, path: Path) -> list[Path]:
        """Every file the artifact at `path` consists of (e.g. external weights beside a graph), to copy it whole."""
        return [Path(path)]


def format_for_file(path: Path) -> Optional[str]:
    """The registered format whose suffixes match `path` (the longest suffix wins), or None."""
    name = Path(path).name.lower()
    best = max(((len(sfx), f) for f, cls in FORMATS.items() for sfx in cls.suffixes if name.endswith(sfx.lower())),
               default=None)
    return best[1] if best else None


def artifact_files(fmt: str, path: Path) -> list[Path]:
    """Every file of an artifact: a registered format says (`ExportFormat.files`); "torch" is a variant's
    own module file, with the digest that load_module checks beside it."""
    if fmt in FORMATS:
        return FORMATS[fmt].files(Path(path))
    from core.modelfile import module_files

    return module_files(Path(path))


def suffixes_accepted() -> list[str]:
    return sorted({sfx for cls in FORMATS.values() for sfx in cls.suffixes})


def module_kinds(module) -> set[str]:
    """The Python packages the module's layers come from ("bitsandbytes", "torch.ao.nn.quantized..."),
    for `unsupported` checks."""
    return {type(m).__module__.split(".")[0] if type(m).__module__.startswith("bitsandbytes")
            else type(m).__module__ for m in module.modules()}


def torch_callable(module) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import torch

    def run(batch):
        with torch.no_grad():
            return module(**{k: torch.from_numpy(v) for k, v in batch.items()}).float().numpy()

    return run
