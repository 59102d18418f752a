"""`workbench compare RUN_A RUN_B`: for the cells the two runs share, the change in p50 with a 95 %
bootstrap interval and a verdict, the change in accuracy, a table and a plot.

Two runs of the same cell in different processes differ by more than the within-run interval
says (CPU frequency, cache state, neighbours), so a change counts as significant only when its
whole interval lies beyond the noise margin (`--margin`, default 5 %)."""
from __future__ import annotations

import json
from pathlib import Path

from reporting.analysis import measured, read_results
from bench.protocol import unpaired_ratio_ci
from reporting.report import md_table
from core import atomic
from core.errors import RecipeError
from reporting.figures import save, subplots


def _key(c: dict) -> tuple:
    return (c["variant"], c["backend"], c["batch_size"], (c.get("shape") or {}).get("seq_len"))


def _load(run_dir: Path) -> dict:
    return read_results(run_dir, "RUN")


def compare(a: dict, b: dict, margin: float = 0.05) -> list[dict]:
    """One row per cell measured in both runs: ratio = p50_B / p50_A (> 1: B is slower)."""
    metric = (b.get("task") or {}).get("primary")
    cells_a = {_key(c): c for c in a["cells"] if measured(c)}
    rows = []
    for c in b["cells"]:
        old = cells_a.get(_key(c))
        if old is None or not measured(c):
            continue
        # The two runs were not interleaved, so nothing pairs: the interval resamples each run's
        # processes, and so carries the between-process spread of both.
        ratio, r_lo, r_hi = unpaired_ratio_ci(old, c)
        if r_lo > 1 + margin:
            verdict = "slower"
        elif r_hi < 1 - margin:
            verdict = "faster"
        else:
            verdict = "no significant difference"
        acc_a = (old.get("accuracy") or {}).get(metric) if metric else None
        acc_b = (c.get("accuracy") or {}).get(metric) if metric else None
        rows.append({"variant": c["variant"], "backend": c["backend"], "batch_size": c["batch_size"],
                     "p50_a": old["latency_ms"]["p50"], "p50_b": c["latency_ms"]["p50"],
                     "change": ratio - 1, "change_ci95": [r_lo - 1, r_hi - 1], "verdict": verdict,
                     # Not significant, yet the interval reaches past the band too: a change of that size
                     # cannot be ruled out either, and the table says so rather than imply "unchanged".
                     "cannot_tell": (verdict == "no significant difference"
                                     and (r_lo < 1 - margin or r_hi > 1 + margin)),
                     "unstable": "unstable" in (old["status"], c["status"]),
                     "accuracy_change": (acc_b - acc_a) if acc_a is not None and acc_b is not None else None})
    return rows


def verdicts(a: dict, b: dict, rows: list[dict]) -> dict:
    """What a design review asks of a second run: is the recommendation the same, and did the
    speedups hold? Speedups are each run's own (a cell against its baseline, paired by round), so a
    machine that is slower on the whole, which moves every p50 alike, does not move them."""
    import numpy as np

    from reporting.analysis import recommend, speedups

    def shipped(r):
        rec = recommend(r)
        return None if rec.winner is None else {"variant": rec.winner.variant, "backend": rec.winner.backend,
                                                "batch_size": rec.batch_size, "p50": rec.winner.p50}

    ship_a, ship_b = shipped(a), shipped(b)
    same = bool(ship_a and ship_b and (ship_a["variant"], ship_a["backend"]) == (ship_b["variant"], ship_b["backend"]))
    sp_a = {_key(a["cells"][i]): v for i, v in speedups(a).items()}
    held = []
    for i, s_b in speedups(b).items():
        s_a = sp_a.get(_key(b["cells"][i]))
        if s_a is None or b["cells"][i]["variant"] == (b["recipe"]["parsed"].get("report") or {}).get("baseline"):
            continue
        overlap = s_a[1] <= s_b[2] and s_b[1] <= s_a[2]
        held.append({"variant": b["cells"][i]["variant"], "backend": b["cells"][i]["backend"],
                     "batch_size": b["cells"][i]["batch_size"], "speedup_a": s_a, "speedup_b": s_b,
                     "intervals_overlap": overlap})
    drift = float(np.median([r["change"] for r in rows])) if rows else None
    caps = capacities(a, b)
    serving = serving_agreement(a, b)
    return {"recommendation_a": ship_a, "recommendation_b": ship_b, "same_recommendation": same,
            "differences": setup_differences(a, b), "median_change": drift, "speedups": held,
            "speedups_agreeing": sum(h["intervals_overlap"] for h in held),
            **({"capacities": caps, "capacities_agreeing": sum(c["intervals_overlap"] for c in caps)} if caps else {}),
            **({"serving": serving, "serving_agreeing": sum(v["agree"] for v in serving)} if serving else {})}


