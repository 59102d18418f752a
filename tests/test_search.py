"""The accuracy-aware search on the digits CNN: candidates that fail the accuracy constraint are
rejected before timing, the fastest measured one becomes an ordinary variant measured on every
backend, results.json and the report carry the search; a bad search block fails validate."""
from __future__ import annotations

import json

import pytest

from conftest import the_run_dir, write_yaml
from workbench.cli import main
from workbench.search_space import apply, grid

RECIPE = {
    "name": "search-digits",
    "model": {"source": "builtin", "name": "digits-cnn"},
    "task": {"type": "classification", "data": {"source": "builtin", "name": "digits"}},
    "variants": {"baseline": {}},
    "export": {"formats": ["onnx"]},
    "bench": {"backends": ["ort-cpu", "torch-cpu"], "batch_sizes": [4], "repeats": 2,
              "timing": {"warmup": 2, "min_iters": 5, "min_seconds": 0.05, "stability_threshold": 100.0}},
    "search": {
        "steps": [{"prune": {"method": "structured", "ratio": 0.3}}, {"onnx-quantize": {"preset": "auto"}}],
        "space": {"steps[0].ratio": [0.1, 0.9], "steps[1].per_channel": [True, False]},
        "objective": {"backend": "ort-cpu", "batch_size": 4},
        "constraints": {"max_accuracy_drop": 0.1},
    },
}


def test_apply_sets_and_removes_parameters_of_the_template():
    steps = [{"prune": {"ratio": 0.3}}, "onnx-quantize"]
    assert apply(steps, {"steps[0].ratio": 0.5, "steps[1].mode": "static"}) == [
        {"prune": {"ratio": 0.5}}, {"onnx-quantize": {"mode": "static"}}]
    assert apply(steps, {"steps[0].ratio": None}) == [{"prune": {}}, {"onnx-quantize": {}}]
    assert len(grid({"a": [1, 2], "b": [3, 4, 5]})) == 6


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["grid", "greedy"])
def test_search_rejects_before_timing_and_its_best_becomes_a_measured_variant(strategy, tmp_path):
    recipe = write_yaml(tmp_path / "s.yaml", {**RECIPE, "search": {**RECIPE["search"], "strategy": strategy}})
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quick"]) == 0
    run_dir = the_run_dir(tmp_path / "out", "search-digits")
    r = json.loads((run_dir / "results.json").read_text())
    cands = r["search"]["candidates"]
    assert len(cands) == (4 if strategy == "grid" else 3)  # greedy: 2 ratios, then 2 per_channel values, one shared
    for c in cands:
        if c["params"]["steps[0].ratio"] == 0.9:  # pruning 90 % of the channels cannot keep the accuracy
            assert c["status"] == "rejected" and "before timing" in c["reason"] and "p50_ms" not in c
        else:
            assert c["status"] == "measured" and c["p50_ms"] > 0 and c["ci95"][0] <= c["p50_ms"] <= c["ci95"][1]
    best = r["search"]["best"]
    measured = [c for c in cands if c["status"] == "measured"]
    assert best["p50_ms"] == min(c["p50_ms"] for c in measured)
    assert best["lead"]["runner_up"] in {c["name"] for c in measured} and "significant" in best["lead"]
    # The best is an ordinary variant, with the same steps, benchmarked like the hand-written ones.
    v = next(v for v in r["variants"] if v["name"] == "search-best")
    assert v["status"] == "ok" and v["parent"] == "baseline" and [s["name"] for s in v["steps"]] == [
        "prune", "onnx-quantize"]
    assert v["cached"] is True  # built once, by the search
    assert any(c["variant"] == "search-best" and c["status"] in ("ok", "unstable") for c in r["cells"])
    report = (run_dir / "report.md").read_text()
    assert "## Search" in report and "rejected before timing" in report
    assert (run_dir / "plots" / "search.png").is_file()


@pytest.mark.parametrize("change, field", [
    ({"space": {"steps[5].ratio": [0.1]}}, "search.space.steps[5].ratio"),
    ({"space": {"steps[0].ratio": [1.5]}}, "search candidate 1: steps[0].prune.ratio"),
    ({"from": "nope"}, "search.from"),
    ({"objective": {"backend": "ort-cuda"}}, "search.objective.backend"),
    # a module name the model lacks: refused when the model loads, not by every candidate mid-run
    ({"steps": [{"prune": {"method": "structured", "ratio": 0.3, "ignored_layers": ["feature.0"]}},
                {"onnx-quantize": {"preset": "auto"}}]}, "search candidate 1: steps[0].prune.ignored_layers"),
])
def test_a_bad_search_block_fails_validate_naming_the_field(change, field, tmp_path, capsys):
    recipe = write_yaml(tmp_path / "s.yaml", {**RECIPE, "search": {**RECIPE["search"], **change}})
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err
