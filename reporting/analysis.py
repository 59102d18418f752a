"""The numbers behind the report, computed from results.json alone: the primary metric, cell scores,
speedups against the baseline and the recommendation. reporting.report renders them; reporting.plots draws them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from bench.protocol import paired_ratio_ci, round_samples

MB = 1024 * 1024


def primary_metric(results: dict) -> Optional[str]:
    return results.get("task", {}).get("primary")


def lower_is_better(results: dict) -> bool:
    """True when the primary metric improves downwards (perplexity)."""
    return bool(results.get("task", {}).get("lower_is_better"))


def metric_drop(results: dict, base: float, score: float) -> float:
    """How much worse `score` is than `base` in the primary metric (negative: better)."""
    return score - base if lower_is_better(results) else base - score


def cell_score(cell: dict, variants: dict, metric: Optional[str]) -> Optional[float]:
    """The cell's own accuracy (from the backend's outputs) when measured, else its variant's."""
    if not metric:
        return None
    acc = cell.get("accuracy") or variants.get(cell["variant"], {}).get("accuracy") or {}
    return acc.get(metric)


def measured(cell: dict) -> bool:
    return bool(cell.get("repeats") or cell.get("samples_ms"))


def is_reference(variants: dict, name: str) -> bool:
    """A variant marked `reference: true` (an engine's own defaults): measured and shown, never recommended.
    `variants` maps name -> results.json variant record."""
    return bool(variants.get(name, {}).get("reference"))


def labelled(variants: dict, name: str) -> str:
    """A variant's name as the report's tables show it: a reference says it is one."""
    return f"{name} (reference)" if is_reference(variants, name) else name


def speedups(results: dict) -> dict[int, tuple[float, float, float]]:
    """Speedup of each measured cell against the baseline variant on the same backend and batch,
    paired by round (bench.protocol.paired_ratio_ci): cell index -> (ratio, 95% CI low, high)."""
    base_name = results["recipe"]["parsed"]["report"]["baseline"]
    cells = results["cells"]
    base = {(c["backend"], c["batch_size"]): c for c in cells if c["variant"] == base_name and measured(c)}
    out = {}
    for i, c in enumerate(cells):
        b = base.get((c["backend"], c["batch_size"]))
        if b is not None and measured(c):
            ratio = paired_ratio_ci(b, c)
            if ratio is not None:
                out[i] = ratio
    return out


def reference_speedups(results: dict) -> tuple[Optional[str], dict[int, tuple[float, float, float]]]:
    """Every measured cell against one reference: the baseline on the first backend of the recipe
    that measured it, at the same batch size, so gains across backends show (PyTorch to ONNX
    Runtime int8, say). Paired by round, as the same-backend speedups are. Returns (reference
    backend, cell index -> (ratio, 95% CI low, high))."""
    base_name = results["recipe"]["parsed"]["report"]["baseline"]
    cells = results["cells"]
    backends = (results["recipe"]["parsed"].get("bench") or {}).get("backends") or []
    for backend in backends:
        ref = {c["batch_size"]: c for c in cells
               if c["variant"] == base_name and c["backend"] == backend and measured(c)}
        if ref:
            break
    else:
        return None, {}
    out = {}
    for i, c in enumerate(cells):
        r = ref.get(c["batch_size"])
        if r is not None and measured(c):
            ratio = paired_ratio_ci(r, c)
            if ratio is not None:
                out[i] = ratio
    return backend, out


def faster(a: dict, b: dict) -> Optional[tuple[float, float, float]]:
    """How much faster cell `a` is than cell `b` (> 1: faster), paired by round; for results
    measured in one round, None."""
    return paired_ratio_ci(b, a)


def significantly_faster(a: dict, b: dict) -> bool:
    """True when `a` beats `b` with the whole 95 % interval above 1; without rounds to pair, when
    their own intervals do not overlap."""
    r = faster(a, b)
    if r is not None:
        return r[1] > 1.0
    return a["latency_ms"]["ci95"][1] < b["latency_ms"]["ci95"][0]


