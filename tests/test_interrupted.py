"""Runs that are interrupted (SIGINT) or killed (SIGKILL) during bench: the run directory says
`interrupted`, nothing measures on or writes after the kill, and `workbench run --resume RUN_DIR`
finishes the run measuring only the processes that were missing, with no duplicate cells."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_yaml
from core.processes import child_env
from workbench.cli import main

# Judges timing (latencies, capacities, a run's progress when a signal lands): run alone, after the rest
# (make test), never beside another test.
pytestmark = pytest.mark.serial

RECIPE = {
    "name": "killed",
    "model": {"source": "builtin", "name": "digits-cnn"},
    "task": {"type": "classification", "data": {"source": "builtin", "name": "digits"}},
    "variants": {"baseline": {}, "int8": {"from": "baseline", "steps": [{"quantize": {"method": "dynamic-int8"}}]}},
    "export": {"formats": []},
    # Two rounds are enough to interrupt between them; no profile processes: what is tested is the bench.
    "bench": {"backends": ["torch-cpu"], "batch_sizes": [1, 4], "repeats": 2, "profile": False,
              "timing": {"warmup": 2, "min_iters": 5, "min_seconds": 0.2, "stability_threshold": 100.0}},
}


def _start(recipe: Path, out: Path) -> subprocess.Popen:
    code = "import sys; from workbench.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, "run", str(recipe), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), text=True)


def _wait_for_measured_processes(out: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> Path:
    """The run directory, once its journal holds `n` finished processes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for journal in out.glob("killed/*/.work/processes.jsonl"):
            if len(journal.read_text().splitlines()) >= n:
                return journal.parent.parent
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the run measured nothing in time")


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def _journal(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / ".work" / "processes.jsonl").read_text().splitlines()]


def _snapshot(run_dir: Path) -> dict:
    """Every file under the run directory but the two the watcher writes, with size and mtime."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file() and p.name not in ("status.json", "run.log")}


def _our_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (a test's temporary folder)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd:
                found.append(cmd)
    return found


def _check_resumed(run_dir: Path, before: list[dict]) -> None:
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert _status(run_dir)["state"] == "finished"
    r = json.loads((run_dir / "results.json").read_text())
    cells = [(c["variant"], c["backend"], c["batch_size"]) for c in r["cells"]]
    assert len(cells) == len(set(cells)) == 4  # no duplicate cells
    kept = {rec["record"]["started"] for rec in before if not rec["failed"]}
    started = []
    for c in r["cells"]:
        assert c["status"] in ("ok", "unstable"), c["reason"]
        assert sorted(p["round"] for p in c["repeats"]) == [0, 1]  # each round once, none twice
        started += [p["started"] for p in c["repeats"]]
    # What was measured before the interruption was kept, not measured again.
    assert kept and kept <= set(started)
    assert "kept" in (run_dir / "run.log").read_text()
    assert not (run_dir / ".work" / "processes.jsonl").exists()


@pytest.mark.slow
def test_sigint_during_bench_leaves_an_interrupted_run_that_resume_completes(tmp_path):
    recipe = write_yaml(tmp_path / "killed.yaml", RECIPE)
    proc = _start(recipe, tmp_path / "out")
    run_dir = _wait_for_measured_processes(tmp_path / "out", 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    status = _status(run_dir)
    assert status["state"] == "interrupted" and "--resume" in status["reason"]
    assert not (run_dir / "results.json").exists()
    assert "run interrupted" in (run_dir / "run.log").read_text()
    _check_resumed(run_dir, _journal(run_dir))


@pytest.mark.slow
def test_sigkill_during_bench_is_recorded_leaves_no_orphan_and_resume_completes(tmp_path):
    recipe = write_yaml(tmp_path / "killed.yaml", RECIPE)
    proc = _start(recipe, tmp_path / "out")
    run_dir = _wait_for_measured_processes(tmp_path / "out", 2, proc)
    time.sleep(0.3)  # most likely inside the next cell's process
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while _status(run_dir)["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    status = _status(run_dir)
    assert status["state"] == "interrupted" and "killed" in status["reason"]
    assert "run killed" in (run_dir / "run.log").read_text()
    # Nothing goes on measuring for, or writing into, the dead run.
    time.sleep(0.5)
    assert _our_processes(str(tmp_path)) == []
    before, journal = _snapshot(run_dir), _journal(run_dir)
    time.sleep(3)
    assert _snapshot(run_dir) == before
    _check_resumed(run_dir, journal)


@pytest.mark.slow
def test_resume_refuses_a_finished_run_and_a_changed_recipe(tmp_path, capsys):
    recipe = write_yaml(tmp_path / "killed.yaml", {**RECIPE, "variants": {"baseline": {}},
                                                   "bench": {**RECIPE["bench"], "batch_sizes": [1]}})
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quick"]) == 0
    (run_dir,) = [d for d in (tmp_path / "out" / "killed").iterdir() if d.name != "cache"]
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert "finished; nothing to resume" in capsys.readouterr().err
    status = _status(run_dir)
    (run_dir / "status.json").write_text(json.dumps({**status, "state": "interrupted"}))
    recipe.write_text(recipe.read_text() + "\n# edited\n")
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert "changed since the run started" in capsys.readouterr().err
