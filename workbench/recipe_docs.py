"""The recipe reference, generated: `docs/recipe-reference.md` (every field of every recipe section,
every step with its parameters, every backend and export format) and `docs/recipe.schema.json`
(the recipe as JSON Schema, for completion in an editor), both made from the pydantic models in
workbench/recipe.py and the registries, so the reference cannot drift from what `validate` accepts.

    python -m workbench.recipe_docs           # rewrite both files
    python -m workbench.recipe_docs --check   # exit 1, naming the stale file, when either differs

Only names registered by the built-in modules (`workbench.plugins.MODULES`) are documented: an
installed third-party plugin, or a test's toy step, does not change the committed reference.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import annotated_types as at
from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from core import atomic
from workbench import plugins

DOCS = Path(__file__).resolve().parent.parent / "docs"
REFERENCE = DOCS / "recipe-reference.md"
SCHEMA = DOCS / "recipe.schema.json"
COMMAND = "python -m workbench.recipe_docs"

# Facts for fields whose pydantic model carries no `description=` yet, keyed "Model.field". The
# model's own description wins; a note that names no field, or one a description now covers, is an
# error (render() raises), so these cannot go stale silently.
NOTES = {
    "Recipe.name": "names the report folder: `reports/<name>/<run id>/`",
    "Recipe.description": "free text, kept with the parsed recipe in results.json",
    "Recipe.seed": "seeds the held-out splits, training and the order of the measuring rounds",
    "Recipe.model": "the source model",
    "Recipe.task": "data and metric; without one a run measures latency and memory only",
    "Recipe.variants": "`name: {from, steps, backends, reference}`; `report.baseline` must name one of them",
    "Recipe.export": "formats the variants are exported to, and the parity check",
    "Recipe.bench": "backends, shapes and the timing protocol",
    "Recipe.report": "the baseline and the constraints the recommendation must meet",
    "Recipe.search": "optional: an accuracy-aware search over step parameters",
    "BuiltinModel.source": "`builtin`: a model that ships with the install (digits-cnn and docstring-gpt are trained "
                           "on first use, then cached in `~/.cache/model-workbench`, or `$WORKBENCH_CACHE`)",
    "HFModel.source": "`hf`: a Hugging Face model, loaded with `from_pretrained` (a hub id must already be in the "
                      "local HF cache: the workbench runs offline, and `validate` names `model.path` when it is not)",
    "HFModel.pooling": "embedding head: mean of the token states (masked) or the first token's",
    "HFModel.trust_remote_code": "run the model repository's own Python code; off unless the recipe says so",
    "HFModel.revision": "a hub revision (branch, tag or commit)",
    "TorchvisionModel.source": "`torchvision`: a torchvision architecture (needs `torchvision` installed)",
    "TorchvisionModel.name": "the architecture, e.g. `resnet18`",
    "TorchvisionModel.num_classes": "width of the classifier head",
    "TorchvisionModel.image_size": "height and width of the input images",
    "PythonModel.source": "`python`: your own `nn.Module`, built by a callable",
    "PythonModel.ref": "`package.module:callable` importable from the recipe's folder, returning an `nn.Module` "
                       "whose forward takes the named inputs and returns one tensor (logits or an embedding), "
                       "a row per input row. It is built and called once on random inputs of the declared shapes "
                       "before the run starts; a model that fails that is refused (exit 2). Its `.py` files count "
                       "in the variant cache's key: edit them and the variants are built again",
    "PythonModel.kind": "what the output is: class logits or an embedding",
    "PythonModel.inputs": "the forward's inputs by name, e.g. `{x: {shape: [batch, 3, 32, 32]}}`",
    "PythonModel.checkpoint": "a state_dict file (.safetensors or .pt, loaded with `weights_only=True`), or a "
                              "training checkpoint dict holding it under `state_dict`, `model_state_dict`, `model`, "
                              "`module` or `net`",
    "PythonModel.kwargs": "keyword arguments passed to the callable",
    "InputSpec.shape": "ints, or `batch` / `seq` (filled from `bench.batch_sizes` and `bench.seq_len`)",
    "InputSpec.dtype": "element type",
    "InputSpec.high": "integer inputs: upper bound (exclusive) of the random values",
    "BuiltinData.source": "`builtin`: data that ships with the install",
    "BuiltinData.name": "digits: scikit-learn's 8x8 digit images (fits digits-cnn or a python model); "
                        "stdlib-docstrings: paragraphs of the Python standard library's docstrings, a real English "
                        "corpus on every machine (a stable fifth is held out for evaluation, the rest is for the "
                        "steps)",
    "FileData.source": "`file`: your own data file",
    "FileData.text_field": "the text column (.csv) or key (.jsonl)",
    "FileData.label_field": "the label column or key; labels are class indices (whole numbers >= 0) or names "
                            "from the model's `label2id`; anything else is refused with its rows",
    "ClassificationTask.type": "`classification`: accuracy on the held-out rows",
    "ClassificationTask.data": "`{source: builtin, name: digits}` or a `.npz` file with arrays `x` (one row per "
                               "example, each of the model's one input's shape) and `y` (class indices >= 0, shape "
                               "[N]), checked before the run starts",
    "ClassificationTask.eval_size": "score at most this many held-out rows (default: all)",
    "TextClassificationTask.type": "`text-classification`: accuracy on the held-out rows",
    "TextClassificationTask.data": "a `.csv` or `.jsonl` file with `text_field` and `label_field`",
    "TextClassificationTask.eval_size": "score at most this many held-out rows (default: all)",
    "TextClassificationTask.max_length": "tokens per text (longer texts are truncated)",
    "EmbeddingFidelityTask.type": "`embedding-fidelity`: `cosine_mean` to the source model's embeddings and "
                                  "`spearman` of all pairwise similarities",
    "EmbeddingFidelityTask.data": "`{source: builtin, name: stdlib-docstrings}` or a file with `text_field`",
    "EmbeddingFidelityTask.eval_size": "held-out texts scored",
    "EmbeddingFidelityTask.max_length": "tokens per text (longer texts are truncated)",
    "LanguageModelingTask.type": "`language-modeling` (causal LMs): `perplexity` (the primary metric, lower is "
                                 "better), `nll`, and against the source model `top1_agreement` and `kl`",
    "NoTask.type": "`none`: latency and memory only",
    "VariantSpec.from_": "the parent variant (no cycles); without it the variant starts from the source model",
    "VariantSpec.steps": "applied in order; a step is written `name` or `{name: {param: value}}` (see Steps)",
    "ExportSpec.formats": "formats every variant is exported to (see Export formats)",
    "ExportSpec.opset": "ONNX opset",
    "ExportSpec.exporter": "dynamo: torch.onnx's dynamo exporter (the TorchScript-based one is tried, and "
                           "recorded, when it fails); torchscript: the TorchScript-based exporter; optimum: Hugging "
                           "Face models through optimum's exporter (others, or an optimum failure, fall back to "
                           "dynamo with the reason recorded); decoder: causal LMs of the Llama layout (Llama, Qwen2, "
                           "Mistral...) get the workbench's own fused graph (GroupQueryAttention with rotary, "
                           "SkipSimplifiedLayerNormalization, packed Q|K|V and gate|up MatMuls), built from the weights; "
                           "other models are exported as by default, with the reason recorded",
    "ExportSpec.parity": "the tolerances an export must meet against its source module",
    "ParityTolerance.max_abs_diff": "largest absolute difference of outputs allowed (null: not checked)",
    "ParityTolerance.min_cosine": "smallest cosine between outputs allowed",
    "ParityTolerance.min_top1_agreement": "smallest share of equal argmax predictions allowed",
    "BenchSpec.backends": "backends every variant is measured on (see Backends); a backend runs the artifact of its "
                          "format, so a backend of a format other than the variant's own (torch) needs that format in `export.formats`; one "
                          "that cannot run here becomes a skipped cell with the reason",
    "BenchSpec.batch_sizes": "batch sizes measured",
    "BenchSpec.timing": "the timing protocol of each measuring process",
    "Timing.warmup": "calls before timing starts (causal LMs: generations, at most 3)",
    "Timing.min_iters": "a process times at least this many calls (causal LMs: decode steps)",
    "Timing.max_seconds": "a process stops timing after this long, even before min_iters (the cell is then "
                          "marked unstable)",
    "BenchSpec.cell_timeout_s": "a measuring process running longer than this is killed and the cell failed",
    "ReportSpec.baseline": "the variant accuracy deltas and speedups are computed against",
    "ReportSpec.constraints": "what the recommended cell must meet",
    "Constraints.max_accuracy_drop": "largest drop in the task's primary metric against the baseline (perplexity: "
                                     "largest increase). Default, when neither this nor max_perplexity_increase is "
                                     "set: 1 % of the baseline's score (a random-weights LM's KL has no default), so "
                                     "a variant that lost its accuracy is never recommended for its speed alone",
    "Constraints.max_latency_ms": "largest p50",
    "Constraints.max_memory_mb": "largest peak RSS increase",
    "Constraints.backend": "recommend only cells of this backend",
    "Constraints.batch_size": "the batch size the recommendation is made at (default: the first of "
                              "`bench.batch_sizes`)",
    "SearchSpec.objective": "what the search minimises: p50 on one backend at one batch size",
    "SearchSpec.constraints": "what a candidate must meet before it is timed",
}

# Prose under each section's heading: facts that belong to no single field.
SECTION_NOTES = {
    "model": "One of the mappings below, chosen by `source`.",
    "task": "One of the mappings below, chosen by `type`; the task must fit the model's output (a classifier, "
            "an embedding or a causal LM).",
    "task.data": "One of the mappings below, chosen by `source`. A data file is never scored on rows a step used: "
                 "`eval_fraction` of it is held out (stratified by label, seeded by the recipe's `seed`, the same "
                 "rows on every run), and distillation, calibration and pruning statistics see only the rest; or "
                 "`eval_path` names a separate file to score on. results.json's `task.rows` says how many rows each "
                 "role got, and for a classifier `task.majority_rate` what predicting the commonest class would "
                 "score. Text training splits are cut into batches of similar length, in a seeded shuffled order.",
    "variants.<name>": "A mapping `name: {from, steps, backends, reference}`; variant names hold letters, digits, "
                       "`.`, `_` and `-`. More than one variant may start from the source model (no `from`), and a "
                       "variant may have no steps: `{reference: true, backends: [ort-cpu]}` measures the model as "
                       "it is, with an engine's defaults. "
                "A torch variant reaching an ONNX step is exported first (recorded in its lineage); a torch step "
                "after an ONNX step is rejected when the recipe loads. Finished variants are cached by the hash of "
                "everything that made them, so a re-run redoes no compression.",
    "export": "Also written as the list shorthand `export: [onnx, torchscript]`. Parity is measured on real "
              "evaluation inputs against the module the file came from, after reloading the file in a fresh "
              "process; an export outside the tolerances is a failed artifact. A module with no form in a format "
              "(PyTorch dynamic-int8 layers have no ONNX form) gets a skipped artifact saying what to do instead.",
    "bench": "Every cell (variant x backend x batch size) is measured in `repeats` processes over interleaved "
             "rounds; see [methodology.md](methodology.md).",
    "report": "The report recommends the fastest cell meeting the constraints; a constraint that cannot be judged "
              "(no baseline score, no memory figure) fails the cell and says so.",
    "search": "Every candidate is built through the variant cache and scored on the evaluation split before any "
              "timing; the others are timed in interleaved rounds on the objective, and the winner (same steps, "
              "same cache entry) is benchmarked on every backend like the hand-written variants. `validate` checks "
              "every candidate as a variant; results.json gains `search` and the report a search table and plot. "
              "Example space: `{steps[0].fusion: [bert, none], steps[1].per_channel: [true, false], "
              "steps[1].keep_fp32: [null, {top_k: 3}]}`.",
}

# ----------------------------------------------------------------------------- registries
def _packages() -> set[str]:
    return {m.split(".")[0] for m in plugins.MODULES}


def builtin(registry: dict) -> dict:
    """The entries of a registry that the built-in modules registered, sorted by name."""
    pkgs = _packages()
    return {n: c for n, c in sorted(registry.items()) if c.__module__.split(".")[0] in pkgs}


def _registries():
    plugins.load()
    from core.backends import BACKENDS
    from core.formats import FORMATS
    from core.steps import STEPS

    return builtin(STEPS), builtin(BACKENDS), builtin(FORMATS)


# ----------------------------------------------------------------------------- types
def _strip(t):
    """(the type without Annotated, its metadata)."""
    meta = []
    while typing.get_origin(t) is typing.Annotated:
        t, *m = typing.get_args(t)
        meta += m
    return t, meta


def _is_model(t) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _union_args(t) -> tuple:
    return typing.get_args(t) if typing.get_origin(t) in (Union, types.UnionType) else ()


def _models_in(t) -> list[type[BaseModel]]:
    """The pydantic models a field holds (through Optional, unions, lists and dict values)."""
    t, _ = _strip(t)
    if _is_model(t):
        return [t]
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (Union, types.UnionType):
        return [m for a in args for m in _models_in(a)]
    if origin in (list, dict):
        return _models_in(args[-1]) if args else []
    return []


def _constraints(meta) -> str:
    out = []
    for m in meta:
        if isinstance(m, FieldInfo):
            out.append(_constraints(m.metadata))
        elif isinstance(m, at.Gt):
            out.append(f"> {m.gt}")
        elif isinstance(m, at.Ge):
            out.append(f">= {m.ge}")
        elif isinstance(m, at.Lt):
            out.append(f"< {m.lt}")
        elif isinstance(m, at.Le):
            out.append(f"<= {m.le}")
        elif isinstance(m, at.MinLen):
            out.append(f"at least {m.min_length}")
        elif isinstance(m, at.MaxLen):
            out.append(f"at most {m.max_length}")
        elif getattr(m, "pattern", None):
            out.append(f"matching `{m.pattern}`")
        elif isinstance(m, BeforeValidator) and getattr(m.func, "__name__", "") == "_percent":
            out.append("or a percentage such as `5%`")
    return ", ".join(o for o in out if o)


def _type(t, names: dict, where: str = "") -> str:
    """A field's type in words. `names` maps registry-name annotations to what they name."""
    for ann, label in names.items():
        if t == ann:
            return label
    t, meta = _strip(t)
    c = _constraints(meta)
    text = _bare_type(t, names, where)
    return f"{text} {c}" if c else text