@dataclass(frozen=True)
class Candidate:
    """A cell that meets every constraint; `cell_index` indexes results["cells"] (and speedups())."""
    cell_index: int
    cell: dict
    score: Optional[float]

    @property
    def variant(self) -> str:
        return self.cell["variant"]

    @property
    def backend(self) -> str:
        return self.cell["backend"]

    @property
    def p50(self) -> float:
        return self.cell["latency_ms"]["p50"]

    @property
    def unstable(self) -> bool:
        return self.cell["status"] != "ok"


@dataclass(frozen=True)
class Recommendation:
    """The constraints as applied (`batch_size`, `backend`: None for any) and described (`rules`), how many
    measured cells at that batch size failed them, and the fastest and second fastest cells that met them."""
    metric: Optional[str]
    base_score: Optional[float]
    batch_size: int
    backend: Optional[str]
    rules: list[str]
    rejected: int
    winner: Optional[Candidate]
    runner_up: Optional[Candidate]
    # Candidates the fastest one does not beat significantly, the fastest first (one entry: a clear
    # winner); with several, the winner is picked among them by `TIE_RULE`.
    tied: tuple = ()
    unjudged: tuple = ()  # why some cells could not be judged against a constraint (they fail it)
    stable_beaten: bool = False  # an unstable cell leads because it beats every stable one significantly
    # The winner against the fastest reference cell at each batch size (`vs_reference`); empty without references.
    vs_reference: tuple = ()
    # report.objective: "latency" (the lowest p50 wins) or "capacity" (the highest VALID server capacity wins;
    # `capacities` maps (variant, backend) to that scenario's server record, `scenario` is its label).
    objective: str = "latency"
    scenario: Optional[str] = None
    capacities: dict = field(default_factory=dict)

    def capacity(self, c: Optional["Candidate"]) -> Optional[float]:
        s = self.capacities.get((c.variant, c.backend)) if c is not None else None
        return (s or {}).get("max_qps")


TIE_RULE = "fewest compression steps, then smallest model file, then lowest p50"


def _steps(variants: dict, name: str) -> int:
    """Compression steps from the source model to this variant, counted along its lineage."""
    count, seen = 0, set()
    while name in variants and name not in seen:
        seen.add(name)
        count += len(variants[name].get("steps") or [])
        name = variants[name].get("parent")
    return count


DEFAULT_DROP = 0.01  # without report.constraints on accuracy: at most 1 % of the baseline's score lost


