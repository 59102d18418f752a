"""The numbers behind the report, computed from results.json alone: the primary metric, cell scores,
speedups against the baseline and the recommendation. bench.report renders them; bench.plots draws them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from bench.protocol import ratio_ci

MB = 1024 * 1024


def primary_metric(results: dict) -> Optional[str]:
    return results.get("task", {}).get("primary")


def cell_score(cell: dict, variants: dict, metric: Optional[str]) -> Optional[float]:
    """The cell's own accuracy (from the backend's outputs) when measured, else its variant's."""
    if not metric:
        return None
    acc = cell.get("accuracy") or variants.get(cell["variant"], {}).get("accuracy") or {}
    return acc.get(metric)


def speedups(results: dict) -> dict[int, tuple[float, float, float]]:
    """Speedup of each measured cell against the baseline variant on the same backend and batch:
    cell index -> (ratio of medians, 95% CI low, high)."""
    base_name = results["recipe"]["parsed"]["report"]["baseline"]
    cells = results["cells"]
    base = {(c["backend"], c["batch_size"]): c for c in cells if c["variant"] == base_name and c.get("samples_ms")}
    out = {}
    for i, c in enumerate(cells):
        b = base.get((c["backend"], c["batch_size"]))
        if b is not None and c.get("samples_ms"):
            out[i] = ratio_ci(b["samples_ms"], c["samples_ms"])
    return out


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
    if cons.get("max_accuracy_drop") is not None:
        rules.append(f"{metric} drop <= {cons['max_accuracy_drop']}")
    if cons.get("max_latency_ms") is not None:
        rules.append(f"p50 <= {cons['max_latency_ms']} ms")
    if cons.get("max_memory_mb") is not None:
        rules.append(f"peak RSS increase <= {cons['max_memory_mb']} MB")
    candidates, rejected = [], 0
    for i, c in enumerate(results["cells"]):
        if c["status"] not in ("ok", "unstable") or c["batch_size"] != batch:
            continue
        if cons.get("backend") and c["backend"] != cons["backend"]:
            continue
        score = cell_score(c, variants, metric)
        ok = True
        if cons.get("max_accuracy_drop") is not None and base_score is not None:
            ok &= score is not None and base_score - score <= cons["max_accuracy_drop"] + 1e-12
        if cons.get("max_latency_ms") is not None:
            ok &= c["latency_ms"]["p50"] <= cons["max_latency_ms"]
        if cons.get("max_memory_mb") is not None:
            ok &= c.get("memory", {}).get("peak_rss_delta", 0) / MB <= cons["max_memory_mb"]
        if ok:
            candidates.append(Candidate(i, c, score))
        else:
            rejected += 1
    # Stable cells first: an unstable cell only wins when nothing stable meets the constraints.
    candidates.sort(key=lambda cand: (cand.unstable, cand.p50))
    return Recommendation(metric=metric, base_score=base_score, batch_size=batch, backend=cons.get("backend") or None,
                          rules=rules, rejected=rejected, winner=candidates[0] if candidates else None,
                          runner_up=candidates[1] if len(candidates) > 1 else None)