def _bare_type(t, names: dict, where: str) -> str:
    if t is type(None):
        return "null"
    if t is Any:
        return "any"
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is Literal:
        return " / ".join(f"`{_flow(a)}`" for a in args)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        models = [a for a in rest if _is_model(_strip(a)[0])]
        if models and len(models) == len(rest) and len(models) > 1:
            return f"mapping, one of `{where}` below"
        return " / ".join(_type(a, names, where) for a in rest)
    if origin is list:
        return f"list of {_type(args[0], names, where)}" if args else "list"
    if origin is dict:
        return f"mapping {_type(args[0], names, where)} -> {_type(args[1], names, where)}"
    if _is_model(t):
        return f"mapping (`{where}` below)" if where else "mapping"
    return getattr(t, "__name__", str(t))


def _flow(v) -> str:
    """A value as it would be written in a YAML recipe (flow style)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, BaseModel):
        return _flow(v.model_dump(mode="json", by_alias=True, exclude_defaults=True))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_flow(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_flow(x)}" for k, x in v.items()) + "}"
    return str(v)


def _default(f: FieldInfo) -> str:
    if f.is_required():
        return "required"
    if f.default_factory is not None:
        v = f.default_factory()
    else:
        v = f.default
    if v is PydanticUndefined:
        return "required"
    if isinstance(v, BaseModel) and not v.model_dump(exclude_defaults=True):
        return "the defaults below"
    return f"`{_flow(v)}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _para(text: str) -> str:
    """Prose wrapped at 110 columns, so the generated file reads well as plain text too."""
    return textwrap.fill(" ".join(text.split()), width=110, break_long_words=False, break_on_hyphens=False)


def _doc(cls) -> str:
    d = cls.__dict__.get("__doc__")
    return " ".join(inspect.cleandoc(d).split()) if d else ""


# ----------------------------------------------------------------------------- markdown
def _names() -> dict:
    from workbench import recipe

    return {recipe.BackendName: "backend name", recipe.ExportFormat: "export format name"}


def _field_table(cls, path: str, names: dict, used: set) -> tuple[list[str], list[tuple[str, Any]]]:
    """The table of a model's fields, and the nested (path, annotation) to document below it."""
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    nested = []
    for attr, f in cls.model_fields.items():
        key = f.alias or attr
        sub = f"{path}.{key}" if path else key
        models = _models_in(f.annotation)
        t, _ = _strip(f.annotation)
        if models:
            origin = typing.get_origin(t)
            if origin is dict:
                ka = typing.get_args(t)[0]
                sub = f"{sub}.<{'backend' if ka in names else 'name'}>"
            nested.append((sub, f.annotation))
        note_key = f"{cls.__name__}.{attr}"
        desc = f.description or NOTES.get(note_key, "")
        if note_key in NOTES:
            used.add(note_key)
            if f.description:
                raise RuntimeError(f"recipe_docs.NOTES[{note_key!r}] is covered by the field's own description: "
                                   "remove the note")
        extra = _constraints(f.metadata)
        typ = _type(f.annotation, names, sub)
        if attr == "steps" and t == list[Any]:
            typ = "list of steps (see [Steps](#steps))"
        if extra:
            typ = f"{typ}, {extra}"
        rows.append(f"| `{key}` | {_cell(typ)} | {_cell(_default(f))} | {_cell(desc)} |")
    return rows, nested


