"""Reference variants (`reference: true`): what a user gets from an engine's own defaults, without the
workbench. They are measured and shown like any other variant, labelled "(reference)", never recommended,
and the recommendation is stated against the fastest of them at each batch size, paired by round.

The report tests mark variants of a committed example run (real measurements, three interleaved rounds)
as references; the recipe tests go through `workbench validate`; one slow test runs a recipe end to end."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from conftest import the_run_dir
from reporting.analysis import faster, recommend, recommendation_record
from reporting.compare import compare_runs
from reporting.report import write_report
from workbench.cli import main

EXAMPLE = Path(__file__).resolve().parent.parent / "reports" / "examples" / "minilm-int8-cpu" / "results.json"
FASTEST = "ort-fused-int8"  # the example's fastest variant at every batch size, and its recommendation


def example(references=()) -> dict:
    results = json.loads(EXAMPLE.read_text())
    for v in results["variants"]:
        if v["name"] in references:
            v["reference"] = True
    return results


def cell(results: dict, variant: str, backend: str, batch: int) -> dict:
    return next(c for c in results["cells"]
                if (c["variant"], c["backend"], c["batch_size"]) == (variant, backend, batch))


def report_of(tmp_path: Path, results: dict, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(results))
    write_report(d)
    return d


# ----------------------------------------------------------------------------- the recommendation
def test_the_fastest_variant_marked_reference_is_shown_but_not_recommended(tmp_path):
    assert recommend(example()).winner.variant == FASTEST
    results = example(references=[FASTEST])
    rec = recommend(results)
    w = rec.winner
    assert w.variant != FASTEST and "not a reference variant" in rec.rules

    # At each batch size the only reference is the fastest cell, so the recommendation is slower than it,
    # by the same paired-by-round ratio the report uses everywhere.
    assert [e["batch_size"] for e in rec.vs_reference] == [1, 8]
    for e in rec.vs_reference:
        ref = cell(results, FASTEST, "ort-cpu", e["batch_size"])
        mine = cell(results, w.variant, w.backend, e["batch_size"])
        assert e["reference"] == {"variant": FASTEST, "backend": "ort-cpu"}
        assert (e["speedup"], *e["ci"]) == faster(mine, ref)
        assert e["speedup"] < 1 and e["ci"][1] < 1 and e["paired_rounds"] == 3

    record = recommendation_record(results)
    assert (record["variant"], record["backend"], record["batch_size"]) == (w.variant, w.backend, 8)
    assert record["vs_reference"] == list(rec.vs_reference)
    json.dumps(record)  # what results.json keeps

    d = report_of(tmp_path, results, "run")
    md = (d / "report.md").read_text()
    b8 = rec.vs_reference[1]
    assert (f"`{w.variant}` on `{w.backend}` is {b8['speedup']:.2f}x the best engine default (`{FASTEST}` on "
            f"`ort-cpu`) at batch 8 (95% CI {b8['ci'][0]:.2f}–{b8['ci'][1]:.2f}, 3 paired rounds)") in md
    assert f"**Ship `{w.variant}` on `{w.backend}`**" in md
    # Its rows are still there, labelled, in the variants and cells tables and the plot's key.
    # variants table, cells table (ort-cpu measured, torch-cpu skipped; batch 1 and 8), plot key, skipped cells
    assert md.count(f"| {FASTEST} (reference) |") == 1 + 4 + 1 + 2
    assert f"{FASTEST} (reference)" in (d / "report.html").read_text()


def test_the_best_reference_is_the_fastest_at_each_batch_size_on_any_backend():
    # The baseline is faster on ort-cpu at batch 1 and on torch-cpu at batch 8.
    results = example(references=["baseline"])
    rec = recommend(results)
    best = {e["batch_size"]: e["reference"]["backend"] for e in rec.vs_reference}
    assert best == {1: "ort-cpu", 8: "torch-cpu"}
    assert all(e["speedup"] > 1 for e in rec.vs_reference)


def test_a_batch_size_the_recommendation_has_no_cell_at_is_said_not_guessed(tmp_path):
    results = example(references=[FASTEST])
    w = recommend(results).winner
    results["cells"] = [c for c in results["cells"]
                        if (c["variant"], c["backend"], c["batch_size"]) != (w.variant, w.backend, 1)]
    b1, b8 = recommend(results).vs_reference
    assert b1["speedup"] is None and b1["ci"] is None
    assert b1["note"] == f"{w.variant} on {w.backend} has no measured cell at batch 1"
    assert b8["speedup"] is not None and "note" not in b8
    md = (report_of(tmp_path, results, "run") / "report.md").read_text()
    assert f"batch 1: no figure against the best engine default (`{FASTEST}` on `ort-cpu`): {b1['note']}" in md


def test_without_references_nothing_changes(tmp_path):
    results = example()
    rec = recommend(results)
    assert rec.vs_reference == () and "not a reference variant" not in rec.rules
    assert "vs_reference" not in recommendation_record(results)
    md = (report_of(tmp_path, results, "run") / "report.md").read_text()
    assert "(reference)" not in md and "engine default" not in md


def test_compare_reads_runs_with_references(tmp_path):
    a = report_of(tmp_path, example(), "a")
    marked = example(references=[FASTEST])
    marked["recommendation"] = recommendation_record(marked)
    b = report_of(tmp_path, marked, "b")
    verdict = compare_runs(a, b)["verdict"]
    assert verdict["recommendation_a"]["variant"] == FASTEST
    assert verdict["recommendation_b"]["variant"] == recommend(marked).winner.variant
    assert not verdict["same_recommendation"]


# ----------------------------------------------------------------------------- the recipe
RECIPE = {
    "name": "refs",
    "model": {"source": "builtin", "name": "digits-cnn"},
    "task": {"type": "classification", "data": {"source": "builtin", "name": "digits"}},
    "variants": {
        "baseline": {},
        # A second root variant, with no steps: the source model as it is, on ONNX Runtime's defaults.
        "ort-defaults": {"reference": True, "backends": ["ort-cpu"]},
    },
    "export": {"formats": ["onnx"]},
    "bench": {"backends": ["torch-cpu"], "batch_sizes": [1], "repeats": 2,
              "timing": {"warmup": 2, "min_iters": 5, "min_seconds": 0.05, "stability_threshold": 100.0}},
}


def with_variants(**variants) -> dict:
    r = copy.deepcopy(RECIPE)
    r["variants"].update(variants)
    return r


def validate(write_recipe, recipe, capsys) -> tuple[int, str]:
    rc = main(["validate", str(write_recipe(recipe))])
    return rc, capsys.readouterr().err


def test_reference_parses_on_a_second_root_variant_without_steps(write_recipe, capsys):
    from workbench.recipe import load_recipe

    recipe = load_recipe(write_recipe(RECIPE))
    ref = recipe.variants["ort-defaults"]
    assert ref.reference and ref.from_ is None and ref.steps == []
    assert not recipe.variants["baseline"].reference
    assert validate(write_recipe, RECIPE, capsys)[0] == 0


def test_a_reference_that_is_not_a_boolean_is_refused_naming_the_field(write_recipe, capsys):
    rc, err = validate(write_recipe, with_variants(**{"ort-defaults": {"reference": "maybe"}}), capsys)
    assert rc == 2 and "Traceback" not in err
    assert "variants.ort-defaults.reference" in err and "'maybe'" in err and "boolean" in err


def test_a_reference_is_the_baseline_only_when_the_recipe_says_so(write_recipe, capsys):
    implicit = with_variants(baseline={"reference": True}, plain={"from": "baseline"})
    rc, err = validate(write_recipe, implicit, capsys)
    assert rc == 2 and "report.baseline" in err and "is a reference" in err and "'plain'" in err
    assert validate(write_recipe, {**implicit, "report": {"baseline": "baseline"}}, capsys)[0] == 0


@pytest.mark.slow
def test_a_run_records_measures_and_labels_a_reference(write_recipe, tmp_out):
    assert main(["run", str(write_recipe(RECIPE)), "--out", str(tmp_out), "--quick"]) == 0
    d = the_run_dir(tmp_out, "refs")
    results = json.loads((d / "results.json").read_text())
    records = {v["name"]: v for v in results["variants"]}
    assert records["ort-defaults"]["reference"] is True and "reference" not in records["baseline"]
    ref = cell(results, "ort-defaults", "ort-cpu", 1)
    assert ref["status"] in ("ok", "unstable")
    mine = cell(results, "baseline", "torch-cpu", 1)
    rec = results["recommendation"]
    assert (rec["variant"], rec["backend"]) == ("baseline", "torch-cpu")  # never the reference, fast or not
    [entry] = rec["vs_reference"]
    assert entry["reference"] == {"variant": "ort-defaults", "backend": "ort-cpu"} and entry["paired_rounds"] == 2
    assert (entry["speedup"], *entry["ci"]) == pytest.approx(faster(mine, ref))
    md = (d / "report.md").read_text()
    assert "| ort-defaults (reference) |" in md and "the best engine default (`ort-defaults` on `ort-cpu`)" in md
