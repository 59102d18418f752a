"""A new user's own model and data, the way they come: a model file edited between runs, a forward that returns
a tuple, a training checkpoint dict, labels that are fractions or negative, x and y of different lengths, a
trace that keeps one branch of an `if`. Each is either used correctly or refused before any work (exit 2, the
field named, no run folder), never a stale model, a truncated label or a broken graph that gets recommended."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_causal_lm, make_tiny_text_model, the_run_dir, write_yaml
from workbench.cli import main
from workbench.recipe import load_recipe
from workbench.variants import root_key

MLP = '''
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, hidden={hidden}):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x):
        return {ret}


def make(**kw):
    torch.manual_seed(0)
    return MLP(**kw)
'''


def _project(tmp_path: Path, module: str, hidden: int = 16, ret: str = "self.net(x)", task=None, **model) -> Path:
    """A folder with a python model file `module`.py, an .npz of 8 features and 3 classes, and a recipe."""
    (tmp_path / f"{module}.py").write_text(MLP.format(hidden=hidden, ret=ret))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(60, 8)).astype(np.float32), y=np.arange(60) % 3)
    return write_yaml(tmp_path / "recipe.yaml", {
        "name": "mine",
        "model": {"source": "python", "ref": f"{module}:make", "kind": "classifier",
                  "inputs": {"x": {"shape": ["batch", 8]}}, **model},
        "task": task or {"type": "classification", "data": {"source": "file", "path": "data.npz"}},
        "variants": {"baseline": {}},
        "export": {"formats": []},
        "bench": {"backends": ["torch-cpu"], "batch_sizes": [1], "repeats": 1, "profile": False},
    })


def _refused(recipe: Path, tmp_path: Path, capsys, *words: str) -> str:
    """The run exits 2 before any work: a message naming `words`, no traceback, no run folder."""
    rc = main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quick"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert all(w in err for w in words) and "Traceback" not in err, err
    assert list((tmp_path / "out").rglob("status.json")) == []
    return err


def test_editing_the_model_file_changes_the_cache_key(tmp_path):
    recipe = _project(tmp_path, "wb_user_mlp_key")
    before = root_key(load_recipe(recipe))
    assert root_key(load_recipe(recipe)) == before  # stable while nothing changes
    (tmp_path / "wb_user_mlp_key.py").write_text(MLP.format(hidden=256, ret="self.net(x)"))
    assert root_key(load_recipe(recipe)) != before  # a wider layer is another model, never the cached one


@pytest.mark.parametrize("y, words", [
    (np.linspace(0.1, 0.9, 60), ["task.data.path", "not whole numbers"]),
    (np.arange(60) % 3 - 1, ["task.data.path", "negative labels"]),
    (np.arange(45) % 3, ["task.data.path", "x has 60 rows and y has 45"]),
    (np.eye(3)[np.arange(60) % 3], ["task.data.path", "one-hot"]),
    (np.array(["a", "b", "c"] * 20), ["task.data.path", "must be numbers"]),
])
def test_labels_that_are_not_class_indices_are_refused_before_any_work(tmp_path, capsys, y, words):
    recipe = _project(tmp_path, "wb_user_mlp_labels")
    np.savez(tmp_path / "data.npz", x=np.zeros((60, 8), np.float32), y=y)
    _refused(recipe, tmp_path, capsys, *words)


def test_labels_past_the_models_outputs_are_refused_naming_both(tmp_path, capsys):
    recipe = _project(tmp_path, "wb_user_mlp_width3")  # 3 outputs
    np.savez(tmp_path / "data.npz", x=np.zeros((60, 8), np.float32), y=np.arange(60) % 5)
    _refused(recipe, tmp_path, capsys, "task.data", "labels go up to 4", "outputs 3 class scores")


def test_validate_reads_the_model_and_data_as_run_does_unless_recipe_only(tmp_path, capsys):
    """`validate` said "valid" for a data file `run` then refused: it now loads both, as `run` does first."""
    recipe = _project(tmp_path, "wb_user_mlp_validate")
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "model: python:wb_user_mlp_validate:make" in out and "metric: accuracy" in out, out
    np.savez(tmp_path / "data.npz", x=np.zeros((60, 8), np.float32), y=np.arange(60) % 5)
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "task.data" in err and "labels go up to 4" in err and "Traceback" not in err, err
    assert main(["validate", "--recipe-only", str(recipe)]) == 0  # the recipe file alone is fine
    assert not (tmp_path / "reports").exists()


def test_a_backend_whose_format_no_variant_has_is_refused(tmp_path, capsys):
    recipe = _project(tmp_path, "wb_user_mlp_formats")
    import yaml

    raw = yaml.safe_load(recipe.read_text())
    raw["bench"]["backends"] = ["torch-cpu", "openvino-cpu"]  # export.formats is []
    write_yaml(recipe, raw)
    assert main(["validate", "--recipe-only", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "bench.backends[1]" in err and "add openvino to export.formats" in err, err
    raw["export"]["formats"] = ["openvino"]
    write_yaml(recipe, raw)
    assert main(["validate", "--recipe-only", str(recipe)]) == 0


def test_x_of_the_wrong_width_and_a_missing_array_are_refused(tmp_path, capsys):
    recipe = _project(tmp_path, "wb_user_mlp_width")
    np.savez(tmp_path / "data.npz", x=np.zeros((60, 10), np.float32), y=np.arange(60) % 3)
    _refused(recipe, tmp_path, capsys, "task.data.path", "each row of x has shape [10]", "[8]")
    np.savez(tmp_path / "data.npz", x=np.zeros((60, 8), np.float32))
    _refused(recipe, tmp_path, capsys, "task.data.path", "has no array y")


@pytest.mark.parametrize("ret, words", [
    ("(self.net(x), x)", ["model.ref", "forward must return one tensor", "tuple"]),
    ("self.net(x).sum()", ["model.ref", "one row per input row"]),
])
def test_a_forward_that_does_not_return_one_tensor_per_row_is_refused(tmp_path, capsys, ret, words):
    recipe = _project(tmp_path, f"wb_user_mlp_ret{len(ret)}", ret=ret)
    _refused(recipe, tmp_path, capsys, *words)


def test_inputs_the_forward_does_not_take_are_refused_naming_model_inputs(tmp_path, capsys):
    recipe = _project(tmp_path, "wb_user_mlp_inputs", inputs={"features": {"shape": ["batch", 8]}})
    _refused(recipe, tmp_path, capsys, "model.inputs", "features")


def test_a_training_checkpoint_dict_loads_and_a_mismatched_one_is_refused(tmp_path, capsys):
    recipe = _project(tmp_path, "wb_user_mlp_ckpt", checkpoint="ckpt.pt")
    trained = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    state = {f"net.{k}": v for k, v in trained.state_dict().items()}
    torch.save({"model": state, "epoch": 3}, tmp_path / "ckpt.pt")  # what a training script saves
    from workbench.sources.models import load_model

    module = load_model(load_recipe(recipe)).module
    assert torch.equal(module.net[0].weight, trained[0].weight)

    torch.save({"net.0.weight": torch.zeros(4, 8)}, tmp_path / "ckpt.pt")
    _refused(recipe, tmp_path, capsys, "model.checkpoint", "does not fit the model")
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    _refused(recipe, tmp_path, capsys, "model.checkpoint", "cannot be read")


def test_text_labels_that_are_fractions_or_empty_are_refused_with_their_rows(tmp_path, capsys):
    folder = make_tiny_text_model(tmp_path / "tiny-bert")
    (tmp_path / "reviews.jsonl").write_text("".join(
        json.dumps({"text": f"the movie was {'good' if i % 2 else 'bad'}", "label": 0.95 if i == 3 else i % 2}) + "\n"
        for i in range(40)))
    recipe = write_yaml(tmp_path / "text.yaml", {
        "name": "texts", "model": {"source": "hf", "path": str(folder), "head": "sequence-classification"},
        "task": {"type": "text-classification", "data": {"source": "file", "path": "reviews.jsonl"}, "max_length": 16},
        "variants": {"baseline": {}}, "export": {"formats": []},
        "bench": {"backends": ["torch-cpu"], "batch_sizes": [1], "seq_len": 16, "repeats": 1, "profile": False}})
    _refused(recipe, tmp_path, capsys, "task.data.label_field", "row 4: 0.95", "class index")


BRANCHY = '''
import torch
from torch import nn


class Branchy(nn.Module):
    """Two different layers chosen by the data: a trace keeps only the branch its example input took (random
    normal inputs, |x| about 0.8: the second), and real rows (|x| about 5) take the first."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        if x.abs().mean() > 2:
            return self.up(x)
        return self.down(x) * 3