def recommend(results: dict) -> Recommendation:
    """The fastest cell (p50) that meets every constraint of `report.constraints`; the runner-up too."""
    spec = results["recipe"]["parsed"]
    cons = spec["report"]["constraints"]
    metric = primary_metric(results)
    variants = {v["name"]: v for v in results["variants"]}
    base = variants.get(spec["report"]["baseline"], {})
    base_score = (base.get("accuracy") or {}).get(metric) if metric else None
    batch = cons.get("batch_size") or spec["bench"]["batch_sizes"][0]
    rules = [f"batch size {batch}"]
    if cons.get("backend"):
        rules.append(f"backend {cons['backend']}")
    # No accuracy constraint set: the fastest cell would win whatever it scored (a pruned model at chance was
    # once told to ship). The default guard is a drop of at most DEFAULT_DROP of the baseline's own score.
    cons = dict(cons)
    worse = f"{metric} {'increase' if lower_is_better(results) else 'drop'} <="
    if (metric and metric != "kl" and base_score and cons.get("max_accuracy_drop") is None
            and cons.get("max_perplexity_increase") is None):
        cons["max_accuracy_drop"] = round(DEFAULT_DROP * abs(base_score), 6)
        rules.append(f"{worse} {cons['max_accuracy_drop']:.4g} (the default, {DEFAULT_DROP:.0%} of the baseline's: "
                     "report.constraints.max_accuracy_drop sets your own)")
    elif cons.get("max_accuracy_drop") is not None:
        rules.append(f"{worse} {cons['max_accuracy_drop']}")
    base_ppl = (base.get("accuracy") or {}).get("perplexity")
    if cons.get("max_perplexity_increase") is not None:
        rules.append(f"perplexity <= baseline x {1 + cons['max_perplexity_increase']:.4g}")
    if cons.get("max_latency_ms") is not None:
        rules.append(f"p50 <= {cons['max_latency_ms']} ms")
    if cons.get("max_memory_mb") is not None:
        rules.append(f"peak RSS increase <= {cons['max_memory_mb']} MB")
    if any(is_reference(variants, n) for n in variants):
        rules.append("not a reference variant")
    candidates, rejected, unjudged = [], 0, []
    for i, c in enumerate(results["cells"]):
        if c["status"] not in ("ok", "unstable") or c["batch_size"] != batch:
            continue
        if cons.get("backend") and c["backend"] != cons["backend"]:
            continue
        if is_reference(variants, c["variant"]):  # what the engine gives without us: compared with, never shipped
            continue
        score = cell_score(c, variants, metric)
        ok = True
        # A constraint that cannot be judged fails the cell, with the reason: it never passes silently.
        if cons.get("max_accuracy_drop") is not None:
            if base_score is None or score is None:
                ok = False
                unjudged.append(f"{c['variant']} / {c['backend']}: no {metric or 'accuracy'} score "
                                f"{'for the baseline' if base_score is None else 'for this cell'}")
            else:
                ok &= metric_drop(results, base_score, score) <= cons["max_accuracy_drop"] + 1e-12
        if cons.get("max_perplexity_increase") is not None:
            ppl = cell_score(c, variants, "perplexity")
            if base_ppl is None or ppl is None:
                ok = False
                unjudged.append(f"{c['variant']} / {c['backend']}: no perplexity "
                                f"{'for the baseline' if base_ppl is None else 'for this cell'}")
            else:
                ok &= ppl <= base_ppl * (1 + cons["max_perplexity_increase"]) + 1e-12
        if cons.get("max_latency_ms") is not None:
            ok &= c["latency_ms"]["p50"] <= cons["max_latency_ms"]
        if cons.get("max_memory_mb") is not None:
            mem = c.get("memory", {}).get("peak_rss_delta")
            if mem is None:
                ok = False
                unjudged.append(f"{c['variant']} / {c['backend']}: no memory figure")
            else:
                ok &= mem / MB <= cons["max_memory_mb"]
        if ok:
            candidates.append(Candidate(i, c, score))
        else:
            rejected += 1
    if spec["report"].get("objective") == "capacity":
        return _by_capacity(results, candidates, rejected, unjudged, metric=metric, base_score=base_score,
                            batch_size=batch, backend=cons.get("backend") or None, rules=rules)
    # Stable cells first: an unstable cell wins only when nothing stable meets the constraints, or when it
    # beats the fastest stable cell significantly, paired round by round (a lead wider than its noise: a
    # tiny model's calls jitter within a process, and a user would still see it run faster).
    candidates.sort(key=lambda cand: (cand.unstable, cand.p50))
    stable = next((c for c in candidates if not c.unstable), None)
    if stable is not None:
        ahead = [c for c in candidates if c.unstable and significantly_faster(c.cell, stable.cell)]
        candidates = sorted(ahead, key=lambda cand: cand.p50) + [c for c in candidates if c not in ahead]
    stable_beaten = stable is not None and bool(candidates) and candidates[0].unstable
    if not candidates:
        return Recommendation(metric=metric, base_score=base_score, batch_size=batch,
                              backend=cons.get("backend") or None, rules=rules, rejected=rejected, winner=None,
                              runner_up=None, unjudged=tuple(unjudged))
    fastest = candidates[0]
    tied = [fastest] + [c for c in candidates[1:]
                        if c.unstable == fastest.unstable and not significantly_faster(fastest.cell, c.cell)]
    sizes = {v["name"]: v.get("size_bytes") or 0 for v in results["variants"]}
    winner = (fastest if len(tied) == 1 else
              min(tied, key=lambda c: (_steps(variants, c.variant), sizes.get(c.variant, 0), c.p50)))
    runner_up = next((c for c in candidates if c is not winner), None)
    return Recommendation(metric=metric, base_score=base_score, batch_size=batch, backend=cons.get("backend") or None,
                          rules=rules, rejected=rejected, winner=winner, runner_up=runner_up, tied=tuple(tied),
                          unjudged=tuple(unjudged), stable_beaten=stable_beaten,
                          vs_reference=tuple(vs_reference(results, winner)))


