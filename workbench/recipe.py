"""The recipe: a YAML file validated into typed objects before any work is done.

Every section is a pydantic model with `extra="forbid"`, so a typo is an error, not a silently
ignored key. `load_recipe` turns every problem into one `RecipeError` paragraph that names the file,
the field path, the bad value and what would be accepted.
"""
from __future__ import annotations

import hashlib
import importlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (AfterValidator, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError,
                      model_validator)

from core.backends import BACKENDS, default_backends
from core.errors import RecipeError, field_error
from core.params import NoBoolNumbers
from core.formats import FORMATS
from workbench import plugins
from workbench.schema_errors import pydantic_error

plugins.load()  # the registries below are complete from here on


def _registered(registry: dict, what: str) -> AfterValidator:
    """A name checked against a registry when the recipe is validated (not when this module is
    imported), so a step, backend or format registered later is accepted too."""

    def check(name: str) -> str:
        if name not in registry:
            raise ValueError(f"is not {what} this install offers; accepted: {', '.join(registry)}")
        return name

    return AfterValidator(check)


BackendName = Annotated[str, _registered(BACKENDS, "a backend")]
ExportFormat = Annotated[str, _registered(FORMATS, "an export format")]


_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Strict(NoBoolNumbers):
    # No infinity or NaN in a recipe: `.inf` as a timeout or a bound is a typo, never a setting.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------- model
class InputSpec(Strict):
    """One model input. Dimensions are ints or the symbols `batch` / `seq`, filled at run time."""

    shape: list[Union[int, Literal["batch", "seq"]]]
    dtype: Literal["float32", "float16", "int64", "int32"] = "float32"
    low: int = Field(0, description="integer inputs: random values are drawn from [low, high)")
    high: int = 2


class BuiltinModel(Strict):
    source: Literal["builtin"]
    name: Literal["digits-cnn", "minilm-l6", "docstring-gpt"] = Field(description=(
        "digits-cnn: a small CNN trained on scikit-learn's digits; minilm-l6: all-MiniLM-L6-v2 (sentence "
        "embeddings); docstring-gpt: a small Llama-layout decoder LM trained on the standard library's docstrings "
        "and code on first use (about 4 minutes on 2 cores), then cached"))


class HFModel(Strict):
    source: Literal["hf"]
    path: str = Field(description="a local save_pretrained directory or a hub id")
    head: Literal["embedding", "sequence-classification", "causal-lm"] = Field(
        "embedding", description="embedding: the encoder with pooling; sequence-classification: logits of an "
        "AutoModelForSequenceClassification; causal-lm: an AutoModelForCausalLM (GPT-2, Llama, Qwen2, Mistral, "
        "Phi and others), measured by generation")
    pooling: Literal["mean", "cls"] = "mean"
    weights: Literal["pretrained", "random"] = Field(
        "pretrained", description="random: the architecture built from `path`'s config.json with weights drawn from "
        "the recipe's seed, nothing downloaded (a folder holding only config.json will do; without a tokenizer "
        "there, a byte-level BPE trained on the task's built-in text is used). For latency and memory at "
        "deployment size: accuracy is then fidelity to that same random fp32 model (top-1 agreement, KL), and "
        "perplexity means nothing")
    trust_remote_code: bool = False
    revision: Optional[str] = None


class TorchvisionModel(Strict):
    source: Literal["torchvision"]
    name: str
    checkpoint: Optional[str] = Field(None, description="state_dict file (.safetensors or .pt)")
    num_classes: int = 1000
    image_size: int = Field(224, gt=0)


class PythonModel(Strict):
    source: Literal["python"]
    ref: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    kind: Literal["classifier", "embedding"] = "classifier"
    inputs: dict[str, InputSpec] = Field(min_length=1)
    checkpoint: Optional[str] = None
    kwargs: dict[str, Any] = Field(default_factory=dict)


ModelSpec = Annotated[
    Union[BuiltinModel, HFModel, TorchvisionModel, PythonModel], Field(discriminator="source")
]


# ----------------------------------------------------------------------------- task
class BuiltinData(Strict):
    source: Literal["builtin"]
    name: Literal["digits", "stdlib-docstrings"]


class FileData(Strict):
    source: Literal["file"]
    path: str = Field(description=".csv, .jsonl or .npz (arrays `x` and `y`)")
    text_field: str = "text"
    label_field: str = "label"
    eval_fraction: float = Field(0.25, gt=0, lt=1, description="share of `path` held out for evaluation (stable, "
                                 "seeded, stratified by label; identical texts stay on one side); the steps "
                                 "(calibration, distillation, pruning statistics) see only the rest")
    eval_path: Optional[str] = Field(None, description="a separate file of the same kind to evaluate on; then all "
                                     "of `path` is for the steps and eval_fraction is not used")


DataSpec = Annotated[Union[BuiltinData, FileData], Field(discriminator="source")]


class ClassificationTask(Strict):
    type: Literal["classification"]
    data: DataSpec
    eval_size: Optional[int] = Field(None, gt=0)


class TextClassificationTask(Strict):
    type: Literal["text-classification"]
    data: FileData
    eval_size: Optional[int] = Field(None, gt=0)
    max_length: int = Field(128, gt=0)


class EmbeddingFidelityTask(Strict):
    type: Literal["embedding-fidelity"]
    data: DataSpec
    eval_size: int = Field(512, gt=1)
    max_length: int = Field(128, gt=0)


class LanguageModelingTask(Strict):
    type: Literal["language-modeling"]
    data: DataSpec = Field(description="builtin stdlib-docstrings, or a .txt (documents separated by blank lines), "
                           ".csv or .jsonl file (text_field)")
    block_size: int = Field(128, gt=1, description="tokens per evaluation and training block (texts are packed "
                            "end to end, separated by the tokenizer's end-of-text token)")
    eval_blocks: int = Field(64, gt=0, description="held-out blocks scored: perplexity, and top-1 agreement and KL "
                             "of next-token distributions against the source model")


class NoTask(Strict):
    type: Literal["none"]


TaskSpec = Annotated[
    Union[ClassificationTask, TextClassificationTask, EmbeddingFidelityTask, LanguageModelingTask, NoTask],
    Field(discriminator="type"),
]


