"""A new step, backend and export format is one class each, registered where it is defined: here,
all three live in this file and a tiny recipe runs through them, end to end, in real processes
(the bench cell and the fresh-process parity check find them by importing this module)."""
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.backends import Backend, Runner
from core.formats import ExportFormat, torch_callable
from core.model import example_inputs
from core.steps import Step, StepParams, register
from workbench.cli import main

pytestmark = pytest.mark.slow


class Blend(nn.Module):
    """The mean of two classifiers' logits."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, pixels):
        return (self.a(pixels=pixels) + self.b(pixels=pixels)) / 2


class BlendParams(StepParams):
    other: str


@register
class BlendStep(Step):
    """Reads another variant: `references` makes the recipe build it first and key the cache on it."""

    name = "toy-blend"
    summary = "average the logits with another variant's (a test step)"
    Params = BlendParams
    consumes = "torch"

    @classmethod
    def references(cls, params: dict) -> list[str]:
        return [params["other"]]

    def run(self, model, params, ctx):
        other = ctx.lookup(BlendParams.model_validate(params).other)
        model.module = Blend(model.module, other.module).eval()
        ctx.notes["blended_with"] = params["other"]
        return model


class ToyTrace(ExportFormat):
    name, file_name, summary = "toy-trace", "model.toy.pt", "a TorchScript trace under another name (a test format)"

    @classmethod
    def export(cls, module, io, path: Path, spec) -> dict:
        t0 = time.perf_counter()
        torch.jit.save(torch.jit.trace(module, example_kwarg_inputs=example_inputs(io)), str(path))
        return {"exporter": "toy", "seconds": round(time.perf_counter() - t0, 3)}

    @classmethod
    def load(cls, path: str):
        return torch_callable(torch.jit.load(path))


class PlainRunner(Runner):
    def __init__(self, module):
        self.module, self.info = module, {"runner": "toy"}

    def prepare(self, inputs):
        return {k: torch.from_numpy(v) for k, v in inputs.items()}

    def call(self, prepared):
        with torch.inference_mode():
            return self.module(**prepared)


class ToyCPU(Backend):
    name, format, device, summary = "toy-cpu", "toy-trace", "cpu", "the toy format, called plainly (a test backend)"

    @classmethod
    def load(cls, path: str, threads: int) -> Runner:
        return PlainRunner(torch.jit.load(path))


RECIPE = """
name: toys
model: {source: builtin, name: digits-cnn}
task: {type: classification, data: {source: builtin, name: digits}}
variants:
  baseline: {}
  blended: {from: baseline, steps: [{toy-blend: {other: half}}]}
  half: {from: baseline, steps: [{quantize: {method: bf16}}]}
export: {formats: [toy-trace], parity: {max_abs_diff: 0.05}}
bench:
  backends: [toy-cpu, torch-cpu]
  batch_sizes: [4]
  timing: {warmup: 1, min_iters: 5, min_seconds: 0.01}
"""


def test_a_step_a_format_and_a_backend_defined_in_one_file_run_a_recipe(tmp_path):
    recipe = tmp_path / "toys.yaml"
    recipe.write_text(RECIPE)
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quick"]) == 0
    run = next(p for p in (tmp_path / "out" / "toys").iterdir() if p.name != "cache")
    results = json.loads((run / "results.json").read_text())
    variants = {v["name"]: v for v in results["variants"]}
    # `half` is listed after `blended` but built before it: the step named it in `references`.
    assert [v["name"] for v in results["variants"]] == ["baseline", "half", "blended"]
    assert variants["blended"]["status"] == "ok" and variants["blended"]["notes"][0]["blended_with"] == "half"
    assert variants["blended"]["accuracy"]["accuracy"] > 0.9
    arts = {(a["variant"], a["format"]): a for a in results["artifacts"]}
    art = arts[("blended", "toy-trace")]
    assert art["status"] == "ok" and art["exporter"] == "toy" and art["path"].endswith("model.toy.pt")
    assert art["parity_checked_in"].startswith("a fresh process")
    cells = {(c["variant"], c["backend"]): c for c in results["cells"]}
    toy = cells[("blended", "toy-cpu")]
    assert toy["status"] in ("ok", "unstable"), toy["reason"]
    assert toy["format"] == "toy-trace" and toy["threads"]["runner"] == "toy"
    assert toy["accuracy"] == cells[("blended", "torch-cpu")]["accuracy"]
    assert np.isfinite(toy["latency_ms"]["p50"]) and toy["latency_ms"]["n"] >= 5


def test_registered_names_are_what_a_recipe_accepts(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.replace("[toy-cpu, torch-cpu]", "[toy-gpu]"))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bench.backends" in err and "'toy-gpu'" in err and "toy-cpu" in err
