"""results.json: the one document a run (recipe or `workbench bench`) writes, assembled in one
place so that both produce the same schema; everything else is made from it."""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Optional

from core import atomic
from core.environment import fingerprint

SCHEMA_VERSION = 1


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def quick_timing(timing) -> dict:
    """--quick: a smoke run; the report says so, and its numbers are not for decisions."""
    t = timing.model_dump()
    t.update(warmup=min(t["warmup"], 2), min_iters=min(t["min_iters"], 5), min_seconds=min(t["min_seconds"], 0.25),
             max_seconds=min(t["max_seconds"], 10.0))
    return t


def split_nodes(cells: list) -> dict:
    """Cells measured under Ray carry their node's full description; keep {id, hostname, address,
    hardware_sha} in the cell and the rest (environment fingerprint, resources) once per node."""
    nodes = {}
    for c in cells:
        node = c.get("node")
        if not node or "environment" not in node:
            continue
        nodes.setdefault(node["id"], {k: v for k, v in node.items() if k != "id"})
        c["node"] = {k: node.get(k) for k in ("id", "hostname", "ip", "hardware_sha")}
    return nodes


def write_results(run_dir: Path, *, recipe: dict, threads: int, model: dict, task: dict, timing: dict,
                  started: str, quick: bool, variants: list, artifacts: list, cells: list,
                  roofline_probe: Optional[dict] = None, search: Optional[dict] = None, load: Optional[list] = None,
                  executor: Optional[dict] = None) -> dict:
    """Write run_dir/results.json atomically (a folder without it is an unfinished run) and the report."""
    nodes = split_nodes(cells)
    results = {
        "schema_version": SCHEMA_VERSION,
        "recipe": recipe,
        "environment": {**fingerprint(threads), "roofline_probe": roofline_probe},
        "model": model,
        "task": task,
        "timing": timing,
        "started": started,
        "finished": now(),
        "quick": quick,
        "variants": variants,
        "artifacts": artifacts,
        "cells": cells,
        # Load-scenario cells (bench.serve under LoadGen), apart from `cells`: their figures are capacities
        # and rates under a queue, not one call's latency, so nothing that compares latency cells reads them.
        **({"load": load} if load else {}),
        **({"search": search} if search else {}),
        **({"executor": executor} if executor and executor.get("name") != "local" else {}),
        **({"nodes": nodes} if nodes else {}),
    }
    atomic.write_json(run_dir / "results.json", results)
    from reporting.analysis import recommendation_record
    from reporting.report import write_report

    # What the report recommends, kept beside the numbers it came from; added once those are on disk, so that
    # a failure in the analysis cannot lose them. The report recomputes it from them.
    results["recommendation"] = recommendation_record(results)
    atomic.write_json(run_dir / "results.json", results)
    write_report(run_dir)
    return results