def _discriminator(cls) -> str:
    for attr, f in cls.model_fields.items():
        t, _ = _strip(f.annotation)
        if typing.get_origin(t) is Literal and len(typing.get_args(t)) == 1 and f.is_required():
            return f"{f.alias or attr}: {typing.get_args(t)[0]}"
    return cls.__name__


def _model_sections(path: str, annotation, names: dict, used: set, level: int) -> list[str]:
    """A section for the model(s) at `path`: one table per member of a union, then the models nested
    in them, each path once (the union of what its members hold there)."""
    models = _models_in(annotation)
    if not models:
        return []
    out = [f"{'#' * min(level, 6)} `{path}`", ""]
    if len(models) == 1 and _doc(models[0]):
        out += [_para(_doc(models[0])), ""]
    if path in SECTION_NOTES:
        out += [_para(SECTION_NOTES[path]), ""]
        used.add(f"section:{path}")
    nested: dict[str, list] = {}
    for cls in models:
        if len(models) > 1:
            out += [f"{'#' * min(level + 1, 6)} `{path}` with `{_discriminator(cls)}`", ""]
        if len(models) > 1 and _doc(cls):
            out += [_para(_doc(cls)), ""]
        rows, sub = _field_table(cls, path, names, used)
        out += rows + [""]
        for p, ann in sub:
            have = nested.setdefault(p, [])
            have += [m for m in _models_in(ann) if m not in have]
    for p, ms in nested.items():
        out += _model_sections(p, Union[tuple(ms)] if len(ms) > 1 else ms[0], names, used, level + 1)
    return out