def setup_differences(a: dict, b: dict) -> list[str]:
    """What differs between the two runs besides the machine's mood: the recipe, its bench settings, the threads,
    a --quick run, the CPU, the library versions. A p50 that moved with one of these moved for it."""
    def get(r, *path):
        for key in path:
            r = (r or {}).get(key) if isinstance(r, dict) else None
        return r

    out = []
    for label, path in (("recipe", ("recipe", "name")), ("recipe file (sha256)", ("recipe", "sha256")),
                        ("threads", ("environment", "threads_requested")), ("--quick", ("quick",)),
                        ("CPU", ("environment", "cpu")), ("cores available", ("environment", "cores_available")),
                        ("torch", ("environment", "libraries", "torch")),
                        ("onnxruntime", ("environment", "libraries", "onnxruntime")),
                        ("openvino", ("environment", "libraries", "openvino"))):
        x, y = get(a, *path), get(b, *path)
        if x != y and not (x is None and y is None):
            short = (lambda v: str(v)[:12]) if "sha256" in label else str
            out.append(f"{label}: {short(x)} -> {short(y)}")
    bench_a, bench_b = get(a, "recipe", "parsed", "bench") or {}, get(b, "recipe", "parsed", "bench") or {}
    for key in sorted(set(bench_a) | set(bench_b)):
        if key not in ("backends", "options") and bench_a.get(key) != bench_b.get(key):
            out.append(f"bench.{key}: {json.dumps(bench_a.get(key))} -> {json.dumps(bench_b.get(key))}")
    return out


SERVING_KINDS = {"batching": "dynamic batching over one per call", "vs_baseline": "best capacity over the baseline's",
                 "vs_reference": "best capacity over the engines' defaults"}


def serving_agreement(a: dict, b: dict) -> list[dict]:
    """The report's serving verdicts (reporting.load_report.serving_ratios) of both runs, matched: a batching
    gain by its cell, a best-against verdict by its bound. They agree when both runs name the same two
    cells and the ranges of their rounds' ratios overlap (a ratio of one round is its own range)."""
    from reporting.load_report import serving_ratios

    def key(r):
        return (r["kind"], r["bound"]) + ((r["top"]["label"],) if r["kind"] == "batching" else ())

    def span(r):
        rounds = r["by_round"] or [r["ratio"]]
        return min(rounds), max(rounds)

    ra = {key(r): r for r in serving_ratios(a)}
    out = []
    for r_b in serving_ratios(b):
        r_a = ra.get(key(r_b))
        if r_a is None:
            continue
        same_cells = (r_a["top"]["label"], r_a["under"]["label"]) == (r_b["top"]["label"], r_b["under"]["label"])
        (a0, a1), (b0, b1) = span(r_a), span(r_b)
        out.append({"kind": r_b["kind"], "bound": r_b["bound"], "a": r_a, "b": r_b, "same_cells": same_cells,
                    "agree": same_cells and a0 <= b1 and b0 <= a1})
    return out