def server_capacities(results: dict, label: Optional[str] = None) -> tuple[Optional[str], dict]:
    """(the server scenario's label, {(variant, backend): its server record}) for `label`, default the first
    server scenario measured."""
    servers = [c for c in results.get("load") or [] if (c.get("load") or {}).get("server")]
    label = label or next((c["scenario"] for c in servers), None)
    return label, {(c["variant"], c["backend"]): c["load"]["server"] for c in servers if c["scenario"] == label}


def bound_text(server: dict) -> str:
    """A server record's bound in words: its latency percentile's, or a generation's two token bounds."""
    p = f"p{server.get('percentile', 99):g}"
    if server.get("ttft_bound_ms") is not None:
        return f"TTFT {p} <= {server['ttft_bound_ms']:g} ms and TPOT {p} <= {server['tpot_bound_ms']:g} ms"
    bound = server.get("latency_bound_ms")
    return f"{p} <= {bound:g} ms" if bound is not None else f"{p} under its bound"


def _by_capacity(results: dict, candidates: list, rejected: int, unjudged: list, **rec) -> Recommendation:
    """report.objective capacity: among the cells that meet the constraints, the variant and backend whose server
    scenario took the most QPS with LoadGen's VALID verdict; one without a valid capacity is not recommended."""
    label, caps = server_capacities(results, results["recipe"]["parsed"]["report"].get("capacity_scenario"))
    bound = bound_text(next(iter(caps.values()), {}))
    rec["rules"] = rec["rules"] + [f"ranked by capacity in scenario {label} (the highest QPS with {bound}, "
                                   "VALID by LoadGen)"]
    ranked = []
    for c in candidates:
        q = (caps.get((c.variant, c.backend)) or {}).get("max_qps")
        if q is None:
            rejected += 1
            unjudged.append(f"{c.variant} / {c.backend}: " + ("no VALID capacity" if (c.variant, c.backend) in caps
                                                                else "not served") + f" in scenario {label}")
        else:
            ranked.append((q, c))
    ranked.sort(key=lambda qc: (-qc[0], qc[1].p50))
    winner = ranked[0][1] if ranked else None
    return Recommendation(**rec, rejected=rejected, winner=winner, runner_up=ranked[1][1] if len(ranked) > 1 else None,
                          tied=(winner,) if winner else (), unjudged=tuple(unjudged), objective="capacity",
                          scenario=label, capacities=caps,
                          vs_reference=tuple(vs_reference(results, winner)) if winner else ())


def vs_reference(results: dict, winner: Candidate) -> list[dict]:
    """The winner's variant and backend against the best reference at each batch size a reference was measured
    at: the reference cell (any backend) with the lowest p50 there. The speedup (> 1: the winner is faster) is
    paired by round, as every speedup of the report; None, with a `note`, when it cannot be had."""
    variants = {v["name"]: v for v in results["variants"]}
    cells = [c for c in results["cells"] if c["status"] in ("ok", "unstable") and c.get("latency_ms")]
    refs = [c for c in cells if is_reference(variants, c["variant"])]
    out = []
    for batch in sorted({c["batch_size"] for c in refs}):
        best = min((c for c in refs if c["batch_size"] == batch), key=lambda c: c["latency_ms"]["p50"])
        entry = {"batch_size": batch, "reference": {"variant": best["variant"], "backend": best["backend"]},
                 "speedup": None, "ci": None, "paired_rounds": 0}
        mine = next((c for c in cells if c["batch_size"] == batch
                     and (c["variant"], c["backend"]) == (winner.variant, winner.backend)), None)
        if mine is None:
            entry["note"] = f"{winner.variant} on {winner.backend} has no measured cell at batch {batch}"
        else:
            r = faster(mine, best)
            entry["paired_rounds"] = len(set(round_samples(mine)) & set(round_samples(best)))
            if r is None:
                entry["note"] = "fewer than two rounds measured both cells"
            else:
                entry.update(speedup=r[0], ci=[r[1], r[2]])
        out.append(entry)
    return out


