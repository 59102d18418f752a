"""`workbench suggest RUN_DIR`: turn the report's "why isn't it faster?" into variants to measure.
Every finding whose fix is a change of steps (or of a variant's backends) becomes a variant of a
new recipe, written beside the run as `suggested.yaml`: the run's own recipe, its relative paths still
resolving against the original folder (`base_dir`), plus one variant per fix, named for what it
answers and marked `suggested: {for, finding, kind}`. Run it, and the next report says what each
suggestion gave against the variant it was suggested for, so the advice is measured, not trusted."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from core import atomic
from core.errors import RecipeError

FILE = "suggested.yaml"


def suggestions(results: dict) -> list[dict]:
    """[{name, for, finding, kind, spec}] for every finding with steps or backends to try, at the
    report's batch size; one per (variant, fix), in the report's order."""
    from reporting.analysis import recommend
    from reporting.diagnosis import as_written, diagnoses

    batch = recommend(results).batch_size
    variants = {v["name"]: v for v in results["variants"]}
    out, seen = [], set()
    for d in diagnoses(results, batch):
        v = variants[d["variant"]]
        for f in d["findings"]:
            if f.kind == "fact" or not (f.steps or (f.bench or {}).get("backends")):
                continue
            spec = {"from": v.get("parent"), "steps": f.steps} if f.steps else \
                {"from": v.get("parent"), "steps": [as_written(s) for s in v.get("steps") or []]}
            if spec["from"] is None:
                spec.pop("from")
            if (f.bench or {}).get("backends"):
                spec["backends"] = f.bench["backends"]
            key = json.dumps(spec, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            out.append({"name": _name(d["variant"], f.kind, variants, out), "for": d["variant"],
                        "finding": str(f), "kind": f.kind, "spec": spec})
    return out


def _name(variant: str, kind: str, variants: dict, taken: list[dict]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "-", f"{variant}-fix-{kind}")
    names = set(variants) | {s["name"] for s in taken}
    name, i = base, 2
    while name in names:
        name, i = f"{base}-{i}", i + 1
    return name


def write_suggested(run_dir: Path) -> tuple[Path, list[dict]]:
    """Write RUN_DIR/suggested.yaml; returns its path and the suggestions (none: the file says so)."""
    run_dir = Path(run_dir)
    from reporting.analysis import read_results

    results = read_results(run_dir)
    recipe = results.get("recipe") or {}
    if not recipe.get("path"):
        raise RecipeError(f"RUN_DIR {str(run_dir)!r}: made without a recipe file (`workbench bench`), so there is "
                          "no recipe to extend")
    src = Path(recipe["path"])
    data = yaml.safe_load(src.read_text()) if src.is_file() else recipe.get("parsed")
    if not isinstance(data, dict):
        raise RecipeError(f"RUN_DIR {str(run_dir)!r}: its recipe {str(src)!r} is gone and results.json holds none")
    found = suggestions(results)
    data = dict(data)
    data["variants"] = dict(data.get("variants") or {})
    for s in found:
        data["variants"][s["name"]] = {**s["spec"], "suggested": {"for": s["for"], "finding": s["finding"],
                                                                  "kind": s["kind"]}}
    # Relative paths keep meaning what they meant beside the original recipe.
    base = data.get("base_dir")
    folder = src.resolve().parent
    data["base_dir"] = str((folder / base).resolve() if base and not Path(base).is_absolute() else base or folder)
    head = (f"# Written by `workbench suggest {run_dir}` from the report of {results['recipe'].get('name')}: the "
            f"recipe of that run plus {len(found)} suggested variant(s), each answering a finding of its "
            "\"why isn't it faster?\".\n# Run it (`workbench run` on this file); its report says what each "
            "suggestion gave against the variant it was suggested for.\n")
    body = yaml.safe_dump(data, sort_keys=False, width=110, allow_unicode=True)
    out = run_dir / FILE
    atomic.write_text(out, head + body)
    return out, found