def capacities(a: dict, b: dict) -> list[dict]:
    """Server capacities of the load cells both runs measured: each run's median over rounds with the range
    of its rounds' own capacities as its interval; they agree when the intervals overlap."""
    def by_key(r):
        out = {}
        for c in r.get("load") or []:
            s = (c.get("load") or {}).get("server")
            found = [q for q in (s or {}).get("max_qps_by_round", []) if q is not None]
            if s and found:
                out[(c["variant"], c["backend"], c["scenario"])] = (s["max_qps"], min(found), max(found))
        return out

    ka, kb = by_key(a), by_key(b)
    return [{"variant": k[0], "backend": k[1], "scenario": k[2], "capacity_a": ka[k], "capacity_b": kb[k],
             "intervals_overlap": ka[k][1] <= kb[k][2] and kb[k][1] <= ka[k][2]} for k in ka if k in kb]


def _verdict_text(v: dict) -> str:
    def ship(x):
        return "nothing" if x is None else f"`{x['variant']}` on `{x['backend']}` (batch {x['batch_size']})"

    lines = [f"**Recommendation: A ships {ship(v['recommendation_a'])}, B ships {ship(v['recommendation_b'])}: "
             + ("the same verdict.**" if v["same_recommendation"] else "a different verdict.**")]
    if v.get("differences"):
        lines.append("The runs differ in: " + "; ".join(v["differences"]) + ". Differences in their numbers may come "
                     "from these, not from the machine.")
    if v["median_change"] is not None:
        moved = ("the settings above differ: a change may be theirs" if v.get("differences") else
                 "the whole machine moved: compare the speedups, which each run measures against its own baseline")
        lines.append(f"Median p50 change over all shared cells: {v['median_change']:+.1%}"
                     + (f" ({moved})." if abs(v["median_change"]) > 0.05 else "."))
    if v["speedups"]:
        lines.append(f"Speedups against each run's own baseline: {v['speedups_agreeing']} of {len(v['speedups'])} "
                     "agree (95% intervals overlap).")
        lines.append(md_table(["variant", "backend", "batch", "speedup A [95% CI]", "speedup B [95% CI]", "agree"],
                              [[h["variant"], h["backend"], str(h["batch_size"]),
                                "{:.2f}x [{:.2f}, {:.2f}]".format(*h["speedup_a"]),
                                "{:.2f}x [{:.2f}, {:.2f}]".format(*h["speedup_b"]),
                                "yes" if h["intervals_overlap"] else "no"] for h in v["speedups"]]))
    if v.get("capacities"):
        lines.append(f"Server capacities (LoadGen, QPS at the bound): {v['capacities_agreeing']} of "
                     f"{len(v['capacities'])} agree (the ranges of their rounds overlap).")
        lines.append(md_table(["variant", "backend", "scenario", "capacity A [rounds]", "capacity B [rounds]", "agree"],
                              [[c["variant"], c["backend"], c["scenario"],
                                "{:.1f} [{:.1f}, {:.1f}]".format(*c["capacity_a"]),
                                "{:.1f} [{:.1f}, {:.1f}]".format(*c["capacity_b"]),
                                "yes" if c["intervals_overlap"] else "no"] for c in v["capacities"]]))
    if v.get("serving"):
        lines.append(f"Serving verdicts (capacity ratios, each run's own, round by round): {v['serving_agreeing']} of "
                     f"{len(v['serving'])} agree (the same two cells, and the ranges of their rounds' ratios overlap).")

        def said(r):
            rounds = ", ".join(f"{x:.2f}" for x in r["by_round"])
            return (f"{r['ratio']:.2f}x [{rounds}]: {r['top']['label']} over {r['under']['label']}")

        lines.append(md_table(["verdict", "at", "A [rounds]", "B [rounds]", "agree"],
                              [[SERVING_KINDS[s["kind"]], s["bound"], said(s["a"]), said(s["b"]),
                                "yes" if s["agree"] else ("no" if s["same_cells"] else "no: other cells")]
                               for s in v["serving"]]))
    return "\n\n".join(lines)


