"""The report a deployment engineer reads in a minute: the warning when the baseline scores at chance,
the numbered accuracy-against-latency plot and its key, the speedup chart, and recommended/ (the file to
ship, with a snippet that loads and calls it). Built from the committed example runs (copied, sometimes
modified) and from the session's `quick_run`, whose run folder has the real model files."""
from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from reporting.analysis import recommend
from reporting.plots import pareto_points
from reporting.report import write_report

EXAMPLES = Path(__file__).resolve().parent.parent / "reports" / "examples"
WARNING = "BASELINE AT CHANCE"


def example(tmp_path: Path, name: str, edit=None) -> Path:
    """A copy of an example run's results.json alone, optionally edited, with its report rebuilt."""
    d = tmp_path / name
    d.mkdir()
    results = json.loads((EXAMPLES / name / "results.json").read_text())
    if edit:
        edit(results)
    (d / "results.json").write_text(json.dumps(results))
    write_report(d)
    return d


def set_baseline_accuracy(results: dict, acc: float) -> None:
    next(v for v in results["variants"] if v["name"] == "baseline")["accuracy"]["accuracy"] = acc


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return struct.unpack(">II", data[16:24])


# ----------------------------------------------------------------------------- chance
def test_baseline_at_the_majority_rate_is_warned_before_the_recommendation(tmp_path):
    def untrained(r):
        r["task"].update(majority_rate=0.1022, n_classes=10)
        set_baseline_accuracy(r, 0.1)

    d = example(tmp_path, "digits-prune-distill-cpu", untrained)
    md = (d / "report.md").read_text()
    assert WARNING in md
    assert md.index(WARNING) < md.index("## Recommendation")
    assert "`baseline` scores accuracy 0.1000 against a majority-class rate of 0.1022" in md
    assert "say nothing" in md and "untrained" in md
    html = (d / "report.html").read_text()
    assert f"<p class='warn'>{WARNING}" in html


def test_within_the_tolerance_above_chance_still_warns_and_n_classes_is_the_fallback(tmp_path):
    def old_run(r):  # a results.json from before majority_rate: 1 / n_classes is the chance rate
        r["task"]["n_classes"] = 10
        set_baseline_accuracy(r, 0.105)

    md = (example(tmp_path, "digits-prune-distill-cpu", old_run) / "report.md").read_text()
    assert "`baseline` scores accuracy 0.1050 against a chance rate of 0.1000 (1 / 10 classes)" in md


def test_a_language_model_at_a_uniform_guess_is_warned_and_a_trained_one_is_not(tmp_path):
    d = example(tmp_path, "docstring-gpt-cpu")
    assert WARNING not in (d / "report.md").read_text()  # trained: perplexity far below its vocabulary

    def untrained(r):
        vocab = r["model"]["io"]["inputs"]["input_ids"]["high"]
        next(v for v in r["variants"] if v["name"] == "baseline")["accuracy"]["perplexity"] = 0.98 * vocab

    (tmp_path / "u").mkdir()
    md = (example(tmp_path / "u", "docstring-gpt-cpu", untrained) / "report.md").read_text()
    assert WARNING in md and "a uniform guess over the tokens scores" in md


@pytest.mark.slow
@pytest.mark.parametrize("name, edit", [
    ("digits-prune-distill-cpu", lambda r: r["task"].update(majority_rate=0.1022, n_classes=10)),  # trained: 0.99
    ("digits-prune-distill-cpu", lambda r: set_baseline_accuracy(r, 0.1)),  # no majority_rate / n_classes: no claim
    ("minilm-l6-cpu", lambda r: r["task"].update(majority_rate=1.0)),  # not accuracy: nothing to compare with
])
def test_no_chance_warning_when_the_baseline_learnt_something_or_chance_is_unknown(tmp_path, name, edit):
    d = example(tmp_path, name, edit)
    assert WARNING not in (d / "report.md").read_text()
    assert WARNING not in (d / "report.html").read_text()


