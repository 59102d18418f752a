"""`workbench compare`: unchanged cells show no significant difference; a model 20 % slower is flagged
against each of two runs of the original."""
import json
import os
from pathlib import Path

import pytest

from workbench.cli import main

# Judges timing (latencies, capacities, a run's progress when a signal lands): run alone, after the rest
# (make test), never beside another test.
pytestmark = pytest.mark.serial

# The model sleeps a fixed time per call, so its latency is steady enough to compare across processes;
# SLEEP_MS (read in the cell's own process) slows it down deliberately.
MODEL = '''
import os, time
import torch
from torch import nn

class Sleepy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 4)

    def forward(self, x):
        time.sleep(float(os.environ.get("SLEEP_MS", "5")) / 1000)
        return self.lin(x)

def build():
    return Sleepy()
'''

RECIPE = """
name: sleepy
model: {source: python, ref: "sleepy_model:build", inputs: {x: {shape: [batch, 16]}}}
variants: {baseline: {}}
export: {formats: []}
bench:
  backends: [torch-cpu]
  batch_sizes: [1]
  timing: {warmup: 3, min_iters: 40, min_seconds: 0.2}
"""


def _run(tmp_path: Path, out: str, sleep_ms: str) -> Path:
    os.environ["SLEEP_MS"] = sleep_ms
    try:
        assert main(["run", str(tmp_path / "sleepy.yaml"), "--out", str(tmp_path / out)]) == 0
    finally:
        os.environ.pop("SLEEP_MS", None)
    return next(p for p in (tmp_path / out / "sleepy").iterdir() if p.name != "cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    (tmp / "sleepy_model.py").write_text(MODEL)
    (tmp / "sleepy.yaml").write_text(RECIPE)
    return _run(tmp, "a", "5"), _run(tmp, "b", "5"), _run(tmp, "slow", "6"), tmp


def _verdicts(out: Path) -> list[str]:
    return [c["verdict"] for c in json.loads((out / "compare.json").read_text())["cells"]]


@pytest.mark.slow
def test_two_runs_of_an_unchanged_recipe_show_no_significant_difference(runs):
    a, b, _, tmp = runs
    assert main(["compare", str(a), str(b), "--out", str(tmp / "same"), "--fail-if-slower", "5%"]) == 0
    assert _verdicts(tmp / "same") == ["no significant difference"]
    # Whether the interval was narrow enough to call it unchanged is said, not implied.
    (row,) = json.loads((tmp / "same" / "compare.json").read_text())["cells"]
    lo, hi = row["change_ci95"]
    assert row["cannot_tell"] == (lo < -0.05 or hi > 0.05)
    assert ("not ruled out" in (tmp / "same" / "compare.md").read_text()) == row["cannot_tell"]
    assert (tmp / "same" / "compare.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
@pytest.mark.parametrize("original", [0, 1])
def test_a_model_20_percent_slower_is_flagged_and_fails_the_gate(runs, capsys, original):
    slow, tmp = runs[2], runs[3]
    out = tmp / f"slow-vs-{original}"
    assert main(["compare", str(runs[original]), str(slow), "--out", str(out), "--fail-if-slower", "5%"]) == 3
    assert _verdicts(out) == ["slower"]
    assert "FAIL" in capsys.readouterr().out
    row = json.loads((out / "compare.json").read_text())["cells"][0]
    assert 0.1 < row["change"] < 0.3


def test_compare_of_a_folder_without_results_exits_2(tmp_path, capsys):
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_compare_states_whether_the_verdict_survived_and_sees_through_machine_drift(tmp_path, capsys):
    """The flagship's reference run against itself with every sample 15 % slower (a slower machine):
    every cell is 'slower', yet the recommendation and every speedup against its own baseline hold."""
    src = Path(__file__).resolve().parent.parent / "reports" / "examples" / "minilm-l6-cpu" / "results.json"
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
    results = json.loads(src.read_text())
    (a / "results.json").write_text(json.dumps(results))
    for c in results["cells"]:
        for p in c.get("repeats") or []:
            p["samples_ms"] = [x * 1.15 for x in p["samples_ms"]]
            p["p50"] *= 1.15
        if c.get("latency_ms"):
            c["latency_ms"] = {k: ([x * 1.15 for x in v] if isinstance(v, list) else
                                   v * 1.15 if k.startswith("p") or k in ("mean", "min", "max") else v)
                               for k, v in c["latency_ms"].items()}
    (b / "results.json").write_text(json.dumps(results))
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    out = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    v = out["verdict"]
    assert v["same_recommendation"] and v["recommendation_a"]["variant"] == "bf16"  # the reference run's pick
    assert v["median_change"] == pytest.approx(0.15, abs=0.01)
    assert v["speedups"] and v["speedups_agreeing"] == len(v["speedups"])
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "the same verdict" in md and "the whole machine moved" in md