def make():
    torch.manual_seed(0)
    return Branchy()
'''


@pytest.mark.slow
def test_an_onnx_step_on_an_export_outside_parity_fails_its_variant_and_preprocessing_survives_a_relative_out(
        tmp_path, monkeypatch, capsys):
    """The ONNX steps work on a graph held to export.parity, as the ONNX artifact is: a trace that kept one branch
    of an `if` fails the variant built on it (recorded, the run goes on) instead of being quantized, measured
    and recommended. A well-behaved model's ONNX step, run with a relative --out, gets ORT's pre-processing."""
    (tmp_path / "wb_user_branchy.py").write_text(BRANCHY)
    (tmp_path / "wb_user_mlp_rel.py").write_text(MLP.format(hidden=16, ret="self.net(x)"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=(rng.normal(size=(80, 8)) + 5).astype(np.float32), y=np.arange(80) % 3)
    common = {"task": {"type": "classification", "data": {"source": "file", "path": "data.npz"}},
              "variants": {"baseline": {}, "q": {"from": "baseline", "steps": [{"onnx-quantize": {"mode": "dynamic"}}]}},
              "export": {"formats": ["onnx"]},
              "bench": {"backends": ["ort-cpu"], "batch_sizes": [1], "repeats": 1, "profile": False}}
    for name, ref in (("branchy", "wb_user_branchy:make"), ("plain", "wb_user_mlp_rel:make")):
        write_yaml(tmp_path / f"{name}.yaml", {"name": name, "model": {
            "source": "python", "ref": ref, "kind": "classifier", "inputs": {"x": {"shape": ["batch", 8]}}}, **common})
    monkeypatch.chdir(tmp_path)
    assert main(["run", "branchy.yaml", "--out", "out", "--quick"]) == 0
    r = json.loads((the_run_dir(tmp_path / "out", "branchy") / "results.json").read_text())
    q = next(v for v in r["variants"] if v["name"] == "q")
    assert q["status"] == "failed" and "outside export.parity tolerance" in q["error"], q
    assert (r.get("recommendation") or {}).get("variant") != "q"
    assert "compress: 1 of 2 variants failed (q)" in capsys.readouterr().out  # not only "compress: 2/2 variants"

    assert main(["run", "plain.yaml", "--out", "out", "--quick"]) == 0
    r = json.loads((the_run_dir(tmp_path / "out", "plain") / "results.json").read_text())
    q = next(v for v in r["variants"] if v["name"] == "q")
    assert q["status"] == "ok", q
    notes = {n["step"]: n for n in q["notes"]}
    assert notes["onnx-quantize"]["preprocess"].startswith("applied"), notes["onnx-quantize"]
    assert notes["onnx export (implicit, before an ONNX step)"]["parity"]["max_abs_diff"] < 1e-4


def test_held_out_text_shorter_than_one_block_is_refused_naming_block_size(tmp_path, capsys):
    model = make_tiny_causal_lm(tmp_path / "lm")
    (tmp_path / "notes.txt").write_text("\n\n".join(f"A short paragraph number {i} about nothing much." for i in range(8)))
    recipe = write_yaml(tmp_path / "lm.yaml", {
        "name": "short", "model": {"source": "hf", "path": str(model), "head": "causal-lm"},
        "task": {"type": "language-modeling", "data": {"source": "file", "path": "notes.txt"}, "block_size": 200},
        "variants": {"baseline": {}}, "export": {"formats": []},
        "bench": {"backends": ["torch-cpu"], "batch_sizes": [1], "repeats": 1, "profile": False}})
    _refused(recipe, tmp_path, capsys, "task.block_size", "less than one block of 200")