# ----------------------------------------------------------------------------- variants
class StepCall(Strict):
    """A step as written in a variant, with its parameters validated and defaults filled in."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class Suggested(Strict):
    """Where a variant came from when `workbench suggest` wrote it: the report's finding it answers."""

    for_: str = Field(alias="for", description="the variant whose diagnosis suggested this one")
    finding: str = Field(description="the cause the report found, in its words")
    kind: str = Field("engine", description="the kind of cause (see docs/report.md)")


class VariantSpec(Strict):
    from_: Optional[str] = Field(None, alias="from")
    # Raw here; load_recipe replaces each entry with a validated StepCall.
    steps: list[Any] = Field(default_factory=list)
    backends: Optional[list[BackendName]] = Field(
        None, min_length=1, description="the backends this variant is measured on, instead of bench.backends: "
        "for a backend that pays only for some variants (a compiler for a bf16 model) or costs too much "
        "for all of them")
    suggested: Optional[Suggested] = Field(None, description="set by `workbench suggest`: the finding this variant "
                                           "tries the fix of; the report says what the fix gave")
    reference: bool = Field(False, description=(
        "a reference: what a user gets from an engine's own defaults without the workbench (the source model as it "
        "is on one backend, `{reference: true, backends: [ort-cpu]}`, or an engine's stock int8). Measured and shown "
        "like any other variant, labelled as a reference, never recommended; the report gives the recommendation's "
        "speedup against the fastest reference at each batch size, paired by round"))
    options: dict[BackendName, dict[str, Any]] = Field(default_factory=dict, description=(
        "per backend, engine options for this variant's cells, over bench.options: the same artifact under "
        "another engine setting beside the default, e.g. a GGUF with an 8-bit KV cache, `{from: baseline, "
        "steps: [{gguf-quantize: {type: q4_0}}], options: {llama-cpp: {kv_cache_type: q8_0}}}` (the same steps "
        "as another variant reuse its build)"))
    formats: Optional[list[ExportFormat]] = Field(None, min_length=1, description=(
        "the export formats this variant is made in, instead of export.formats (each one of them): a format no "
        "backend of the variant runs costs an export and a parity check for nothing, e.g. `formats: [onnx]` "
        "for the variants that OpenVINO does not measure. The others are skipped artifacts saying so"))


# ----------------------------------------------------------------------------- export
class ParityTolerance(Strict):
    max_abs_diff: Optional[float] = Field(1e-3, gt=0)
    min_cosine: Optional[float] = Field(None, ge=-1, le=1)
    min_top1_agreement: Optional[float] = Field(None, ge=0, le=1)


class ExportSpec(Strict):
    formats: list[ExportFormat] = Field(default_factory=lambda: ["onnx"])
    opset: int = Field(18, ge=14, le=23)
    exporter: Literal["dynamo", "torchscript", "optimum", "decoder"] = "dynamo"
    parity: ParityTolerance = Field(default_factory=ParityTolerance)
    openvino_fp16: bool = Field(False, description="openvino format: store the IR's weights as fp16 (OpenVINO's "
                                "`compress_to_fp16`); default: as they are, so the IR's parity is the conversion's")

    @model_validator(mode="before")
    @classmethod
    def _list_shorthand(cls, data):
        # `export: [onnx, torchscript]` is short for `export: {formats: [...]}`.
        return {"formats": data} if isinstance(data, list) else data


# ----------------------------------------------------------------------------- bench
class Timing(Strict):
    warmup: int = Field(10, ge=0)
    min_iters: int = Field(50, ge=5)
    min_seconds: float = Field(1.0, ge=0, description="per process; a cell runs `repeats` processes")
    max_seconds: float = Field(60.0, gt=0)
    stability_threshold: float = Field(
        0.25, gt=0, description="max relative spread of window medians before a cell is 'unstable'")


class Placement(Strict):
    resources: dict[str, float] = Field(default_factory=dict, description=(
        "Ray custom resources a cell of this backend asks for, naming the hardware it must run on "
        "(e.g. {H100: 1}); nodes offer them with `ray start --resources`"))