def recommendation_record(results: dict) -> Optional[dict]:
    """The recommendation as results.json keeps it (None: no cell met the constraints); `speedup` is against the
    baseline on the same backend and batch, [ratio, 95% CI low, high], paired by round."""
    rec = recommend(results)
    w = rec.winner
    if w is None:
        return None
    sp = speedups(results).get(w.cell_index)
    return {"variant": w.variant, "backend": w.backend, "batch_size": rec.batch_size, "p50_ms": w.p50,
            "speedup": list(sp) if sp else None, "rules": rec.rules, "objective": rec.objective,
            **({"scenario": rec.scenario, "max_qps": rec.capacity(w)} if rec.objective == "capacity" else {}),
            **({"vs_reference": list(rec.vs_reference)} if rec.vs_reference else {})}


def quietness(results: dict) -> Optional[dict]:
    """How busy the rest of the machine was while cells were measured (bench.rounds' readings)."""
    readings = [r["noise"] for c in results["cells"] for r in c.get("repeats") or [] if r.get("noise")]
    if not readings:
        return None
    other = [r["other_cpu_cores"] for r in readings]
    return {"processes": len(readings), "other_cpu_cores_median": float(np.median(other)),
            "other_cpu_cores_max": float(max(other)), "steal_cores_max": float(max(r["steal_cores"] for r in readings)),
            "remeasured": sum(r.get("attempts", 1) - 1 for c in results["cells"] for r in c.get("repeats") or []),
            "busy_kept": sum(bool(r.get("busy")) for r in readings)}


def fmt_num(x, nd=3) -> str:
    """A number for a table: `nd` decimals; '–' for none; a value too small to show there (a KL of 4e-06
    against 9e-04 is a difference) with two significant digits instead of 0.000."""
    import math

    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        if 0 < abs(x) < 10 ** -nd:
            return f"{x:.2g}"
        return f"{x:.{nd}f}" if abs(x) < 1e5 else f"{x:.3g}"
    return str(x)


def read_results(run_dir, what: str = "RUN_DIR") -> dict:
    """A finished run's results.json, or a RecipeError that says what the folder is instead: not a run, a run
    still going, interrupted or failed (from its status.json, with what finishes it), or a damaged file."""
    import json
    from pathlib import Path

    from core.errors import RecipeError

    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.is_file():
        status = run_dir / "status.json"
        state = {}
        if status.is_file():
            try:
                state = json.loads(status.read_text())
            except (OSError, ValueError):
                state = {}
        said = {"running": "is still running (or was killed without a word)",
                "interrupted": f"was interrupted: `workbench run --resume {run_dir}` finishes it",
                "failed": f"failed ({state.get('reason') or 'see its run.log'})"}.get(state.get("state"))
        raise RecipeError(f"{what} {str(run_dir)!r}: no results.json here: " + (
            f"the run {said}" if said else "not a finished run folder (reports/<recipe>/<run id>/)"))
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RecipeError(f"{path}: not readable as JSON ({e}); a run writes it whole, so it was changed "
                          "since: run the recipe again") from None
    if not isinstance(results, dict) or not isinstance(results.get("cells"), list) or "variants" not in results:
        raise RecipeError(f"{path}: not a workbench results file (no 'cells' and 'variants')")
    return results
