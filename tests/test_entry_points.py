"""A third-party package adds a step, a backend and an export format to a recipe's vocabulary by
being installed: it declares an entry point in the group `model_workbench.plugins`, and nothing of
the project changes. The package here is written in a temporary folder, installed with pip into
another temporary folder (put on PYTHONPATH), and a recipe that uses all three runs end to end in a
fresh `workbench` process (its cells and the parity check in processes of their own)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

PLUGIN = '''
"""A plugin of model-workbench: a step, an export format and a backend."""
import time
from pathlib import Path

import torch

from core.backends import Backend, Runner
from core.formats import ExportFormat, torch_callable
from core.model import example_inputs
from core.steps import Step, StepParams, register


class ScaleParams(StepParams):
    factor: float = 1.0


@register
class Scale(Step):
    """Multiplies the model's output: factor 1.0 keeps it (the test checks its accuracy stays)."""

    name = "ext-scale"
    summary = "scale the output logits (an installed plugin's step)"
    Params = ScaleParams
    consumes = "torch"
    libraries = ("ext-workbench-plugin",)

    def run(self, model, params, ctx):
        model.module = Scaled(model.module, ScaleParams.model_validate(params).factor).eval()
        ctx.notes["scaled_by"] = params.get("factor", 1.0)
        return model


class Scaled(torch.nn.Module):
    def __init__(self, inner, factor):
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, pixels):
        return self.inner(pixels=pixels) * self.factor


class ExtTrace(ExportFormat):
    name, file_name, summary = "ext-trace", "model.ext.pt", "a TorchScript trace (an installed plugin's format)"
    suffixes = (".ext.pt",)

    @classmethod
    def export(cls, module, io, path: Path, spec) -> dict:
        torch.jit.save(torch.jit.trace(module, example_kwarg_inputs=example_inputs(io)), str(path))
        return {"exporter": "ext"}

    @classmethod
    def load(cls, path: str):
        return torch_callable(torch.jit.load(path))


class PlainRunner(Runner):
    def __init__(self, module):
        self.module, self.info = module, {"runner": "ext"}

    def prepare(self, inputs):
        return {k: torch.from_numpy(v) for k, v in inputs.items()}

    def call(self, prepared):
        with torch.inference_mode():
            return self.module(**prepared)


class ExtCPU(Backend):
    name, format, device, summary = "ext-cpu", "ext-trace", "cpu", "the plugin's format, called plainly"
    libraries = ("ext-workbench-plugin",)

    @classmethod
    def load(cls, path: str, threads: int) -> Runner:
        return PlainRunner(torch.jit.load(path))
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "ext-workbench-plugin"
version = "0.1.0"

[project.entry-points."model_workbench.plugins"]
ext = "ext_workbench_plugin"
'''

RECIPE = """
name: ext
model: {source: builtin, name: digits-cnn}
task: {type: classification, data: {source: builtin, name: digits}}
variants:
  baseline: {}
  scaled: {from: baseline, steps: [{ext-scale: {factor: 1.0}}]}
export: {formats: [ext-trace]}
bench:
  backends: [ext-cpu]
  batch_sizes: [4]
  timing: {warmup: 1, min_iters: 5, min_seconds: 0.01}
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The plugin package, pip-installed (offline, from its folder) into a folder of its own."""
    src = tmp_path_factory.mktemp("plugin-src")
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "ext_workbench_plugin.py").write_text(PLUGIN)
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, capture_output=True, text=True)
    assert list(target.glob("ext_workbench_plugin-*.dist-info"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    return env


def _workbench(env, *args, cwd):
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def test_an_installed_package_adds_a_step_a_format_and_a_backend_that_a_recipe_uses(installed, tmp_path):
    recipe = tmp_path / "ext.yaml"
    recipe.write_text(RECIPE)
    listed = _workbench(installed, "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    for name in ("ext-scale", "ext-trace", "ext-cpu"):
        assert name in listed.stdout
    done = _workbench(installed, "run", str(recipe), "--out", str(tmp_path / "out"), "--quick", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    run = next(p for p in (tmp_path / "out" / "ext").iterdir() if p.name != "cache")
    results = json.loads((run / "results.json").read_text())
    variants = {v["name"]: v for v in results["variants"]}
    assert variants["scaled"]["status"] == "ok" and variants["scaled"]["notes"][0]["scaled_by"] == 1.0
    assert variants["scaled"]["accuracy"] == variants["baseline"]["accuracy"]
    art = next(a for a in results["artifacts"] if a["variant"] == "scaled" and a["format"] == "ext-trace")
    assert art["status"] == "ok" and art["exporter"] == "ext" and art["parity_checked_in"].startswith("a fresh")
    cell = next(c for c in results["cells"] if c["variant"] == "scaled")
    assert cell["backend"] == "ext-cpu" and cell["status"] in ("ok", "unstable"), cell["reason"]
    assert cell["threads"]["runner"] == "ext" and cell["latency_ms"]["n"] >= 5
    # The plugin's library is recorded with the environment, as the built-in ones are.
    assert results["environment"]["libraries"]["ext-workbench-plugin"] == "0.1.0"


def test_without_the_package_its_names_are_refused(tmp_path):
    recipe = tmp_path / "ext.yaml"
    recipe.write_text(RECIPE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = _workbench(env, "validate", str(recipe), cwd=tmp_path)
    assert out.returncode == 2 and "ext-trace" in out.stderr and "accepted: onnx" in out.stderr
