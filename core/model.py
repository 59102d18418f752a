"""What flows between pipeline stages: a model (torch module or ONNX file) and the description
of its inputs, enough to build inputs of any batch size and sequence length in any process."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


@dataclass
class ModelIO:
    """Inputs by name: {"shape": [dims], "dtype": str, "low": int, "high": int}; dims are ints or
    the symbols "batch"/"seq". `kind` says what the single output means."""

    inputs: dict[str, dict]
    kind: str  # "classifier" or "embedding"
    output: str = "output"

    def has_seq(self) -> bool:
        return any("seq" in spec["shape"] for spec in self.inputs.values())

    def make(self, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Synthetic inputs for timing: random values of the declared dtype and range."""
        rng = np.random.default_rng(seed)
        out = {}
        for name, spec in self.inputs.items():
            shape = [batch if d == "batch" else seq if d == "seq" else int(d) for d in spec["shape"]]
            dtype = NP_DTYPES[spec["dtype"]]
            if np.issubdtype(dtype, np.integer):
                out[name] = rng.integers(spec.get("low", 0), spec.get("high", 2), size=shape, dtype=dtype)
            else:
                out[name] = rng.standard_normal(shape).astype(dtype)
        return out

    def to_json(self) -> dict:
        return {"inputs": self.inputs, "kind": self.kind, "output": self.output}

    @classmethod
    def from_json(cls, d: dict) -> "ModelIO":
        return cls(inputs=d["inputs"], kind=d["kind"], output=d.get("output", "output"))


def example_inputs(io_spec: ModelIO) -> dict:
    """Batch 2 and sequence 16: a size of 1 would let the exporter specialise the axis."""
    import torch

    return {k: torch.from_numpy(v) for k, v in io_spec.make(batch=2, seq=16, seed=0).items()}


def dynamic_axes(io_spec: ModelIO) -> dict:
    axes = {name: {i: d for i, d in enumerate(spec["shape"]) if d in ("batch", "seq")}
            for name, spec in io_spec.inputs.items()}
    axes[io_spec.output] = {0: "batch"}
    return axes


@dataclass
class VariantModel:
    """A variant as it moves through the steps: a torch module, an ONNX graph on disk, or another engine's
    own artifact made by a step (`file_format`, a name in core.formats.FORMATS: llama.cpp's GGUF from
    gguf-quantize, ORT GenAI's model folder from ort-genai-build), which then only that engine runs."""

    io: ModelIO
    module: Any = None  # torch.nn.Module when format == "torch"
    onnx_path: Optional[Path] = None
    file_path: Optional[Path] = None  # the engine artifact's main file (FORMATS[file_format].file_name)
    file_format: Optional[str] = None
    # The nearest torch ancestor: the reference for parity of ONNX-only and GGUF variants.
    source_module: Any = None
    extras: dict = field(default_factory=dict)  # e.g. a Hugging Face config/tokenizer for save_pretrained

    @property
    def format(self) -> str:
        if self.module is not None:
            return "torch"
        return self.file_format if self.file_path is not None else "onnx"

    @property
    def file(self) -> Optional[Path]:
        """The main file of a variant that is not a torch module (its ONNX graph, or its engine artifact)."""
        return self.file_path if self.file_path is not None else self.onnx_path