def _steps_section(steps: dict, names: dict, used: set) -> list[str]:
    out = ["## Steps", "",
           _para("A step is written `name` or `{name: {param: value}}` in a variant's `steps`. `acts on` is what "
                 "it needs: a PyTorch module (`torch`) or an ONNX graph (`onnx`); a torch variant reaching an ONNX "
                 "step is exported first."), "",
           "| step | acts on | gives | what it does |", "|---|---|---|---|"]
    for name, s in steps.items():
        gives = s.consumes if s.produces == "same" else s.produces
        out.append(f"| [`{name}`](#step-{name}) | {s.consumes} | {gives} | {_cell(s.summary)} |")
    out.append("")
    for name, s in steps.items():
        summary = s.summary[:1].upper() + s.summary[1:] + "."
        out += [f'<a id="step-{name}"></a>', "", f"### `{name}`", "", _para(summary), ""]
        if s.details:  # what the step's own module says about it beyond its parameters
            out += [_para(s.details), ""]
        rows, nested = _field_table(s.Params, name, names, used)
        out += rows + [""]
        for sub, ann in nested:
            out += _model_sections(sub, ann, names, used, 4)
    return out


def _backends_section(backends: dict, names: dict, used: set) -> list[str]:
    from workbench.recipe import BenchSpec

    default = BenchSpec().backends
    out = ["## Backends", "",
           _para("A backend runs one artifact format on one device. `default`: in `bench.backends` when a recipe "
                 "sets none. `generates`: measures causal LMs by generation (the others give skipped cells for "
                 "them). `workbench list` says which backends can run on this machine; one that cannot becomes a "
                 "skipped cell with the reason."), "",
           "| backend | format | device | default | generates | what it is |", "|---|---|---|---|---|---|"]
    for name, b in backends.items():
        out.append(f"| `{name}` | `{b.format}` | {b.device} | {'yes' if name in default else ''} | "
                   f"{'yes' if getattr(b, 'generates', False) else ''} | {_cell(b.summary)} |")
    out.append("")
    # The options a backend takes (`bench.options.<backend>`), once per options model.
    by_model: dict = {}
    for name, b in backends.items():
        if getattr(b, "Options", None) is not None:
            by_model.setdefault(b.Options, []).append(name)
    for model, owners in by_model.items():
        out += [f"### Options of {', '.join(f'`{n}`' for n in owners)}", "",
                _para(f"Set in `bench.options.{owners[0]}`; a reference variant's cells run without them."), ""]
        rows, nested = _field_table(model, f"bench.options.{owners[0]}", names, used)
        out += rows + [""]
    return out


