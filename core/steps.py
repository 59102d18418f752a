"""The step registry. A step is one transform with typed parameters, one class in compress/ or
export/ registered with `@register`; it declares which model format it consumes and produces and
which other variants it reads, so a recipe can be ordered and checked before any work is done."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from pydantic import ConfigDict

from core.params import NoBoolNumbers

STEPS: dict[str, type["Step"]] = {}


class StepParams(NoBoolNumbers):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Step:
    """Subclass, set the class attributes and implement `run`; `@register` makes it usable."""

    name: ClassVar[str]
    summary: ClassVar[str]
    details: ClassVar[str] = ""  # what the recipe reference says of it beyond its parameters (docs/)
    Params: ClassVar[type[StepParams]] = StepParams
    consumes: ClassVar[str] = "torch"  # "torch" or "onnx"
    produces: ClassVar[str] = "same"  # "torch", "onnx" or "same"
    # pip distributions whose versions enter the cache key of a variant this step builds: an upgrade
    # of one of them rebuilds the variant instead of reusing what the old version made.
    libraries: ClassVar[tuple[str, ...]] = ()
    # Parameters that name modules of the model (lists of module names): checked against the source model
    # when the run loads it, before any work, so a typo is a refused recipe rather than a failed variant.
    module_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def unfit(cls, params: dict, module) -> Optional[str]:
        """Why these parameters cannot act on the source model `module` (a torch module; the run checks it when it
        loads the model, before any work), naming the parameter; None when they can or it cannot be told yet."""
        return None

    @classmethod
    def precision(cls, params: dict) -> Optional[str]:
        """The numeric precision of the weights this step leaves (fp32 / bf16 / fp16 / int8 / int4 /
        nf4 / fp4), or None when it leaves the precision as it found it (pruning, distillation)."""
        return None

    @classmethod
    def weight_only(cls, params: dict) -> bool:
        """Whether only the weights are quantized (activations and the matmuls stay in float)."""
        return False

    @classmethod
    def activation_scales(cls, params: dict) -> Optional[str]:
        """For int8 with quantized activations: "static" (scales calibrated ahead) or "dynamic"
        (computed per batch); None otherwise. The report compares static and dynamic siblings."""
        return None

    @classmethod
    def sensitivity_params(cls, params: dict, target: Optional[float]) -> Optional[dict]:
        """The parameters that make this step measure per-node sensitivity (`workbench sensitivity`):
        each node quantized alone, and with `target`, the fewest nodes to keep in float; None when it
        has no such mode."""
        return None

    @classmethod
    def offers_sensitivity(cls) -> bool:
        return getattr(cls.sensitivity_params, "__func__", None) is not Step.sensitivity_params.__func__

    @classmethod
    def remedy(cls, finding: str, params: Optional[dict], cpu_flags: list[str]) -> Optional[list[dict]]:
        """The steps to try instead of this one (made with `params`), as a recipe writes them
        ([{name: {param: value}}]), when the report finds a cause of kind `finding` (core.findings.KINDS)
        in a variant this step made; with `params` None, the variant has no such step and the answer is
        the steps to add before its own. None when this step has no answer to it."""
        return None

    @classmethod
    def formats(cls, params: dict) -> Optional[tuple[str, ...]]:
        """The artifact formats a variant made by this step can reach ("torch" is the module itself),
        or None when the export formats decide for themselves (their `unsupported`)."""
        return None

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


def lineage(variants: dict, name: str):
    """(variant record, its steps newest first) from `name` up to the source, each variant once.
    `variants` maps names to results.json records ({"steps": [{"name", "params"}], "parent"})."""
    seen = set()
    while name in variants and name not in seen:
        seen.add(name)
        v = variants[name]
        yield v, list(reversed(v.get("steps") or []))
        name = v.get("parent")


def precision_of(variants: dict, name: str) -> tuple[str, bool]:
    """(precision, weight-only) of variant `name`: set by the newest step along its lineage that sets
    one (a step registered by no plugin here is passed over); fp32 when none does."""
    for _, steps in lineage(variants, name):
        for s in steps:
            cls = STEPS.get(s.get("name"))
            p = s.get("params") or {}
            if cls is not None and cls.precision(p):
                return cls.precision(p), cls.weight_only(p)
    return "fp32", False


def own_weight_only(variant: dict) -> bool:
    """Whether the variant's own steps (not its ancestors') quantize weights only."""
    return any(STEPS[s["name"]].weight_only(s.get("params") or {}) for s in variant.get("steps") or []
               if s.get("name") in STEPS)


def own_activation_scales(variant: dict) -> tuple[Optional[str], dict]:
    """("static" / "dynamic" / None, that step's params) of the variant's own last quantizing step."""
    for s in reversed(variant.get("steps") or []):
        cls = STEPS.get(s.get("name"))
        if cls is not None and cls.precision(s.get("params") or {}):
            return cls.activation_scales(s.get("params") or {}), s.get("params") or {}
    return None, {}


def libraries_of(step_names) -> list[str]:
    """The distributions whose versions key a variant made by these steps."""
    return sorted({lib for n in step_names if n in STEPS for lib in STEPS[n].libraries})


def describe_steps() -> list[tuple[str, str, str, str]]:
    return [(n, s.consumes, s.produces, s.summary) for n, s in sorted(STEPS.items())]
