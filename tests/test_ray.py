"""Cells as Ray tasks (bench.executor: ray): on a local Ray instance the same cells as a local run,
each with the node it ran on; on a real two-node Ray cluster (ray.cluster_utils.Cluster, both nodes
on this machine) cells placed by custom resource, never two timed processes on one node at once, and
a Ray worker killed mid-cell turned into a retried process with nothing lost."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import QUICK_RECIPE, the_run_dir, write_yaml
from workbench.cli import main

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
pytestmark = [pytest.mark.slow, pytest.mark.serial]
ROOT = Path(__file__).resolve().parent.parent


def test_ray_executor_measures_the_same_cells_as_a_local_run(quick_run, tmp_path):
    out = tmp_path / "out"
    assert main(["run", str(quick_run.recipe_path), "--out", str(out), "--quick", "--executor", "ray"]) == 0
    results = json.loads((the_run_dir(out, QUICK_RECIPE["name"]) / "results.json").read_text())
    local = quick_run.results

    def cells(r):
        return {(c["variant"], c["backend"], c["batch_size"]): c for c in r["cells"]}

    assert set(cells(results)) == set(cells(local))
    assert set(local) | {"executor", "nodes"} == set(results)  # the same schema, plus where cells ran
    assert results["executor"]["name"] == "ray" and results["executor"]["address"] == "local"
    (node_id, node), = results["nodes"].items()  # a local Ray instance is this machine, one node
    assert node["environment"]["cpu"] == local["environment"]["cpu"]
    for key, c in cells(results).items():
        assert c["status"] == cells(local)[key]["status"], (key, c["reason"])
        if c["status"] in ("ok", "unstable"):
            assert c["node"]["id"] == node_id
            assert all(r["node"] == node_id for r in c["repeats"])
            # The outputs came back from the node: accuracy is scored from them as in a local run.
            assert abs(c["accuracy"]["accuracy"] - cells(local)[key]["accuracy"]["accuracy"]) < 0.02
    report = (the_run_dir(out, QUICK_RECIPE["name"]) / "report.md").read_text()
    assert "## Where the cells ran" in report


def test_a_bad_ray_address_is_refused_before_any_work(quick_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(quick_run.recipe_path), "--out", str(out), "--ray-address", "127.0.0.1:9"]) == 2
    assert "--ray-address goes with --executor ray" in capsys.readouterr().err
    assert not out.exists()


def _ray_worker_cells() -> list[tuple[int, int]]:
    """(cell process pid, its Ray worker's pid) for every bench.worker whose parent is a Ray worker."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "bench.worker" not in cmd:
                continue
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            parent = (Path("/proc") / str(ppid) / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if parent.startswith("ray::"):
            found.append((int(d.name), ppid))
    return found


def test_two_node_cluster_places_cells_by_resource_times_one_per_node_and_survives_a_killed_worker(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    # Both nodes share this machine, so each node's process is the other's noise: without this every
    # process would be measured three times (the busy guard), which is what a real cluster avoids.
    # Set before the cluster starts: its raylets, and the workers they spawn, inherit it.
    monkeypatch.setenv("WORKBENCH_BUSY_LIMIT_CORES", "4")

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"workbench_timing": 1, "kind_a": 1}, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"workbench_timing": 1, "kind_b": 1})
    cluster.wait_for_nodes()
    try:
        recipe = write_yaml(tmp_path / "cluster.yaml", {
            **QUICK_RECIPE, "name": "cluster",
            "variants": {"baseline": {}, "pruned": {"from": "baseline", "steps": [
                {"prune": {"method": "structured", "ratio": 0.3, "importance": "magnitude"}}]}},
            "bench": {**QUICK_RECIPE["bench"], "backends": ["torch-cpu", "torchscript-cpu"], "batch_sizes": [1],
                      "repeats": 2, "profile": False,
                      # Long enough per process that the killer below finds one mid-measurement.
                      "timing": {"warmup": 2, "min_iters": 20, "min_seconds": 1.5, "stability_threshold": 100.0},
                      "executor": "ray", "ray_address": cluster.address,
                      "placement": {"torch-cpu": {"resources": {"kind_a": 1}},
                                    "torchscript-cpu": {"resources": {"kind_b": 1}}}}})
        out = tmp_path / "out"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        driver = subprocess.Popen([sys.executable, "-m", "workbench.cli", "run", str(recipe), "--out", str(out)],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        killed = []

        def kill_one_worker():
            while driver.poll() is None and not killed:
                found = _ray_worker_cells()
                if found:
                    time.sleep(0.5)  # mid-measurement, not at its start
                    os.kill(found[0][1], signal.SIGKILL)
                    killed.append(found[0])
                time.sleep(0.2)

        killer = threading.Thread(target=kill_one_worker, daemon=True)
        killer.start()
        log, _ = driver.communicate(timeout=600)
        killer.join(timeout=5)
        assert driver.returncode == 0, log[-3000:]
        assert killed, "no Ray worker was found measuring a cell"

        run_dir = the_run_dir(out, "cluster")
        results = json.loads((run_dir / "results.json").read_text())
        nodes = {n["NodeID"]: n["Resources"] for n in _nodes(cluster)}
        kind = {nid: ("kind_a" if "kind_a" in res else "kind_b") for nid, res in nodes.items()}
        assert set(results["nodes"]) == set(nodes)
        cells = results["cells"]
        assert len(cells) == 4
        intervals: dict[str, list] = {}
        for c in cells:
            # Nothing lost: every cell measured in both rounds, the killed one included.
            assert c["status"] in ("ok", "unstable"), (c["variant"], c["backend"], c["reason"])
            assert len(c["repeats"]) == 2
            want = "kind_a" if c["backend"] == "torch-cpu" else "kind_b"
            assert kind[c["node"]["id"]] == want, (c["backend"], c["node"])
            for r in c["repeats"]:
                assert r["node"] == c["node"]["id"]  # a cell never mixes two machines
                assert r["ray_task"][0] <= r["ran"][0] <= r["ran"][1] <= r["ray_task"][1]
                intervals.setdefault(r["node"], []).append(tuple(r["ray_task"]))
        # Never two timed processes on one node at once (whole Ray tasks, not only the timed part).
        for node_id, spans in intervals.items():
            spans.sort()
            for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
                assert b0 >= a1 - 1e-3, f"two processes overlapped on node {node_id}: {(a0, a1)} and {(b0, b1)}"
        # Both nodes measured at once at some point: the cluster was used as one.
        a, b = (intervals[n] for n in nodes)
        assert any(x0 < y1 and y0 < x1 for x0, x1 in a for y0, y1 in b)
        # The killed process was run again by Ray, on the same node.
        retried = [r for c in cells for r in c["repeats"] if r.get("ray_attempts", 1) > 1]
        assert retried, "the killed worker's process was not retried"
        assert "## Where the cells ran" in (run_dir / "report.md").read_text()
    finally:
        cluster.shutdown()


def _nodes(cluster) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", "import json, ray; ray.init(address=%r, log_to_driver=False); "
                          "print(json.dumps([n for n in ray.nodes() if n['Alive']]))" % cluster.address],
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])