def _formats_section(formats: dict, backends: dict) -> list[str]:
    suffixes = any(getattr(f, "suffixes", None) for f in formats.values())
    head = "| format | file | " + ("suffixes | " if suffixes else "") + "run by | what it is |"
    out = ["## Export formats", "",
           "Named in `export.formats`; every variant is exported to each, with a parity check.", "",
           head, "|---|---|" + ("---|" if suffixes else "") + "---|---|"]
    for name, f in formats.items():
        runners = ", ".join(f"`{b}`" for b, c in backends.items() if c.format == name)
        suf = (" " + ", ".join(f"`{s}`" for s in getattr(f, "suffixes", ()) or ()) + " |") if suffixes else ""
        out.append(f"| `{name}` | `{f.file_name}` |{suf} {runners} | {_cell(f.summary)} |")
    for fmt in sorted({b.format for b in backends.values()} - set(formats)):
        runners = ", ".join(f"`{b}`" for b, c in backends.items() if c.format == fmt)
        what = "the variant's own PyTorch module (`module.pt`; no export needed)" if fmt == "torch" else ""
        out.append(f"| `{fmt}` | – |{' – |' if suffixes else ''} {runners} | {what} |")
    return out + [""]


def render() -> str:
    """docs/recipe-reference.md, as the code defines it now."""
    from workbench.recipe import Recipe

    steps, backends, formats = _registries()
    names = _names()
    used: set[str] = set()
    out = ["# Recipe reference", "",
           f"<!-- Generated by `{COMMAND}` from workbench/recipe.py and the step, backend and format registries. "
           "Do not edit: change the code and regenerate. -->", "",
           _para("A recipe is a YAML file (read with `yaml.safe_load`). Every section is checked before any work is "
                 "done; an unknown key is an error, and `workbench validate RECIPE` names the field, the bad value "
                 "and what is accepted; it then loads the model and reads the data files as `run` does first (a model or "
                 "data file the run cannot use is named the same way; `--recipe-only` skips that). A backend whose "
                 "artifact format no variant has (not in `export.formats`, and no variant's steps end in it) is "
                 "refused. Relative paths are relative to the recipe file's folder. "
                 "[recipe.schema.json](recipe.schema.json) is the same schema for an editor (with the YAML language "
                 "server: `# yaml-language-server: $schema=../docs/recipe.schema.json` as a recipe's first line)."),
           "",
           _para("Sections: " + ", ".join(f"`{f.alias or k}`" for k, f in Recipe.model_fields.items())
                 + "; then [Steps](#steps), [Backends](#backends) and [Export formats](#export-formats)."), "",
           "## Top level", ""]
    rows, nested = _field_table(Recipe, "", names, used)
    out += rows + [""]
    for sub, ann in nested:
        out += _model_sections(sub, ann, names, used, 2)
    out += _steps_section(steps, names, used)
    out += _backends_section(backends, names, used)
    out += _formats_section(formats, backends)
    stale = sorted((set(NOTES) | {f"section:{k}" for k in SECTION_NOTES}) - used)
    if stale:
        raise RuntimeError(f"recipe_docs notes name fields or sections that no longer exist: {', '.join(stale)}")
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- JSON Schema
def _walk_models(root: type[BaseModel]) -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []
    todo = [root]
    while todo:
        cls = todo.pop(0)
        if cls in seen:
            continue
        seen.append(cls)
        for f in cls.model_fields.values():
            todo += _models_in(f.annotation)
    return seen


