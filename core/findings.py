"""A finding of the report's "why isn't it faster?": a sentence (it is a str, so it reads and tests as
one) that also carries what kind of cause it names and, where one is known, the change to try: a
recipe line, and the steps of a variant that tries it (`workbench suggest` writes them into a recipe,
so the next run measures the advice instead of trusting it). Backends (Backend.findings) and the
report make them; steps offer remedies (Step.remedy)."""
from __future__ import annotations

from typing import Optional

# The kinds of cause the report names; a step's `remedy` answers some of them.
KINDS = {
    "int8-reference-kernel": "int8 convolutions or matmuls run as ConvInteger / MatMulInteger, reference kernels",
    "float-op-left-out": "the op that dominates still runs in float",
    "quantize-overhead": "time goes to quantizing and dequantizing activations",
    "qdq-unfolded": "Quantize/DequantizeLinear pairs the engine did not fold into int8 kernels",
    "weight-only-compute-bound": "weight-only quantization where the matmuls are compute-bound",
    "attention-float": "attention is not fused, so it runs in float op by op",
    "int8-no-dot-product": "the CPU has no int8 dot-product instruction",
    "bf16-emulated": "bfloat16 without hardware support is emulated",
    "weights-in-cache": "weight-only quantization of weights that already sit in the CPU cache",
    "dispatch-bound": "a call is mostly fixed overhead, not arithmetic",
    "layout-ops": "time goes to layout ops",
    "sparse-in-dense": "zeros in dense weights",
    "roofline": "how far from the CPU's peak",
    "no-profile": "nothing was recorded to say more",
    "engine": "what the engine reports",
}


class Finding(str):
    """str(finding) is the cause in plain words; `kind` (a key of KINDS), `fix` (the change to try, as a
    recipe line), `steps` (a variant's steps, from the diagnosed variant's parent, that try it) and
    `bench` (bench settings that try it) say what to do about it."""

    kind: str
    fix: Optional[str]
    steps: Optional[list]
    bench: Optional[dict]

    def __new__(cls, text: str, kind: str = "engine", fix: Optional[str] = None, steps: Optional[list] = None,
                bench: Optional[dict] = None):
        obj = super().__new__(cls, text)
        obj.kind, obj.fix, obj.steps, obj.bench = kind, fix, steps, bench
        return obj

    def with_fix(self, fix: Optional[str], steps: Optional[list] = None, bench: Optional[dict] = None) -> "Finding":
        return Finding(str(self), self.kind, fix, steps, bench)

    def to_json(self) -> dict:
        return {"kind": self.kind, "text": str(self), "fix": self.fix, "steps": self.steps, "bench": self.bench}


def recipe_line(value) -> str:
    """A YAML flow line for a step list or mapping, as a recipe writes it."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()