class ScenarioSpec(Strict):
    type: Literal["single-stream", "offline", "server"] = Field(description=(
        "single-stream: one query at a time (MLPerf's figure is its p90 latency); offline: every query at once "
        "(samples/s); server: Poisson arrivals, and the capacity search for the highest QPS whose percentile "
        "latency meets latency_bound_ms, by LoadGen's own VALID / INVALID verdict"))
    name: Optional[str] = Field(None, description="the scenario's label in the report; default: its type, with "
                                "max_batch and streams when they are not 1")
    variants: Optional[list[str]] = Field(None, description="the variants measured under it; default: every variant")
    backends: Optional[list[BackendName]] = Field(None, description="of each variant's backends, only these; "
                                                  "default: all of them")
    latency_bound_ms: Optional[float] = Field(None, gt=0, description="server: the latency bound (required, "
                                              "except for a causal LM)")
    ttft_bound_ms: Optional[float] = Field(None, gt=0, description=(
        "server, causal LMs: the bound on the time to each request's first token (LoadGen's token latencies; "
        "required with tpot_bound_ms). Each request is one greedy generation of bench.new_tokens tokens from a "
        "bench.seq_len-token prompt; requests batched together generate together"))
    tpot_bound_ms: Optional[float] = Field(None, gt=0, description="server, causal LMs: the bound on the time per "
                                           "output token after the first (required with ttft_bound_ms)")
    percentile: float = Field(99.0, gt=50, lt=100, description="server: the latency percentile held to the bound")
    max_batch: int = Field(1, ge=1, le=256, description="the SUT batches up to this many waiting requests "
                           "(dynamic batching); 1: one request per call")
    max_wait_ms: float = Field(2.0, ge=0, description="how long the oldest waiting request may wait for its batch "
                               "to fill")
    batching: Literal["by-length", "fifo", "packed"] = Field("by-length", description=(
        "which waiting requests a batch takes, and how. by-length: the oldest and those no longer than it (its "
        "padded length), oldest first; fifo: the oldest ones, whatever their lengths. Where a batch costs its "
        "padded tokens, one long request in a batch of short ones makes all of them long; a longer request waits "
        "for a later batch, which it leads once it is the oldest. Requests of one length (synthetic, "
        "generations) batch the same either way. packed: the oldest ones, their own tokens one after another in "
        "one row, padded once (no request pays for another's length); for variants made with the pack-sequences "
        "step, and inputs: task"))
    max_batch_tokens: Optional[int] = Field(None, ge=1, description=(
        "a batch stops before the request that would take its padded tokens (batch x padded length; packed: "
        "the requests' tokens together) past this; the oldest request always goes. On an engine whose time "
        "grows with its tokens, a cap keeps one large batch from holding the queue behind it "
        "(text-embeddings-inference's max_batch_tokens); default: none"))
    streams: int = Field(1, ge=1, le=64, description="parallel sessions serving the queue, the cell's threads "
                         "split between them")
    min_duration_s: float = Field(10.0, gt=0, description="each LoadGen test runs at least this long (--quick: 2)")
    min_queries: int = Field(1000, ge=1, description="and at least this many queries. server: LoadGen's early "
                             "stopping calls a p99 VALID only after 459 queries all under the bound (662 with one "
                             "over, 838 with two; p90: 44), so fewer is refused")
    max_duration_s: float = Field(30.0, gt=0, description="each LoadGen test stops after this long (a target too "
                                  "low to reach min_queries within it is not tried)")
    max_steps: int = Field(8, ge=2, le=30, description="server: LoadGen tests per capacity search (the ladder)")
    inputs: Literal["task", "synthetic"] = Field("task", description=(
        "what the requests hold. task: the task's evaluation rows (up to `samples` of them), each at its own "
        "length (its attention mask), a batch padded to its longest request rounded up to pad_multiple, as a "
        "server pads; synthetic: every request the same random input of bench.seq_len tokens. A task without "
        "evaluation inputs, and a causal LM's generations (bench.seq_len-token prompts), are synthetic"))
    pad_multiple: int = Field(16, ge=1, le=4096, description=(
        "inputs: task: a batch's sequence length is rounded up to a multiple of this. Every (batch size, "
        "length) a test can meet runs once at warm-up, so an engine that compiles per shape (OpenVINO's "
        "static_shape) compiles max_batch x (longest / pad_multiple) shapes there (fewer under "
        "max_batch_tokens)"))
    samples: int = Field(64, ge=1, description="the query sample library's size: that many evaluation rows "
                         "(inputs: task; fewer where the task has fewer) or synthetic inputs")

    @property
    def label(self) -> str:
        extra = (f"-b{self.max_batch}" if self.max_batch > 1 else "") + (f"-s{self.streams}" if self.streams > 1 else "")
        return self.name or self.type + extra


class BenchSpec(Strict):
    backends: list[BackendName] = Field(default_factory=default_backends, min_length=1)
    batch_sizes: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [1, 8], min_length=1)
    seq_len: int = Field(128, gt=0, description="sequence length of text inputs; causal LMs: the prompt length")
    new_tokens: int = Field(32, ge=2, description="causal LMs: tokens generated greedily per measured generation "
                            "(the first one is the time to first token, the rest the per-token decode latency)")
    prompt_lens: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list, description=(
        "causal LMs: more prompt lengths at which every generation cell also measures the time to first token "
        "(and the peak memory so far), in the same process after its timed generations, so TTFT against prompt "
        "length is measured, not extrapolated; the per-token decode samples stay at seq_len"))
    threads: Optional[int] = Field(None, gt=0, description="intra-op threads; default: all cores")
    timing: Timing = Field(default_factory=Timing)
    repeats: int = Field(3, ge=1, le=20, description="processes per cell, one per interleaved round; --quick: "
                         "at most 2")
    accuracy: bool = Field(True, description="run the evaluation split through every cell")
    profile: bool = Field(True, description="an op-level profile (ORT's profiler, torch.profiler) of each measured "
                          "cell at the report's batch size, in a process of its own after the timed ones; the report "
                          "explains from it why a variant is not faster than its parent (--quick: off unless set)")
    cell_timeout_s: float = Field(900, gt=0)
    memory_limit_mb: Optional[float] = Field(None, gt=0, description="kill a cell whose process RSS exceeds this")
    executor: Literal["local", "ray"] = Field("local", description=(
        "local: every cell process on this machine, one at a time; ray: each one a Ray task, on a local Ray "
        "instance or the cluster at ray_address (`workbench run --executor` overrides it)"))
    ray_address: Optional[str] = Field(None, description="a Ray cluster to join (what `ray start --head` prints, "
                                       "e.g. 10.0.0.5:6379); default: start a local Ray instance")
    scenarios: list[ScenarioSpec] = Field(default_factory=list, description=(
        "load scenarios measured under MLCommons LoadGen beside the latency cells, in the same rounds: a serving "
        "SUT with dynamic batching; see docs/methodology.md. For a causal LM each request is a generation, held "
        "to ttft_bound_ms / tpot_bound_ms"))
    options: dict[BackendName, dict[str, Any]] = Field(default_factory=dict, description=(
        "per backend, its engine's options, checked against the options the backend accepts (e.g. {openvino-cpu: "
        "{inference_precision: f32}}); a reference variant's cells run with none: the engine's defaults"))
    placement: dict[BackendName, Placement] = Field(default_factory=dict, description=(
        "per backend, where its cells may run under Ray: {BACKEND: {resources: {H100: 1}}}"))


