"""The step registry. A step is one transform with typed parameters; it declares which model
format it consumes and produces, so a recipe can be checked before any work is done."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from pydantic import BaseModel, ConfigDict

# Modules whose import registers steps. Kept explicit so `workbench list` shows them all.
STEP_MODULES = ("compress.quantize", "compress.prune", "compress.distill", "export.onnx_quantize",
                "export.onnx_optimize")

_REGISTRY: dict[str, type["Step"]] = {}


class StepParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Step:
    """Subclass, set the class attributes and implement `run`; `@register` makes it usable."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[StepParams]] = StepParams
    consumes: ClassVar[str] = "torch"  # "torch" or "onnx"
    produces: ClassVar[str] = "same"  # "torch", "onnx" or "same"

    @classmethod
    def check(cls, params, *, recipe, variant: str, where: str, field: str) -> None:
        """Cross-field checks at recipe load (e.g. a teacher that names a variant). Raise RecipeError."""

    @classmethod
    def exporter_for(cls, params: dict) -> Optional[str]:
        """The ONNX exporter this step needs for the implicit export before it (None: the recipe's)."""
        return None

    def run(self, model, params, ctx: "StepContext"):
        raise NotImplementedError


@dataclass
class StepContext:
    """What a step may use besides its input model."""

    work_dir: Path  # where the step may write files (the variant's cache folder)
    task: Any  # workbench.tasks.Task
    quick: bool
    seed: int
    variant: str
    export: Any  # the recipe's ExportSpec, for steps that must first export to ONNX
    lookup: Callable[[str], Any] = field(default=lambda name: None)  # another variant's model by name
    notes: dict = field(default_factory=dict)  # facts the step wants in the variant's record


def register(cls: type[Step]) -> type[Step]:
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    for mod in STEP_MODULES:
        importlib.import_module(mod)


def get_step(name: str) -> type[Step]:
    _load()
    return _REGISTRY[name]


def step_names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def describe_steps() -> list[tuple[str, str, str, str]]:
    _load()
    return [(n, s.consumes, s.produces, s.summary) for n, s in sorted(_REGISTRY.items())]