def _contains(t, target) -> bool:
    if t == target:
        return True
    if typing.get_origin(t) is typing.Annotated:
        return False
    return any(_contains(a, target) for a in typing.get_args(t))


def _add_enum(node, values: list[str]) -> None:
    """Every plain string in `node` (not behind a $ref) becomes one of `values`."""
    if isinstance(node, dict):
        if node.get("type") == "string" and "enum" not in node and "$ref" not in node:
            node["enum"] = list(values)
        for k, v in node.items():
            if k not in ("additionalProperties",):
                _add_enum(v, values)
    elif isinstance(node, list):
        for v in node:
            _add_enum(v, values)


def _step_schema(steps: dict, defs: dict) -> dict:
    """A step as written: its name, or {name: {params}} with the step's own parameter schema."""
    props = {}
    for name, s in steps.items():
        sch = s.Params.model_json_schema(ref_template="#/$defs/{model}")
        for k, v in sch.pop("$defs", {}).items():
            if defs.setdefault(k, v) != v:
                raise RuntimeError(f"two schemas named {k} in the step parameters")
        key = f"step-{name}"
        defs[key] = sch
        props[name] = {"anyOf": [{"$ref": f"#/$defs/{key}"}, {"type": "null"}],
                       "description": s.summary}
    return {"anyOf": [{"type": "string", "enum": list(steps)},
                      {"type": "object", "properties": props, "additionalProperties": False,
                       "minProperties": 1, "maxProperties": 1}]}