# ----------------------------------------------------------------------------- report
def _percent(value):
    """`5%` is 0.05; a plain number is already a fraction."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return float(value.strip()[:-1]) / 100
        except ValueError:
            return value
    return value


class Constraints(Strict):
    max_accuracy_drop: Optional[float] = Field(None, ge=0)
    max_perplexity_increase: Annotated[Optional[float], BeforeValidator(_percent)] = Field(
        None, ge=0, description="language modelling: largest relative perplexity increase over the baseline "
        "(`5%` or 0.05)")
    max_latency_ms: Optional[float] = Field(None, gt=0)
    max_memory_mb: Optional[float] = Field(None, gt=0)
    backend: Optional[BackendName] = None
    batch_size: Optional[int] = Field(None, gt=0)


class ReportSpec(Strict):
    baseline: str = "baseline"
    constraints: Constraints = Field(default_factory=Constraints)
    target_qps: Optional[float] = Field(None, gt=0, description="a load to serve: the report says how many machines "
                                        "like this one each server scenario cell needs for it")
    objective: Literal["latency", "capacity"] = Field("latency", description=(
        "what the recommendation ranks by among the cells that meet the constraints: latency (the lowest p50 at "
        "the constraint's batch size) or capacity (the highest server-scenario capacity at its latency bound; "
        "a variant and backend without a VALID capacity is not recommended). capacity needs a server scenario"))
    capacity_scenario: Optional[str] = Field(None, description="with objective capacity: the server scenario to rank "
                                             "by, by its label (its `name`, else e.g. server-b8-s2 as the report "
                                             "shows it); default: the first server scenario")


# ----------------------------------------------------------------------------- search
class SearchObjective(Strict):
    backend: Optional[BackendName] = Field(None, description="default: the first of bench.backends")
    batch_size: Optional[int] = Field(None, gt=0, description="default: report.constraints.batch_size, else the "
                                      "first of bench.batch_sizes")


class SearchConstraints(Strict):
    max_accuracy_drop: Optional[float] = Field(None, ge=0, description="in the task's primary metric, against "
                                               "report.baseline; default: report.constraints.max_accuracy_drop")


class SearchSpec(Strict):
    """An accuracy-aware search over step parameters: candidates that fail the accuracy constraint are
    rejected before any timing; the fastest measured one becomes the variant `name`."""
    name: str = Field("search-best", description="the variant the best candidate becomes")
    from_: str = Field("baseline", alias="from", description="the variant every candidate starts from")
    steps: list[Any] = Field(min_length=1, description="the candidates' steps, as in a variant")
    space: dict[str, list[Any]] = Field(min_length=1, description="'steps[i].param' -> the values to try "
                                        "(null: the step's default)")
    objective: SearchObjective = Field(default_factory=SearchObjective)
    constraints: SearchConstraints = Field(default_factory=SearchConstraints)
    strategy: Literal["grid", "greedy"] = Field("grid", description="grid: every combination (at most budget); "
                                                "greedy: one parameter at a time, in order, keeping the best value")
    budget: int = Field(16, ge=1, le=256, description="candidates built at most")
    repeats: int = Field(2, ge=1, le=10, description="processes per measured candidate")


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: Optional[str] = None
    seed: int = 0
    model: ModelSpec
    task: TaskSpec = Field(default_factory=lambda: NoTask(type="none"))
    variants: dict[str, VariantSpec] = Field(min_length=1)
    export: ExportSpec = Field(default_factory=ExportSpec)
    bench: BenchSpec = Field(default_factory=BenchSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    search: Optional[SearchSpec] = None
    base_dir: Optional[str] = Field(None, description="the folder relative paths in the recipe resolve against "
                                    "(default: the recipe file's own folder); `workbench suggest` sets it, since its "
                                    "recipe lies beside a run, not beside the recipe it extends")

    # Set by load_recipe: where the recipe came from, for relative paths and the lineage.
    _path: Optional[str] = PrivateAttr(None)
    _sha256: Optional[str] = PrivateAttr(None)
    _skeleton: Any = PrivateAttr(False)

    @property
    def path(self) -> Optional[str]:
        return self._path

    @property
    def where(self) -> str:
        """How messages about this recipe name it: its file, or 'recipe' for one built in code."""
        return str(self._path) if self._path else "recipe"

    @property
    def model_kind(self) -> str:
        """'classifier', 'embedding' or 'causal-lm': what the model's single output means."""
        return model_kind(self.model)

    @property
    def sha256(self) -> Optional[str]:
        return self._sha256

    def resolve(self, p: str) -> Path:
        """Relative paths in a recipe are relative to `base_dir`, else to the recipe file's folder."""
        q = Path(p).expanduser()
        if q.is_absolute():
            return q
        folder = Path(self.path).resolve().parent if self.path is not None else None
        if self.base_dir:
            base = Path(self.base_dir).expanduser()
            folder = base if base.is_absolute() or folder is None else folder / base
        return q if folder is None else folder / q

    def skeleton(self):
        """The model's modules on the meta device (real structure, no weights), for steps' recipe-time
        checks (Step.check): None when that cannot be had cheaply (not a Hugging Face model, remote code)."""
        if self._skeleton is False:
            self._skeleton = _hf_skeleton(self)
        return self._skeleton

    def backends_of(self, name: str) -> list[str]:
        """The backends variant `name` is measured on: its own list, else bench.backends (a variant
        the run adds, such as the search's best, gets bench.backends)."""
        v = self.variants.get(name)
        return list(v.backends) if v is not None and v.backends else list(self.bench.backends)

    def formats_of(self, name: str) -> list[str]:
        """The export formats variant `name` is made in: its own list, else export.formats."""
        v = self.variants.get(name)
        return list(v.formats) if v is not None and v.formats else list(self.export.formats)

    def options_of(self, name: str, backend: str) -> Optional[dict]:
        """The engine options variant `name`'s cells on `backend` run with: bench.options (over the backend's
        own measuring protocol); None for a reference variant, whose cells show what the engine's own
        defaults give (the cell's threads only)."""
        v = self.variants.get(name)
        if v is not None and v.reference:
            return None
        return {**self.bench.options.get(backend, {}), **(v.options.get(backend, {}) if v is not None else {})}

    def all_backends(self) -> list[str]:
        """Every backend some variant is measured on, bench.backends first."""
        names = list(self.bench.backends)
        for v in self.variants.values():
            names += [b for b in (v.backends or []) if b not in names]
        return names

    def dependencies(self, name: str) -> list[str]:
        """The variants `name` needs first: its parent and the variants its steps read (the step
        registry's `references`, e.g. a distillation teacher)."""
        from core.steps import STEPS

        v = self.variants[name]
        deps = [v.from_] if v.from_ else []
        for s in v.steps:
            step_name, params = (s.name, s.params) if isinstance(s, StepCall) else _split_raw(s)
            step = STEPS.get(step_name)
            if step is not None and isinstance(params, dict):
                deps += [r for r in step.references(params) if isinstance(r, str)]
        return [d for d in deps if d in self.variants]

    def order(self) -> list[str]:
        """Variants in an order where every dependency comes first (file order otherwise). A cycle
        cannot be ordered: its members go last, in file order, and the recipe check reports it."""
        done: list[str] = []
        while len(done) < len(self.variants):
            ready = [n for n in self.variants if n not in done and all(d in done for d in self.dependencies(n))]
            if not ready:
                return done + [n for n in self.variants if n not in done]
            done.append(ready[0])
        return done


