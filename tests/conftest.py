"""Shared fixtures.

WORKBENCH_CACHE is left at its default on purpose: the built-in digits CNN is trained once per
machine and cached in ~/.cache/model-workbench, so every test that needs it loads it in a moment.

The expensive fixture is `quick_run`: one small end-to-end `workbench run --quick` of the digits CNN
(baseline, a PyTorch dynamic-int8 variant and an ONNX Runtime int8 variant; ONNX and TorchScript
exports; torch-cpu and ort-cpu at batch 1 and 4), made once per session and read by many tests.
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import pytest
import yaml

from workbench.cli import main

QUICK_RECIPE = {
    "name": "tiny-digits",
    "description": "the test suite's shared quick run",
    "model": {"source": "builtin", "name": "digits-cnn"},
    "task": {"type": "classification", "data": {"source": "builtin", "name": "digits"}},
    "variants": {
        "baseline": {},
        "torch-int8": {"from": "baseline", "steps": [{"quantize": {"method": "dynamic-int8"}}]},
        "ort-int8": {"from": "baseline", "steps": [{"onnx-quantize": {"mode": "dynamic"}}]},
    },
    "export": {"formats": ["onnx", "torchscript"], "parity": {"max_abs_diff": 1.0e-4}},
    "bench": {
        "backends": ["torch-cpu", "ort-cpu"],
        "batch_sizes": [1, 4],
        "timing": {"warmup": 2, "min_iters": 5, "min_seconds": 0.05},
    },
}


def write_yaml(path: Path, recipe: Union[str, dict]) -> Path:
    """Write a recipe (a dict, dumped as YAML, or literal YAML text) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
    path.write_text(textwrap.dedent(text) if isinstance(recipe, str) else text)
    return path


def run_dirs(root: Path, name: str) -> list[Path]:
    """The run directories of recipe `name` under an --out root (every folder but the cache)."""
    base = Path(root) / name
    return sorted(d for d in base.iterdir() if d.is_dir() and d.name != "cache")


def the_run_dir(root: Path, name: str) -> Path:
    dirs = run_dirs(root, name)
    assert len(dirs) == 1, f"expected exactly one run directory under {root / name}, found {dirs}"
    return dirs[0]


@pytest.fixture
def tmp_out(tmp_path) -> Path:
    """A fresh --out root (not created: the run must create it)."""
    return tmp_path / "out"


@pytest.fixture
def write_recipe(tmp_path) -> Callable[..., Path]:
    """write_recipe(recipe, name="recipe.yaml") -> path of the YAML file inside tmp_path."""

    def _write(recipe: Union[str, dict], name: str = "recipe.yaml") -> Path:
        return write_yaml(tmp_path / name, recipe)

    return _write


@dataclass
class QuickRun:
    recipe_path: Path
    out_root: Path
    run_dir: Path
    exit_code: int
    results: dict
    recipe: dict  # the recipe as written (QUICK_RECIPE)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> QuickRun:
    folder = tmp_path_factory.mktemp("quick-run")
    recipe_path = write_yaml(folder / "tiny-digits.yaml", QUICK_RECIPE)
    out_root = folder / "out"
    rc = main(["run", str(recipe_path), "--out", str(out_root), "--quick"])
    assert rc == 0, "the shared quick run did not finish"
    run_dir = the_run_dir(out_root, QUICK_RECIPE["name"])
    results = json.loads((run_dir / "results.json").read_text())
    return QuickRun(recipe_path, out_root, run_dir, rc, results, QUICK_RECIPE)