@pytest.mark.slow
def test_a_real_run_records_the_majority_rate_and_is_warned_only_once_its_baseline_falls_to_it(quick_run, tmp_path):
    task = quick_run.results["task"]
    assert 0 < task["majority_rate"] < 0.5 and task["n_classes"] == 10  # digits: ten nearly balanced classes
    assert WARNING not in (quick_run.run_dir / "report.md").read_text()  # the trained CNN scores > 0.9
    d = tmp_path / "run"
    d.mkdir()
    results = json.loads(json.dumps(quick_run.results))  # a copy: the session's run is shared
    set_baseline_accuracy(results, task["majority_rate"])
    (d / "results.json").write_text(json.dumps(results))
    write_report(d)
    assert f"scores accuracy {task['majority_rate']:.4f} against a majority-class rate" in (d / "report.md").read_text()


# ----------------------------------------------------------------------------- plots
def md_table_after(md: str, marker: str) -> list[list[str]]:
    lines = md[md.index(marker):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_accuracy_plot_points_are_numbered_and_the_table_below_says_which_cell_each_is(tmp_path):
    d = example(tmp_path, "digits-prune-distill-cpu")
    results = json.loads((d / "results.json").read_text())
    rec = recommend(results)
    md = (d / "report.md").read_text()
    plot = "![Accuracy against latency (Pareto frontier)](plots/accuracy_vs_latency.png)"
    assert plot in md and (d / "plots" / "accuracy_vs_latency.png").is_file()
    head, _, *rows = md_table_after(md, plot)
    assert head == ["#", "variant", "backend", "p50 ms (batch 32)", "accuracy", "Pareto frontier", "recommended"]
    # One row per measured cell at the recommendation's batch size, numbered 1.. in order of p50.
    cells = [c for c in results["cells"] if c.get("latency_ms") and c["batch_size"] == 32]
    assert [r[0] for r in rows] == [str(n) for n in range(1, len(cells) + 1)]
    assert [float(r[3]) for r in rows] == sorted(float(r[3]) for r in rows)
    assert {(r[1], r[2]) for r in rows} == {(c["variant"], c["backend"]) for c in cells}
    # The recommended row is the cell the report ships; its numbers are the cell's own.
    chosen = [r for r in rows if r[6] == "yes"]
    assert [(r[1], r[2]) for r in chosen] == [(rec.winner.variant, rec.winner.backend)] == [("p50-kd", "ort-cpu")]
    assert chosen[0][3] == f"{rec.winner.p50:.3f}" and chosen[0][4] == f"{rec.winner.score:.4f}"
    # Frontier: the fastest point, then each one more accurate than every faster one.
    best, frontier = -1.0, []
    for r in rows:
        frontier.append("yes" if float(r[4]) > best else "")
        best = max(best, float(r[4]))
    assert [r[5] for r in rows] == frontier
    assert [p["n"] for p in pareto_points(results, rec)] == list(range(1, len(rows) + 1))


def test_speedup_chart_replaces_the_old_one_and_grows_with_its_bars(tmp_path):
    # A rebuilt folder that still has a plot the report no longer draws (the old two-panel chart):
    # it goes, the new one comes.
    d = tmp_path / "digits"
    shutil.copytree(EXAMPLES / "digits-prune-distill-cpu", d)
    shutil.copy(d / "plots" / "size_by_variant.png", d / "plots" / "speedup_and_accuracy_delta.png")
    write_report(d)
    assert not (d / "plots" / "speedup_and_accuracy_delta.png").exists()
    md = (d / "report.md").read_text()
    assert "(plots/speedup_vs_baseline.png)" in md and "speedup_and_accuracy_delta" not in md
    assert (d / "plots" / "accuracy_delta_by_variant.png").is_file()
    small = example(tmp_path, "minilm-int8-cpu")
    # One row per bar (every non-baseline cell with a speedup) plus a header per backend: the taller chart
    # is the one with more bars, at the same width.
    (w_big, h_big), (w_small, h_small) = (png_size(x / "plots" / "speedup_vs_baseline.png") for x in (d, small))
    assert w_big == w_small and h_big > h_small * 1.5


# ----------------------------------------------------------------------------- recommended/
def run_snippet(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "load_and_call.py"], cwd=folder, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_the_run_leaves_the_recommended_file_with_a_snippet_that_loads_and_calls_it(quick_run):
    d = quick_run.run_dir
    rec = recommend(quick_run.results)
    art = next(a for a in quick_run.results["artifacts"]
               if a["variant"] == rec.winner.variant and a["format"] == rec.winner.cell["format"])
    name = Path(art["path"]).name
    folder = d / "recommended"
    assert (folder / name).read_bytes() == (d / art["path"]).read_bytes()
    io = json.loads((folder / f"{name}.io.json").read_text())
    assert io == quick_run.results["model"]["io"]
    readme = (folder / "README.md").read_text()
    for fact in (f"`{rec.winner.variant}`", f"`{rec.winner.backend}`", f"{rec.winner.p50:.3f} ms", "speedup",
                 f"accuracy | {rec.winner.score:.4f}", "python load_and_call.py"):
        assert fact in readme, fact
    out = run_snippet(folder)
    assert out.returncode == 0, out.stderr
    assert f"shape ({rec.winner.cell['batch_size']}, 10)" in out.stdout  # digits: 10 classes
    md = (d / "report.md").read_text()
    section = md[md.index("## Recommendation"):md.index("## Plots")]
    assert f"`recommended/` beside this report holds `{name}` (a copy of `{art['path']}`)" in section


def retarget(run_dir: Path, tmp_path: Path, backend: str) -> Path:
    """A copy of the run whose constraints pin the recommendation to `backend`; torchscript-cpu stands in for
    the torch-cpu cells (same variants, the run's real TorchScript exports), since the quick run has none."""
    d = tmp_path / backend
    shutil.copytree(run_dir, d)
    results = json.loads((d / "results.json").read_text())
    if backend == "torchscript-cpu":
        for c in results["cells"]:
            if c["backend"] == "torch-cpu":
                c.update(backend=backend, format="torchscript")
        results["recipe"]["parsed"]["bench"]["backends"] = [backend, "ort-cpu"]
    results["recipe"]["parsed"]["report"]["constraints"]["backend"] = backend
    (d / "results.json").write_text(json.dumps(results))
    write_report(d)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("backend, files", [
    ("torch-cpu", {"module.pt", "module.sha256", "module.pt.io.json"}),
    ("torchscript-cpu", {"model.torchscript.pt", "model.torchscript.pt.io.json"}),
])
def test_snippets_for_torch_backends_run_and_a_new_recommendation_replaces_the_old_files(quick_run, tmp_path,
                                                                                         backend, files):
    assert (quick_run.run_dir / "recommended" / "model.onnx").is_file()  # the run recommends an ORT cell
    folder = retarget(quick_run.run_dir, tmp_path, backend) / "recommended"
    assert {p.name for p in folder.iterdir()} == files | {"load_and_call.py", "README.md"}
    readme = (folder / "README.md").read_text()
    assert f"on `{backend}`" in readme.splitlines()[0]
    # A pickled module needs the classes it names; a TorchScript file needs torch alone.
    assert ("model-workbench must be importable" in readme) == (backend == "torch-cpu"), readme
    out = run_snippet(folder)
    assert out.returncode == 0, out.stderr
    assert re.search(r"shape \(\d+, 10\)", out.stdout), out.stdout


@pytest.mark.slow
def test_no_recommendation_removes_the_folder_and_the_report_does_not_mention_it(quick_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(quick_run.run_dir, d)
    results = json.loads((d / "results.json").read_text())
    results["recipe"]["parsed"]["report"]["constraints"]["max_latency_ms"] = 1e-9  # nothing is that fast
    (d / "results.json").write_text(json.dumps(results))
    write_report(d)
    assert not (d / "recommended").exists()
    md = (d / "report.md").read_text()
    assert "No measured cell meets the constraints" in md and "recommended/" not in md


@pytest.mark.slow
def test_a_report_rebuilt_from_results_json_alone_writes_no_recommended_folder(quick_run, tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy2(quick_run.run_dir / "results.json", d / "results.json")
    write_report(d)
    assert not (d / "recommended").exists()
    # The document is the same as the run's: it is made from results.json alone.
    assert (d / "report.md").read_text() == (quick_run.run_dir / "report.md").read_text()


# ----------------------------------------------------------------------------- decoder LMs: int4 by method
def _add_int4_method(results: dict, name: str, step: dict, kl: float, ppl: float) -> None:
    """A copy of docstring-gpt's ort-int4 variant and its cells, as if its 4-bit weights were made by `step`."""
    import copy

    src = next(v for v in results["variants"] if v["name"] == "ort-int4")
    v = copy.deepcopy(src)
    v.update(name=name, steps=[step])
    v["accuracy"] = {**v["accuracy"], "kl": kl, "perplexity": ppl}
    results["variants"].append(v)
    for c in [c for c in results["cells"] if c["variant"] == "ort-int4"]:
        c = copy.deepcopy(c)
        c["variant"] = name
        if c.get("accuracy"):
            c["accuracy"] = {**c["accuracy"], "kl": kl, "perplexity": ppl}
        results["cells"].append(c)


def test_four_bit_variants_of_the_baseline_are_set_side_by_side_by_how_their_weights_were_made(tmp_path):
    def edit(results):
        gptq = {"name": "onnx-quantize", "params": {"mode": "weight-only", "bits": 4, "block_size": 32,
                                                    "algorithm": "gptq", "calibration_batches": 8}}
        awq = {"name": "nncf-compress-weights", "params": {"mode": "int4_sym", "group_size": 32, "awq": True,
                                                           "scale_estimation": True, "ratio": 1.0}}
        _add_int4_method(results, "ort-int4-gptq", gptq, kl=0.004, ppl=216.5)
        _add_int4_method(results, "nncf-int4-awq", awq, kl=0.005, ppl=216.8)

    report = (example(tmp_path, "docstring-gpt-cpu", edit) / "report.md").read_text()
    assert "## 4-bit weights by method, at equal bits" in report
    section = report.split("## 4-bit weights by method, at equal bits")[1].split("\n## ")[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "ort-cpu" in ln]
    # Sorted by KL on each backend: GPTQ, then AWQ, then round-to-nearest (ort-int4's own KL, 0.0074).
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["ort-int4-gptq", "nncf-int4-awq", "ort-int4"]
    assert "GPTQ (8 calibration batches)" in rows[0] and "AWQ + scale estimation, group 32" in rows[1]
    assert "round-to-nearest (ORT's default), block 32" in rows[2]
    assert "pruned-int4" not in section  # made from the pruned model, not the baseline: not at equal footing


def test_without_an_accuracy_constraint_a_variant_that_lost_its_accuracy_is_not_recommended():
    """No report.constraints: the fastest cell won whatever it scored (a pruned model at 0.22 against 1.00)."""
    from reporting.analysis import recommend

    r = json.loads((EXAMPLES / "quickstart-cpu" / "results.json").read_text())
    r["recipe"]["parsed"]["report"]["constraints"]["max_accuracy_drop"] = None
    winner = recommend(r).winner
    for v in r["variants"]:  # the variant that won loses its accuracy, in its cells too
        if v["name"] == winner.variant:
            v["accuracy"]["accuracy"] = 0.22
    for c in r["cells"]:
        if c["variant"] == winner.variant and c.get("accuracy"):
            c["accuracy"]["accuracy"] = 0.22
    rec = recommend(r)
    assert rec.winner.variant != winner.variant
    assert any("the default, 1% of the baseline's" in rule for rule in rec.rules), rec.rules