def plot(rows: list[dict], path: Path, margin: float) -> Path:
    labels = [f"{r['variant']}\n{r['backend']} b{r['batch_size']}" for r in rows]
    y = [100 * r["change"] for r in rows]
    err = [[100 * (r["change"] - r["change_ci95"][0]) for r in rows],
           [100 * (r["change_ci95"][1] - r["change"]) for r in rows]]
    colors = {"slower": "tab:red", "faster": "tab:green", "no significant difference": "tab:gray"}
    fig, ax = subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
    ax.bar(range(len(rows)), y, yerr=err, capsize=3, color=[colors[r["verdict"]] for r in rows])
    ax.axhspan(-100 * margin, 100 * margin, color="gray", alpha=0.15, label=f"noise margin ±{margin:.0%}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("p50 change, B vs A (%), 95% CI")
    ax.set_title("Latency change per cell (red: slower, green: faster, gray: no significant difference)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def parse_percent(text: str) -> float:
    t = str(text).strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise RecipeError(f"{text!r} is not a percentage; accepted: e.g. 5% or 0.05") from None


def _compared(run_a, run_b, margin) -> tuple[dict, dict, dict]:
    a, b = _load(Path(run_a)), _load(Path(run_b))
    margin = parse_percent(margin)
    rows = compare(a, b, margin)
    if not rows:
        raise RecipeError(f"{run_a} and {run_b} share no measured cell (variant, backend, batch, shape)")
    return a, b, {"run_a": str(run_a), "run_b": str(run_b), "margin": margin, "verdict": verdicts(a, b, rows),
                  "cells": rows}


def compare_runs(run_a, run_b, margin=0.05) -> dict:
    """What `workbench compare RUN_A RUN_B` prints, as data (the document it writes as compare.json):
    `run_a`, `run_b`, `margin` (a fraction; "5%" is read too), `verdict` (see `verdicts`: each run's
    recommendation, `same_recommendation`, `median_change` over shared cells, the speedups and how many
    agree) and `cells` (see `compare`: per shared cell the p50 change with its 95% CI and a verdict).
    Writes nothing; RecipeError when a folder holds no results.json or the runs share no measured cell."""
    return _compared(run_a, run_b, margin)[2]


def run_compare(args) -> int:
    a, b, data = _compared(args.run_a, args.run_b, args.margin)
    margin, rows, verdict = data["margin"], data["cells"], data["verdict"]
    out = Path(args.out) if args.out else Path(args.run_b) / f"compare-vs-{Path(args.run_a).name}"
    out.mkdir(parents=True, exist_ok=True)
    head = ["variant", "backend", "batch", "p50 A ms", "p50 B ms", "change [95% CI]", "verdict", "accuracy change"]
    table = [[r["variant"], r["backend"], str(r["batch_size"]), f"{r['p50_a']:.3f}", f"{r['p50_b']:.3f}",
              f"{r['change']:+.1%} [{r['change_ci95'][0]:+.1%}, {r['change_ci95'][1]:+.1%}]",
              r["verdict"] + (" (unstable)" if r["unstable"] else "")
              + (f"; the interval reaches past ±{margin:.0%}, so a change that size is not ruled out"
                 if r.get("cannot_tell") else ""),
              f"{r['accuracy_change']:+.4f}" if r["accuracy_change"] is not None else "–"] for r in rows]
    plot(rows, out / "compare.png", margin)
    text = (f"# Compare\n\nA: `{args.run_a}` ({a['started']})\n\nB: `{args.run_b}` ({b['started']})\n\n"
            f"{_verdict_text(verdict)}\n\n## Latency per cell\n\n"
            f"A change is significant only when its whole 95% interval lies beyond ±{margin:.0%}.\n\n"
            f"{md_table(head, table)}\n\n![latency change](compare.png)\n")
    atomic.write_text(out / "compare.md", text)
    atomic.write_json(out / "compare.json", data)
    print(md_table(head, table))
    print("\n" + _verdict_text(verdict))
    print(f"\ncompare: {out / 'compare.md'}")
    if args.fail_if_slower is not None:
        limit = parse_percent(args.fail_if_slower)
        slow = [r for r in rows if r["change_ci95"][0] > limit]
        if slow:
            print(f"FAIL: {len(slow)} cell(s) slower by more than {limit:.0%} (whole 95% interval above it)")
            return 3
    return 0
