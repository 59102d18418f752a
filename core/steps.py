"""The step registry. A step is one transform with typed parameters, one class in compress/ or
export/ registered with `@register`; it declares which model format it consumes and produces and
which other variants it reads, so a recipe can be ordered and checked before any work is done."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from pydantic import BaseModel, ConfigDict

STEPS: dict[str, type["Step"]] = {}


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
    def references(cls, params: dict) -> list[str]:
        """Names of the other variants this step reads (a distillation teacher): they are built first,
        and their cache keys enter this variant's."""
        return []

    @classmethod
    def expand(cls, params: "StepParams") -> "StepParams":
        """The parameters as they will run, at recipe load, while it is still known which ones the
        recipe set (a preset fills in only the others). What it returns is what the cache key and
        the lineage record."""
        return params

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
    STEPS[cls.name] = cls
    return cls


def get_step(name: str) -> type[Step]:
    return STEPS[name]


def step_names() -> list[str]:
    return sorted(STEPS)


def describe_steps() -> list[tuple[str, str, str, str]]:
    return [(n, s.consumes, s.produces, s.summary) for n, s in sorted(STEPS.items())]
