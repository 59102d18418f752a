"""The backend registry. A backend runs one artifact format on one device; it is one class in a
bench/ module (one module per engine) that subclasses Backend (registration is automatic), and it
owns everything specific to its engine: what it runs and where, which libraries its measuring
process imports, why it cannot run here (`unavailable`), how to load an artifact into a Runner (and
a causal LM into a generator), how to profile it op by op, the lines that load its artifact in the
`recommended/` snippet, and the findings of the report's "why isn't it faster?" that only it can
make. Nothing outside the backend's module names it. The recipe schema's backend names come from here."""
from __future__ import annotations

import time
from typing import ClassVar, Optional

import numpy as np

BACKENDS: dict[str, type["Backend"]] = {}


class Runner:
    """Built from an artifact inside the cell's process; `prepare` moves inputs where the backend
    wants them (outside the timed region), `timed_call` runs once and returns milliseconds of
    completed work."""

    info: dict

    def prepare(self, inputs: dict[str, np.ndarray]):
        raise NotImplementedError

    def call(self, prepared):
        raise NotImplementedError

    def timed_call(self, prepared) -> float:
        t0 = time.perf_counter()
        self.call(prepared)
        return (time.perf_counter() - t0) * 1e3

    def outputs(self, prepared) -> np.ndarray:
        out = self.call(prepared)
        return out if isinstance(out, np.ndarray) else out.float().cpu().numpy()

    def compiled_shapes(self) -> Optional[int]:
        """How many input shapes it has compiled a model for, for an engine that compiles one per shape
        (a serving test checks none was compiled while it timed); None for one that takes any shape."""
        return None


class Backend:
    """Subclass with a `name` to register. `imports` are imported by the cell's process before its
    idle memory baseline is read, so the figures are the model's, not the libraries'."""

    name: ClassVar[str]
    format: ClassVar[str]  # the artifact format it runs (a name in core.formats.FORMATS)
    device: ClassVar[str]  # cpu / cuda
    summary: ClassVar[str]
    imports: ClassVar[tuple[str, ...]] = ("torch",)
    uses_torch_allocator: ClassVar[bool] = False  # its device memory shows in torch.cuda's figures
    compiles: ClassVar[bool] = False  # its first call compiles: that time is kept apart as compile_s
    generates: ClassVar[bool] = False  # measures causal LMs by generation (load_generator, bench.generate)
    default: ClassVar[bool] = False  # in a recipe's default bench.backends
    libraries: ClassVar[tuple[str, ...]] = ()  # pip distributions whose versions the environment records
    max_batch: ClassVar[Optional[int]] = None  # the largest batch size it runs (None: any); larger cells are skipped
    max_batch_why: ClassVar[str] = ""  # why, for those skipped cells
    # The engine options a recipe may set for it (`bench.options.<name>`), a pydantic model; None: none.
    # When set, `load`, `load_generator` and `profile*` take them as `options`: a dict of its fields, or None
    # for a reference variant's cells, which run as the engine's own defaults leave it.
    Options: ClassVar[Optional[type]] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            BACKENDS[cls.name] = cls

    @classmethod
    def unavailable(cls) -> Optional[str]:
        """Why this backend cannot run on this machine, or None when it can (asked in the parent)."""
        if cls.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                return "no CUDA device is visible to torch on this machine"
        return None

    @classmethod
    def load(cls, path: str, threads: int) -> Runner:
        raise NotImplementedError

    @classmethod
    def load_generator(cls, path: str, threads: int):
        """For causal LMs: an object with `generate(ids, mask, new_tokens, on_token=None) -> (ids,
        {"prefill_ms", "decode_ms"})` (`on_token(step)` called as each step's tokens are out: a generation
        server answers the first token there), `logits(ids, mask)` and `info` (see bench.generate)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ what the report and profiles ask
    @classmethod
    def profile(cls, path: str, inputs: dict, threads: int, calls: int, warmup: int, **engine) -> dict:
        """Op-level time from the engine's own profiler, in a process of its own (bench.profile):
        {"tool": ..., "by_op_ms": {op type: ms per call}}, optionally "nodes_by_op". `engine`: the
        cell's engine options (engine_kwargs), for a backend that takes any."""
        raise NotImplementedError(f"{cls.name} has no op-level profiler")

    @classmethod
    def profile_generation(cls, path: str, prompts, new_tokens: int, threads: int, generations: int,
                           **engine) -> dict:
        """As `profile`, over `generations` greedy generations after one of warm-up, per generated token."""
        raise NotImplementedError(f"{cls.name} has no op-level profiler for generation")

    @classmethod
    def snippet(cls) -> Optional[str]:
        """Python lines of recommended/load_and_call.py that load the file `MODEL` (a Path) as this
        backend did and set `output` (an array-like with .shape and .dtype) from `inputs` (a dict of
        numpy arrays); None when this backend has no snippet."""
        return None

    @classmethod
    def kernel_census(cls, variants: dict, name: str) -> Optional[dict]:
        """What this engine really runs for variant `name` (e.g. which int8 kernels a graph was fused
        into), from the facts its steps recorded in results.json; None when it keeps no census."""
        return None

    @classmethod
    def findings(cls, cell: dict, variants: dict, cpu_flags: list[str]) -> list[str]:
        """Sentences of "why isn't it faster?" that only this engine can say about `cell`."""
        return []


def engine_kwargs(backend: type[Backend], job: dict) -> dict:
    """The keyword arguments a measuring process adds to `load` / `load_generator` / `profile*`: the
    cell's engine options, for a backend that takes any (a backend without `Options` keeps the short form)."""
    return {"options": job.get("options")} if backend.Options is not None else {}


def default_backends() -> list[str]:
    """The backends a recipe measures when it names none: those that declare themselves default."""
    return [n for n, b in BACKENDS.items() if b.default]


def default_for_format(fmt: str) -> Optional[str]:
    """The backend `workbench bench FILE` uses for a file of `fmt` when none is named: the first
    registered CPU backend of that format that can run here (else the first of that format)."""
    of_format = [n for n, b in BACKENDS.items() if b.format == fmt]
    for n in of_format:
        if BACKENDS[n].device == "cpu" and BACKENDS[n].unavailable() is None:
            return n
    return of_format[0] if of_format else None


def get_backend(name: str) -> type[Backend]:
    return BACKENDS[name]