def schema() -> dict:
    """The recipe as JSON Schema (draft 2020-12), `Recipe.model_json_schema()` made exact where
    validators do what a schema cannot see: registered names as enums, steps with their parameters,
    `export:` as a list, `5%` for a percentage."""
    from workbench.recipe import ExportSpec, Recipe

    steps, backends, formats = _registries()
    s = Recipe.model_json_schema(by_alias=True)
    defs = s.setdefault("$defs", {})
    names = {ann: list(reg) for ann, reg in zip(_names(), (backends, formats))}
    step_item = _step_schema(steps, defs)
    for cls in _walk_models(Recipe):
        node = s if cls is Recipe else defs[cls.__name__]
        for attr, f in cls.model_fields.items():
            prop = node["properties"][f.alias or attr]
            for ann, values in names.items():
                if not _contains(f.annotation, ann):
                    continue
                t, _ = _strip(f.annotation)
                if typing.get_origin(t) is dict and typing.get_args(t)[0] == ann:
                    prop["propertyNames"] = {"enum": list(values)}
                else:
                    _add_enum(prop, values)
            t, _ = _strip(f.annotation)
            if attr == "steps" and typing.get_origin(t) is list and typing.get_args(t) == (Any,):
                prop["items"] = step_item
            if any(isinstance(m, BeforeValidator) and getattr(m.func, "__name__", "") == "_percent"
                   for m in f.metadata):
                prop.setdefault("anyOf", []).append({"type": "string", "pattern": r"^\s*[0-9]*\.?[0-9]+\s*%\s*$"})
    if hasattr(ExportSpec, "_list_shorthand"):  # `export: [onnx, torchscript]`
        s["properties"]["export"] = {"anyOf": [{"$ref": "#/$defs/ExportSpec"},
                                               {"type": "array", "items": {"type": "string", "enum": list(formats)}}],
                                     "description": "formats and parity, or the list of formats alone"}
    s["title"] = "model-workbench recipe"
    s["description"] = f"Generated by `{COMMAND}` from workbench/recipe.py; do not edit."
    s["$defs"] = dict(sorted(defs.items()))
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **s}


def schema_text() -> str:
    return json.dumps(schema(), indent=2, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------- command
def generated() -> dict[Path, str]:
    return {REFERENCE: render(), SCHEMA: schema_text()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description="Write (or --check) docs/recipe-reference.md and "
                                 "docs/recipe.schema.json from the recipe schema and the registries.")
    ap.add_argument("--check", action="store_true", help="exit 1 when a committed file differs from what the code "
                    "would generate")
    args = ap.parse_args(argv)
    files = generated()
    root = DOCS.parent
    if args.check:
        stale = [p for p, text in files.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
        for p in stale:
            print(f"{p.relative_to(root)} is stale: run `{COMMAND}` and commit the result", file=sys.stderr)
        return 1 if stale else 0
    for p, text in files.items():
        atomic.write_text(p, text)
        os.chmod(p, 0o644)  # the temp file it was renamed from is private to its owner
        print(f"wrote {p.relative_to(root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