# ----------------------------------------------------------------------------- loading
class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error: YAML would keep the last silently (a
    variant written twice, a second `name:`), so one of the user's two settings would vanish without a word."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # the base class says what is wrong with an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (first at line {seen[key] + 1}); YAML would keep the "
                    "last one and drop the other", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path) -> Recipe:
    """Read, parse and fully check a recipe; raise RecipeError on the first problem."""
    path = Path(path)
    where = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"{where}: cannot read the recipe file ({e.strerror}).") from None
    try:
        data = yaml.load(raw, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', e)}.") from None
    if not isinstance(data, dict):
        raise field_error(where, "", "a recipe must be a YAML mapping with keys such as name, model, variants",
                          value=type(data).__name__)
    recipe = parse_recipe(data, where)
    recipe._path = str(path)
    recipe._sha256 = hashlib.sha256(raw).hexdigest()
    check_recipe(recipe, where)
    return recipe


def parse_recipe(data: dict, where: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise pydantic_error(e, Recipe, where) from None


# ----------------------------------------------------------------------------- cross-field checks
def check_recipe(recipe: Recipe, where: str) -> None:
    """Checks that span fields: the variant DAG, the steps and the formats they pass along,
    paths that must exist, and whether the task fits the model."""
    names = list(recipe.variants)
    for name, v in recipe.variants.items():
        if not _VARIANT_NAME.match(name):
            raise field_error(where, f"variants.{name}", "a variant name may hold letters, digits, '.', '_' and '-'",
                              value=name)
        if v.from_ is not None and v.from_ not in recipe.variants:
            raise field_error(where, f"variants.{name}.from", "names no variant of this recipe", value=v.from_,
                              accepted=[n for n in names if n != name])
    _check_acyclic(recipe, where)
    _check_references(recipe, where)
    if recipe.report.baseline not in recipe.variants:
        raise field_error(where, "report.baseline", "names no variant (the reference for accuracy deltas)",
                          value=recipe.report.baseline, accepted=names)
    if recipe.variants[recipe.report.baseline].reference and "baseline" not in recipe.report.model_fields_set:
        # Speedups and accuracy deltas are measured against the baseline: a reference becomes it only when asked.
        raise field_error(where, "report.baseline", f"is not set, and the default, variant "
                          f"'{recipe.report.baseline}', is a reference (`reference: true`): say which variant speedups "
                          "and accuracy deltas are measured against", accepted=names)

    # Steps: known names, valid params, and a torch module or ONNX graph where each one needs it.
    fmt: dict[str, str] = {}
    for name in recipe.order():
        v = recipe.variants[name]
        v.steps, fmt[name] = _check_steps(recipe, name, v.steps, fmt[v.from_] if v.from_ else "torch", where,
                                          f"variants.{name}.steps")

    _check_search(recipe, where, fmt)
    _check_backend_formats(recipe, where, fmt)
    _check_backend_options(recipe, where)
    _check_variant_formats(recipe, where)
    _check_scenarios(recipe, where)
    _check_model(recipe, where)
    _check_task(recipe, where)
    c = recipe.report.constraints
    if c.backend is not None and c.backend not in recipe.all_backends():
        raise field_error(where, "report.constraints.backend", "is not among the recipe's backends", value=c.backend,
                          accepted=recipe.all_backends())
    if c.batch_size is not None and c.batch_size not in recipe.bench.batch_sizes:
        raise field_error(where, "report.constraints.batch_size", "is not among bench.batch_sizes, so no cell would "
                          "be measured at it and nothing could be recommended", value=c.batch_size,
                          accepted=recipe.bench.batch_sizes)
    for backend in recipe.bench.placement:
        if backend not in recipe.all_backends():
            raise field_error(where, f"bench.placement.{backend}", "places a backend that no variant is measured on",
                              value=backend, accepted=recipe.all_backends())


def _check_search(recipe: Recipe, where: str, fmt: dict[str, str]) -> None:
    """The search block: names that exist, space keys that address a step's parameter, and every
    candidate a valid variant (checked as one, so a bad value fails now, not mid-search)."""
    sp = recipe.search
    if sp is None:
        return
    if sp.from_ not in recipe.variants:
        raise field_error(where, "search.from", "names no variant", value=sp.from_, accepted=list(recipe.variants))
    if sp.name in recipe.variants:
        raise field_error(where, "search.name", "is already a variant's name", value=sp.name)
    if sp.objective.backend and sp.objective.backend not in recipe.bench.backends:
        raise field_error(where, "search.objective.backend", "is not among bench.backends",
                          value=sp.objective.backend, accepted=recipe.bench.backends)
    from workbench.search_space import SPACE_KEY, candidates_of

    for key in sp.space:
        m = SPACE_KEY.match(key)
        if not m or int(m.group(1)) >= len(sp.steps):
            raise field_error(where, f"search.space.{key}", "addresses no step parameter", value=key,
                              accepted=f"'steps[i].param' with i in 0..{len(sp.steps) - 1}")
    for i, steps in enumerate(candidates_of(sp, limit=64)):
        _check_steps(recipe, sp.name, steps, fmt[sp.from_], where, f"search candidate {i + 1}: steps")


def _check_scenarios(recipe: Recipe, where: str) -> None:
    from bench.serving import early_stopping_queries

    lm = model_kind(recipe.model) == "causal-lm"
    labels = set()
    for i, sc in enumerate(recipe.bench.scenarios):
        field = f"bench.scenarios[{i}]"
        if lm:
            _check_generation_scenario(sc, field, where)
        elif sc.type == "server" and sc.latency_bound_ms is None:
            raise field_error(where, f"{field}.latency_bound_ms", "a server scenario's capacity is the highest QPS "
                              "whose percentile latency meets a bound: set one", accepted="milliseconds, e.g. 50")
        elif sc.ttft_bound_ms is not None or sc.tpot_bound_ms is not None:
            key = "ttft_bound_ms" if sc.ttft_bound_ms is not None else "tpot_bound_ms"
            raise field_error(where, f"{field}.{key}", "token-latency bounds are for a causal LM's generation; "
                              f"this model is a {model_kind(recipe.model)}: bound its latency with latency_bound_ms",
                              value=getattr(sc, key))
        for name in sc.variants or []:
            if name not in recipe.variants:
                raise field_error(where, f"{field}.variants", "names no variant", value=name,
                                  accepted=list(recipe.variants))
        if sc.batching == "packed":
            _check_packed_scenario(recipe, sc, field, where)
        if sc.label in labels:
            raise field_error(where, f"{field}.name", "two scenarios have this label: name them apart", value=sc.label)
        labels.add(sc.label)
        floor = early_stopping_queries(sc.percentile)
        if sc.type == "server" and sc.min_queries < floor:
            # LoadGen's early stopping: with fewer queries no run is VALID, however fast; every step of
            # the capacity search would be INVALID and the cell would say no capacity was found.
            two = early_stopping_queries(sc.percentile, 2)
            raise field_error(where, f"{field}.min_queries", f"LoadGen's early stopping calls a p{sc.percentile:g} "
                              f"VALID only after at least {floor} queries all under the bound ({two} if two may "
                              "miss it): fewer makes every step of the capacity search INVALID",
                              value=sc.min_queries, accepted=f">= {floor}; the default 1000 lets a few miss")
        if sc.type != "server" and sc.latency_bound_ms is not None:
            raise field_error(where, f"{field}.latency_bound_ms", "only a server scenario has a bound",
                              value=sc.latency_bound_ms)
    servers = [sc.label for sc in recipe.bench.scenarios if sc.type == "server"]
    if recipe.report.objective == "capacity" and not servers:
        raise field_error(where, "report.objective", "ranking by capacity needs a server scenario in bench.scenarios "
                          "(`{type: server, latency_bound_ms: ...}`)", value="capacity", accepted=["latency"])
    if recipe.report.capacity_scenario is not None and recipe.report.capacity_scenario not in servers:
        raise field_error(where, "report.capacity_scenario", "not a server scenario of bench.scenarios",
                          value=recipe.report.capacity_scenario, accepted=servers)
    if recipe.bench.prompt_lens and model_kind(recipe.model) != "causal-lm":
        raise field_error(where, "bench.prompt_lens", "prompt lengths are for causal LMs (TTFT against prompt "
                          f"length); this model is a {model_kind(recipe.model)}", value=recipe.bench.prompt_lens,
                          accepted=[])


def _check_packed_scenario(recipe: Recipe, sc: ScenarioSpec, field: str, where: str) -> None:
    """Packed batches need a model that takes several requests in a row (the pack-sequences step, on the
    variant or an ancestor) and requests of their own lengths."""
    if sc.inputs != "task":
        raise field_error(where, f"{field}.inputs", "batching: packed packs the task's own requests, each at its "
                          "length", value=sc.inputs, accepted=["task"])
    unpacked = [name for name in sc.variants or list(recipe.variants) if not _packs(recipe, name)]
    if unpacked:
        raise field_error(where, f"{field}.batching", f"variant '{unpacked[0]}' is not made with the pack-sequences "
                          "step, so its model cannot take several requests in one row: add {pack-sequences: {}} "
                          "to its steps (or an ancestor's), or list only packed variants in this scenario's "
                          "variants", value="packed", accepted=["by-length", "fifo"])


def _packs(recipe: Recipe, name: str) -> bool:
    """Whether `name` or one of its ancestors has the pack-sequences step."""
    seen = set()
    while name in recipe.variants and name not in seen:
        seen.add(name)
        v = recipe.variants[name]
        if any(call.name == "pack-sequences" for call in v.steps):  # StepCalls by now (_check_steps)
            return True
        name = v.from_
    return False


def _check_generation_scenario(sc: ScenarioSpec, field: str, where: str) -> None:
    """A causal LM's scenario serves generations: a server is bound by LoadGen's token latencies."""
    if sc.latency_bound_ms is not None:
        raise field_error(where, f"{field}.latency_bound_ms", "a causal LM's server is bound per token: the time "
                          "to the first token and the time per output token after it", value=sc.latency_bound_ms,
                          accepted="ttft_bound_ms and tpot_bound_ms")
    if sc.type == "server":
        for key in ("ttft_bound_ms", "tpot_bound_ms"):
            if getattr(sc, key) is None:
                raise field_error(where, f"{field}.{key}", "a causal LM's server scenario holds the first token "
                                  "and each later one to bounds (LoadGen's token latencies): set both",
                                  accepted="milliseconds, e.g. ttft_bound_ms: 2000, tpot_bound_ms: 200")
    elif sc.ttft_bound_ms is not None or sc.tpot_bound_ms is not None:
        raise field_error(where, f"{field}.{'ttft_bound_ms' if sc.ttft_bound_ms is not None else 'tpot_bound_ms'}",
                          "only a server scenario has bounds", value=sc.ttft_bound_ms or sc.tpot_bound_ms)


def _check_variant_formats(recipe: Recipe, where: str) -> None:
    """A variant's formats narrow export.formats: one the run does not export is refused, by name; so is a
    format that does not hold this kind of model (GGUF holds causal LMs)."""
    for i, fmt in enumerate(recipe.export.formats):
        kinds = FORMATS[fmt].model_kinds
        if kinds and recipe.model_kind not in kinds:
            raise field_error(where, f"export.formats[{i}]", f"{fmt} holds {' or '.join(kinds)} models, and this "
                              f"model is {'an' if recipe.model_kind[0] in 'aeiou' else 'a'} {recipe.model_kind}",
                              value=fmt, accepted=[f for f, c in FORMATS.items()
                                                   if not c.model_kinds or recipe.model_kind in c.model_kinds])
    for name, v in recipe.variants.items():
        for i, fmt in enumerate(v.formats or []):
            if fmt not in recipe.export.formats:
                raise field_error(where, f"variants.{name}.formats[{i}]", "a variant's formats narrow "
                                  "export.formats; add it there to export it", value=fmt,
                                  accepted=recipe.export.formats)


def _check_references(recipe: Recipe, where: str) -> None:
    """A reference is what an engine gives without the workbench: built on the source model (or on another
    reference), never on a variant the workbench's own steps made."""
    for name, v in recipe.variants.items():
        parent = v.from_ if v.reference else None
        while parent is not None:
            p = recipe.variants[parent]
            if p.steps and not p.reference:
                raise field_error(where, f"variants.{name}.from", "a reference variant shows what an engine's own "
                                  "defaults give without the workbench, so it cannot build on a variant made by the "
                                  f"workbench's steps ('{parent}' has {len(p.steps)})", value=v.from_,
                                  accepted="the source model's variant, or another reference")
            parent = p.from_


def _check_backend_formats(recipe: Recipe, where: str, fmt: dict[str, str]) -> None:
    """A backend runs one artifact format: one that no variant can have (not exported, and no variant's steps
    end in it) would give every cell of that backend a skip, so it is refused by name."""
    made = {"torch", *recipe.export.formats, *fmt.values()}
    places = [("bench.backends", recipe.bench.backends)] + [
        (f"variants.{n}.backends", v.backends or []) for n, v in recipe.variants.items()]
    for field, backends in places:
        for i, backend in enumerate(backends):
            need = BACKENDS[backend].format
            if need not in made:
                raise field_error(where, f"{field}[{i}]", f"runs {need} artifacts, and no variant has one: add "
                                  f"{need} to export.formats, or drop the backend", value=backend,
                                  accepted=[n for n, b in BACKENDS.items() if b.format in made])


def _check_backend_options(recipe: Recipe, where: str) -> None:
    """bench.options and each variant's options: each backend's options validated by its own `Options` model
    (and normalised); a reference variant takes none (it shows the engine's defaults)."""
    # (field, the variant it belongs to or None for bench.options, the options)
    places = [("bench.options", None, recipe.bench.options)]
    for name, v in recipe.variants.items():
        if v.options and v.reference:
            raise field_error(where, f"variants.{name}.options", "a reference variant runs with the engine's "
                              "defaults, so it takes no options", value=v.options, accepted="no options")
        places.append((f"variants.{name}.options", name, v.options))
    for field, name, options in places:
        measured = recipe.backends_of(name) if name else recipe.all_backends()
        for backend, raw in options.items():
            if backend not in measured:  # options no cell would run with: a slip, never a setting
                who, where_to = ((f"variant {name!r}", "its backends") if name else
                                 ("this recipe", "bench.backends or a variant's backends"))
                raise field_error(where, f"{field}.{backend}", f"no cell of {who} runs on this backend, so these "
                                  f"options would be ignored: measure on it ({where_to}) or drop them",
                                  accepted=measured)
            cls = BACKENDS[backend]
            if cls.Options is None:
                raise field_error(where, f"{field}.{backend}", "this backend takes no options", value=raw,
                                  accepted=[n for n, b in BACKENDS.items() if b.Options is not None])
            try:
                # A variant's options keep only what it sets: they lie over bench.options, defaults included.
                options[backend] = cls.Options.model_validate(raw).model_dump(
                    mode="json", exclude_none=True, exclude_unset=field != "bench.options")
            except ValidationError as e:
                raise pydantic_error(e, cls.Options, where, prefix=f"{field}.{backend}") from None


def _check_steps(recipe: Recipe, name: str, raw_steps: list, current: str, where: str,
                 prefix: str) -> tuple[list[StepCall], str]:
    """A variant's steps validated (and expanded: presets) into StepCalls, and the format it ends in."""
    from core.steps import get_step, step_names

    calls = []
    for i, raw in enumerate(raw_steps):
        field = f"{prefix}[{i}]"
        step_name, params = _split_step(raw, where, field)
        try:
            step = get_step(step_name)
        except KeyError:
            raise field_error(where, field, "unknown step", value=step_name, accepted=step_names()) from None
        try:
            p = step.Params.model_validate(params or {})
        except ValidationError as e:
            raise pydantic_error(e, step.Params, where, prefix=f"{field}.{step_name}") from None
        # torch -> ONNX happens implicitly (the runner exports first); ONNX -> torch cannot, and a GGUF
        # file (gguf-quantize) is where a variant ends.
        if current == "gguf":
            raise field_error(where, field, f"step '{step_name}' comes after gguf-quantize, whose GGUF file no "
                              "step takes: make gguf-quantize the last step (or start a variant `from:` this one's "
                              "parent)", value=step_name)
        if step.consumes == "torch" and current == "onnx":
            what = {"torch": "a PyTorch module", "onnx": "an ONNX graph"}
            raise field_error(
                where, field,
                f"step '{step_name}' needs {what[step.consumes]}, but at this point variant '{name}' is "
                f"{what[current]} (steps that act on ONNX graphs must come after the torch steps, "
                f"and a variant cannot return from ONNX to PyTorch)", value=step_name)
        p = step.expand(p)
        step.check(p, recipe=recipe, variant=name, where=where, field=f"{field}.{step_name}")
        current = step.consumes if step.produces == "same" else step.produces
        calls.append(StepCall(name=step_name, params=p.model_dump(mode="json")))
    return calls, current


def _split_raw(raw) -> tuple[Optional[str], Optional[dict]]:
    """(name, params) of a step as written (`name` or `{name: {params}}`), without checking it."""
    if isinstance(raw, str):
        return raw, {}
    if isinstance(raw, dict) and len(raw) == 1:
        name, params = next(iter(raw.items()))
        return name, params if isinstance(params, dict) else {}
    return None, None


def _split_step(raw, where: str, field: str) -> tuple[str, Optional[dict]]:
    if isinstance(raw, str):
        return raw, None
    if isinstance(raw, dict) and len(raw) == 1:
        (name, params), = raw.items()
        if params is None or isinstance(params, dict):
            return str(name), params
        raise field_error(where, f"{field}.{name}", "step parameters must be a mapping", value=params)
    raise field_error(where, field, "a step is written as `name` or `{name: {param: value}}`", value=raw)


def _check_acyclic(recipe: Recipe, where: str) -> None:
    for start in recipe.variants:
        seen = [start]
        cur = recipe.variants[start].from_
        while cur is not None:
            if cur in seen:
                cycle = " -> ".join(seen[seen.index(cur):] + [cur])
                raise field_error(where, f"variants.{start}.from", f"the variants form a cycle ({cycle})",
                                  value=recipe.variants[start].from_,
                                  accepted="a chain of `from:` that ends at a variant without `from:`")
            seen.append(cur)
            cur = recipe.variants[cur].from_


def model_kind(spec) -> str:
    """'classifier', 'embedding' or 'causal-lm': what the model's output means, so a task can check it fits."""
    if isinstance(spec, BuiltinModel):
        return {"digits-cnn": "classifier", "minilm-l6": "embedding", "docstring-gpt": "causal-lm"}[spec.name]
    if isinstance(spec, HFModel):
        return {"embedding": "embedding", "causal-lm": "causal-lm"}.get(spec.head, "classifier")
    if isinstance(spec, TorchvisionModel):
        return "classifier"
    return spec.kind


def _in_hf_cache(repo_id: str, revision: Optional[str]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an id the hub library rejects is not in the cache either
        return False
    return isinstance(found, str)


def _check_model(recipe: Recipe, where: str) -> None:
    m = recipe.model
    if isinstance(m, HFModel):
        looks_local = m.path.startswith((".", "/", "~")) or recipe.resolve(m.path).exists()
        if looks_local and not recipe.resolve(m.path).is_dir():
            raise field_error(where, "model.path", "no such directory", value=m.path,
                              accepted="a save_pretrained directory (relative to the recipe file) or a hub id")
        if not looks_local and not _in_hf_cache(m.path, m.revision):
            # The workbench runs offline: a hub id must already be in the local Hugging Face cache.
            raise field_error(where, "model.path", "is neither a local folder nor a hub id in the local Hugging Face "
                              "cache (the workbench runs offline)", value=m.path,
                              accepted="a save_pretrained directory (relative to the recipe file), or a hub id "
                              "downloaded beforehand (huggingface-cli download ID)")
    ckpt = getattr(m, "checkpoint", None)
    if ckpt and not recipe.resolve(ckpt).is_file():
        raise field_error(where, "model.checkpoint", "no such file", value=ckpt,
                          accepted="a .safetensors or .pt state_dict, relative to the recipe file")
    if isinstance(m, TorchvisionModel):
        try:
            importlib.import_module("torchvision")
        except Exception:
            raise field_error(where, "model.source", "needs the torchvision package, which is not importable here",
                              value="torchvision", accepted="builtin, hf, python") from None
    if isinstance(m, PythonModel):
        from workbench.sources.refs import resolve_ref

        try:
            obj = resolve_ref(m.ref, recipe.resolve("."))
        except Exception as e:
            raise field_error(where, "model.ref", f"cannot be imported ({type(e).__name__}: {e})", value=m.ref,
                              accepted="'package.module:callable' importable from the recipe's folder") from None
        if not callable(obj):
            raise field_error(where, "model.ref", "is not callable", value=m.ref)


def _hf_skeleton(recipe: Recipe):
    """The Hugging Face model's modules built on the meta device from its config: the real structure,
    no weights read, no memory. None when that cannot be done cheaply (remote code, no config)."""
    m = recipe.model
    if not isinstance(m, HFModel) or m.trust_remote_code:
        return None
    try:
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

        local = recipe.resolve(m.path)
        cfg = AutoConfig.from_pretrained(str(local) if local.exists() else m.path, revision=m.revision)
        with torch.device("meta"):
            if m.head == "causal-lm":
                from transformers import AutoModelForCausalLM

                from core.lm import CausalLM

                return CausalLM(AutoModelForCausalLM.from_config(cfg))
            return (AutoModel if m.head == "embedding" else AutoModelForSequenceClassification).from_config(cfg)
    except Exception:  # noqa: BLE001 - the run reports what loading really says
        return None


def _check_task(recipe: Recipe, where: str) -> None:
    t = recipe.task
    kind = model_kind(recipe.model)
    fits = {"classification": "classifier", "text-classification": "classifier", "embedding-fidelity": "embedding",
            "language-modeling": "causal-lm"}
    needs = fits.get(t.type)
    if needs and needs != kind:
        raise field_error(where, "task.type", f"needs a model whose output is a {needs}, but the model gives a {kind}",
                          value=t.type, accepted=[k for k, v in {**fits, "none": kind}.items() if v == kind])
    c = recipe.report.constraints
    if c.max_perplexity_increase is not None and t.type != "language-modeling":
        raise field_error(where, "report.constraints.max_perplexity_increase", f"a {t.type} task has no perplexity, "
                          "so no cell could meet it: report.constraints.max_accuracy_drop holds its metric",
                          value=c.max_perplexity_increase)
    if c.max_accuracy_drop is not None and t.type == "none":
        raise field_error(where, "report.constraints.max_accuracy_drop", "task.type is none: there is no metric to "
                          "drop, so no cell could meet it", value=c.max_accuracy_drop)
    data = getattr(t, "data", None)
    for name in ("path", "eval_path"):
        value = getattr(data, name, None) if isinstance(data, FileData) else None
        if value and not recipe.resolve(value).is_file():
            raise field_error(where, f"task.data.{name}", "no such file", value=value,
                              accepted="a .csv, .jsonl or .npz file (language-modeling: also .txt), relative to "
                              "the recipe file")
    if isinstance(data, BuiltinData):
        fits = {"classification": ["digits"], "embedding-fidelity": ["stdlib-docstrings"],
                "language-modeling": ["stdlib-docstrings"]}[t.type]
        if data.name not in fits:
            raise field_error(where, "task.data.name", f"is not a data set for task '{t.type}'", value=data.name,
                              accepted=fits)
    if isinstance(t, ClassificationTask) and isinstance(data, BuiltinData) and data.name == "digits":
        if not (isinstance(recipe.model, BuiltinModel) or isinstance(recipe.model, PythonModel)):
            raise field_error(where, "task.data.name", "digits images are 1x8x8: they fit digits-cnn or a python model",
                              value=data.name)
