"""The backend registry. A backend runs one artifact format on one device; it is one class in
bench/ that subclasses Backend (registration is automatic), declaring what it runs and where, which
libraries its measuring process imports, why it cannot run here (`unavailable`) and how to load an
artifact into a Runner. The recipe schema's backend names come from here."""
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
        """For causal LMs: an object with `generate(ids, mask, new_tokens) -> (ids, {"prefill_ms",
        "decode_ms"})`, `logits(ids, mask)` and `info` (see bench.generate)."""
        raise NotImplementedError


def get_backend(name: str) -> type[Backend]:
    return BACKENDS[name]
