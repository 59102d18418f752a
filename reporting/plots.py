"""Plots for the report, from results.json and reporting.analysis. Every plot has a title, axis labels with units
and a legend; latency axes turn logarithmic when values span more than an order of magnitude."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.patches import Rectangle
from matplotlib.transforms import ScaledTranslation

from reporting import load_report, lm_report
from reporting.analysis import Recommendation, cell_score, lower_is_better, primary_metric
from reporting.figures import save, subplots

MB = 1024 * 1024


def _legend_below(ax, *args, **kwargs):
    """A legend under the axis label, a fixed distance in inches whatever the figure's height, so it covers no bar."""
    below = ax.transAxes + ScaledTranslation(0, -0.55, ax.figure.dpi_scale_trans)
    return ax.legend(*args, fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, 0),
                     bbox_transform=below, **kwargs)


def _measured(results):
    return [c for c in results["cells"] if c.get("latency_ms")]


def latency_bars(results, out: Path) -> Path | None:
    cells = _measured(results)
    if not cells:
        return None
    variants = [v["name"] for v in results["variants"]]
    # bench.backends first, then those only some variants are measured on (a variant's own `backends`).
    backends = [b for b in dict.fromkeys(list(results["recipe"]["parsed"]["bench"]["backends"])
                                         + [c["backend"] for c in cells]) if any(c["backend"] == b for c in cells)]
    batches = sorted({c["batch_size"] for c in cells})
    # One panel per batch size, stacked: side by side they made a figure so wide that a page shrinks its text
    # out of reach.
    fig, axes = subplots(len(batches), 1, figsize=(min(14, max(7, 0.5 * len(variants) * len(backends) + 2)),
                                                       0.6 + 3.9 * len(batches)), squeeze=False)
    width = 0.8 / max(len(backends), 1)
    for ax, batch in zip(axes[:, 0], batches):
        p50s = [c["latency_ms"]["p50"] for c in cells if c["batch_size"] == batch]
        log = max(p50s) / max(min(p50s), 1e-9) > 10  # per panel: batch sizes differ by design
        for j, b in enumerate(backends):
            xs, ys, lo, hi, colors = [], [], [], [], []
            for i, v in enumerate(variants):
                c = next((c for c in cells if c["variant"] == v and c["backend"] == b and c["batch_size"] == batch), None)
                if c is None:
                    continue
                lat = c["latency_ms"]
                xs.append(i + (j - (len(backends) - 1) / 2) * width)
                ys.append(lat["p50"])
                lo.append(lat["p50"] - lat["ci95"][0])
                hi.append(lat["ci95"][1] - lat["p50"])
                colors.append(c["status"] == "unstable")
            bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=b)
            for bar, unstable in zip(bars, colors):
                if unstable:
                    bar.set_hatch("//")
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants, rotation=30, ha="right")
        ax.set_ylabel("p50 latency (ms), 95% CI")
        ax.set_title(f"batch size {batch}")
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    # Beside the first panel, where no bar can be under it (tight_layout gives both panels the same width).
    axes[0][0].legend(title="backend\n(hatched: unstable)", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("Latency by variant and backend (lower is better)")
    return save(fig, out / "latency_by_variant.png")


def pareto_points(results, rec: Recommendation) -> list[dict]:
    """The cells the accuracy-latency plot shows (its batch size is the recommendation's), numbered 1.. in order
    of p50: the plot prints the numbers and the report's table says which cell each is, so close or coinciding
    points never need their names printed over each other."""
    metric = primary_metric(results)
    if not metric:
        return []
    variants = {v["name"]: v for v in results["variants"]}
    pts = []
    for i, c in enumerate(results["cells"]):
        s = cell_score(c, variants, metric) if c.get("latency_ms") and c["batch_size"] == rec.batch_size else None
        if s is not None:
            pts.append({"cell_index": i, "variant": c["variant"], "backend": c["backend"],
                        "p50": c["latency_ms"]["p50"], "score": s})
    sign = -1 if lower_is_better(results) else 1  # perplexity: lower is better
    pts.sort(key=lambda p: (p["p50"], -sign * p["score"], p["variant"], p["backend"]))
    best = None  # Pareto frontier: no other point is both faster and more accurate
    for n, p in enumerate(pts, 1):
        p["n"] = n
        p["frontier"] = best is None or sign * p["score"] > best
        best = sign * p["score"] if best is None else max(best, sign * p["score"])
        p["recommended"] = rec.winner is not None and rec.winner.cell_index == p["cell_index"]
    return pts


def _number_labels(ax, pts: list[dict]) -> None:
    """Print each point's number beside it. Points within a label's size on screen share one label ("1,2"),
    and a label that would cover one already placed tries the other corners of its point."""
    fig = ax.figure
    fig.tight_layout()  # the layout _save applies, so screen distances measured here hold in the file
    renderer = fig.canvas.get_renderer()
    xy = ax.transData.transform([(p["p50"], p["score"]) for p in pts])
    groups: list[tuple[tuple[float, float], list[dict]]] = []
    for (px, py), p in zip(xy, pts):
        near = next((g for g in groups if abs(g[0][0] - px) < 12 and abs(g[0][1] - py) < 9), None)
        if near:
            near[1].append(p)
        else:
            groups.append(((px, py), [p]))
    placed = []
    for _, members in groups:
        text = ",".join(str(m["n"]) for m in members)
        far = 2 if any(m["recommended"] for m in members) else 1  # clear of the circle around the recommended point
        corners = [(5 * far, 4 * far), (5 * far, -11 * far), (-5 * far, 4 * far), (-5 * far, -11 * far),
                   (0, 10 * far), (0, -16 * far)]
        for dx, dy in corners:
            label = ax.annotate(text, (members[0]["p50"], members[0]["score"]), textcoords="offset points",
                                xytext=(dx, dy), fontsize=8, fontweight="bold", zorder=5,
                                ha="left" if dx > 0 else "right" if dx < 0 else "center")
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed) or (dx, dy) == corners[-1]:
                break  # the last corner stays even when taken: an overlap beats a missing number
            label.remove()
        placed.append(box)


def accuracy_vs_latency(results, out: Path, rec: Recommendation) -> Path | None:
    """At the batch size the recommendation was made for, points numbered as in `pareto_points`, with the
    recommended cell circled."""
    metric = primary_metric(results)
    pts = pareto_points(results, rec)
    if not pts:
        return None
    fig, ax = subplots(figsize=(8, 5))
    backends = sorted({p["backend"] for p in pts})
    markers = dict(zip(backends, "osD^vP*X"))
    for b in backends:
        sel = [p for p in pts if p["backend"] == b]
        ax.scatter([p["p50"] for p in sel], [p["score"] for p in sel], marker=markers.get(b, "o"), s=50, label=b,
                   zorder=3)
    front = [p for p in pts if p["frontier"]]
    ax.step([p["p50"] for p in front], [p["score"] for p in front], where="post", color="gray", ls="--",
            label="Pareto frontier", zorder=2)
    for p in pts:
        if p["recommended"]:
            ax.scatter([p["p50"]], [p["score"]], s=300, facecolors="none", edgecolors="red", linewidths=2,
                       label="recommended", zorder=4)
    xs = [p["p50"] for p in pts]
    if max(xs) / max(min(xs), 1e-9) > 10:
        ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency at batch {rec.batch_size} (ms)")
    ax.set_ylabel(metric)
    better = "down and left" if lower_is_better(results) else "up and left"
    ax.set_title(f"{metric} against latency ({better} is better; numbers: table below)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _number_labels(ax, pts)
    return save(fig, out / "accuracy_vs_latency.png")


def size_bars(results, out: Path) -> Path | None:
    vs = [v for v in results["variants"] if v.get("size_bytes")]
    if not vs:
        return None
    fig, ax = subplots(figsize=(max(6, 1.0 * len(vs) + 2), 4))
    ax.bar([v["name"] for v in vs], [v["size_bytes"] / MB for v in vs], color="tab:green")
    ax.set_ylabel("model file size (MiB)")
    ax.set_title("Model size on disk by variant")
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, out / "size_by_variant.png")


def _cell_label(c: dict) -> str:
    return f"{c['variant']}  {c['backend']} b{c['batch_size']}"


DEVICE_MEMORY = (("cuda_allocated_after_load", "model and inputs loaded (torch allocator)", "tab:green"),
                 ("cuda_max_allocated", "peak while running (torch allocator)", "tab:orange"),
                 ("nvml_process_device_bytes", "whole process on the GPU, CUDA context included (NVML)", "tab:gray"))


def memory_bars(results, out: Path) -> Path | None:
    """Host memory of every cell; a second panel with device memory when any cell ran on a GPU. Horizontal bars,
    a row per cell and the figure as tall as its rows, so cell labels stay readable however many cells ran."""
    cells = [c for c in _measured(results) if c.get("memory", {}).get("peak_rss_delta") is not None]
    if not cells:
        return None
    gpu = [c for c in cells if any(c["memory"].get(k) is not None for k, _, _ in DEVICE_MEMORY)]
    heights = [0.6 + 0.26 * len(cells)] + ([0.9 + 0.5 * len(gpu)] if gpu else [])
    fig, axes = subplots(len(heights), 1, figsize=(9, 0.9 + sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    ax = axes[0][0]
    y = np.arange(len(cells))
    ax.barh(y, [c["memory"]["peak_rss_delta"] / MB for c in cells], height=0.7, color="tab:purple")
    ax.set_yticks(y)
    ax.set_yticklabels([_cell_label(c) for c in cells], fontsize=8)
    ax.set_ylim(len(cells) - 0.5, -0.5)
    ax.set_xlabel("MiB")
    ax.set_title("Host: peak RSS increase of the cell's process", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if gpu:
        ax = axes[1][0]
        y = np.arange(len(gpu))
        h = 0.8 / len(DEVICE_MEMORY)
        for j, (key, label, color) in enumerate(DEVICE_MEMORY):
            values = [c["memory"].get(key) for c in gpu]
            if any(v is not None for v in values):
                ax.barh(y + (j - 1) * h, [(v or 0) / MB for v in values], height=h, color=color, label=label)
        ax.set_yticks(y)
        ax.set_yticklabels([_cell_label(c) for c in gpu], fontsize=8)
        ax.set_ylim(len(gpu) - 0.5, -0.5)
        ax.set_xlabel("MiB")
        ax.set_title("GPU memory (ONNX Runtime cells: NVML only)", fontsize=10)
        _legend_below(ax)
        ax.grid(axis="x", alpha=0.3)
    return save(fig, out / "memory_by_cell.png")


SPEED_COLORS = (("tab:green", "faster: whole 95% CI above 1.0x"), ("tab:red", "slower: whole 95% CI below 1.0x"),
                ("tab:gray", "no significant difference"))


def speedup_bars(results, out: Path, sp: dict) -> Path | None:
    """Speedup over the baseline on the same backend and batch, one group of horizontal bars per backend, a bar
    per variant and batch size with its 95% CI. Bars grow from 1.0x, so slower cells point left; one row per bar
    and the figure grows with the rows, so labels never overlap."""
    base = results["recipe"]["parsed"]["report"]["baseline"]
    cells = results["cells"]
    shown = [i for i, c in enumerate(cells) if i in sp and c["variant"] != base]  # the baseline is 1.0x by definition
    if not shown:
        return None
    order = {v["name"]: k for k, v in enumerate(results["variants"])}
    backends = list(dict.fromkeys([b for b in results["recipe"]["parsed"]["bench"]["backends"]]
                                  + [cells[i]["backend"] for i in shown]))
    rows: list[tuple[str, int | None]] = []  # (label, cell index); None: a backend's header row
    for b in backends:
        group = sorted((i for i in shown if cells[i]["backend"] == b),
                       key=lambda i: (order.get(cells[i]["variant"], len(order)), cells[i]["batch_size"]))
        if group:
            rows.append((b, None))
            rows += [(f"{cells[i]['variant']}  b{cells[i]['batch_size']}", i) for i in group]
    fig, ax = subplots(figsize=(9, 1.6 + 0.3 * len(rows)))
    for y, (_, i) in enumerate(rows):
        if i is None:
            ax.axhspan(y - 0.5, y + 0.5, color="#f0f0f0", zorder=0)
            continue
        s, lo, hi = sp[i]
        color = SPEED_COLORS[0 if lo > 1 else 1 if hi < 1 else 2][0]
        ax.barh(y, s - 1, left=1, height=0.7, color=color, hatch="//" if cells[i]["status"] == "unstable" else None,
                zorder=2)
        ax.errorbar(s, y, xerr=[[s - lo], [hi - s]], fmt="none", ecolor="black", capsize=3, lw=1, zorder=3)
        right = s >= 1
        ax.annotate(f"{s:.2f}x", (hi if right else lo, y), textcoords="offset points", xytext=(4 if right else -4, 0),
                    ha="left" if right else "right", va="center", fontsize=8)
    ax.axvline(1.0, color="black", lw=1, zorder=4)
    ends = [v for i in shown for v in sp[i][1:]] + [1.0]
    if max(ends) / max(min(ends), 1e-9) > 10:
        ax.set_xscale("log")
    ax.margins(x=0.12)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label for label, _ in rows], fontsize=9)
    for tick, (_, i) in zip(ax.get_yticklabels(), rows):
        if i is None:
            tick.set_fontweight("bold")
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top
    ax.set_xlabel("speedup over the baseline on the same backend and batch (x), 95% CI")
    ax.set_title("Speedup against the baseline (right of 1.0x is faster; grouped by backend)")
    ax.grid(axis="x", alpha=0.3)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c, _ in SPEED_COLORS]
    handles.append(Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch="//"))
    _legend_below(ax, handles, [t for _, t in SPEED_COLORS] + ["unstable latency"], ncol=2)
    return save(fig, out / "speedup_vs_baseline.png")


def accuracy_delta_bars(results, out: Path) -> Path | None:
    """Each variant's change in the primary metric against the baseline (left out: 0 by definition), one
    horizontal bar per variant."""
    metric = primary_metric(results)
    base = results["recipe"]["parsed"]["report"]["baseline"]
    vs = [v for v in results["variants"]
          if metric and v["name"] != base and (v.get("accuracy_delta") or {}).get(metric) is not None]
    if not vs:
        return None
    deltas = [round(v["accuracy_delta"][metric], 4) or 0.0 for v in vs]  # no "-0.0000" for a float's last bit
    fig, ax = subplots(figsize=(9, 1.4 + 0.3 * len(vs)))
    y = np.arange(len(vs))
    ax.barh(y, deltas, height=0.7, color=["tab:red" if d < 0 else "tab:blue" for d in deltas])
    for yy, d in zip(y, deltas):
        ax.annotate(f"{d:+.4f}", (d, yy), textcoords="offset points", xytext=(4 if d >= 0 else -4, 0),
                    ha="left" if d >= 0 else "right", va="center", fontsize=8)
    ax.axvline(0, color="black", lw=1)
    # Room on both sides of 0 for the value labels (bars stick to 0, so margins alone would not give it).
    lo, hi = min(deltas + [0.0]), max(deltas + [0.0])
    pad = 0.25 * ((hi - lo) or 1e-3)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_yticks(y)
    ax.set_yticklabels([v["name"] for v in vs], fontsize=9)
    ax.set_ylim(len(vs) - 0.5, -0.5)
    ax.set_xlabel(f"{metric} change vs baseline")
    ax.set_title(f"{metric} change against the baseline (right is better)")
    ax.grid(axis="x", alpha=0.3)
    return save(fig, out / "accuracy_delta_by_variant.png")


def sensitivity_rankings(results: dict) -> list[tuple[str, dict]]:
    """(variant, notes["sensitivity"]) for every variant that measured per-node sensitivity."""
    out = []
    for v in results["variants"]:
        for n in v.get("notes") or []:
            if n.get("sensitivity"):
                out.append((v["name"], n["sensitivity"]))
    return out


def sensitivity_bars(results, out: Path) -> Path | None:
    """Per variant, the fidelity lost (1 - cosine to the float graph) when each node alone is
    quantized, most sensitive first; the nodes kept in float are drawn apart."""
    rankings = sensitivity_rankings(results)
    if not rankings:
        return None
    rows = max(min(len(s["ranking"]), 20) for _, s in rankings)
    fig, axes = subplots(1, len(rankings), figsize=(6.5 * len(rankings), 1.2 + 0.28 * rows), squeeze=False)
    for ax, (name, sens) in zip(axes[0], rankings):
        top = sens["ranking"][:20][::-1]
        kept = set(sens.get("kept_fp32") or [])
        ax.barh([f"{r['node']} ({r['op_type']})" for r in top], [max(1 - r["fidelity"], 0) for r in top],
                color=["#d62728" if r["node"] in kept else "#1f77b4" for r in top])
        ax.set_xscale("symlog", linthresh=1e-6)
        ax.set_xlabel("1 - cosine to the float graph, this node alone quantized")
        ax.set_title(f"{name}: per-node sensitivity (red: kept in float)", fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
    return save(fig, out / "sensitivity.png")


def search_plot(results, out: Path) -> Path | None:
    """The search's candidates: p50 on the objective against the metric; the rejected ones (never
    timed) along the bottom; the best circled."""
    search = results.get("search")
    if not search or not search.get("candidates"):
        return None
    metric = search["constraints"].get("metric") or "accuracy"
    fig, ax = subplots(figsize=(7.5, 4.8))
    measured = [c for c in search["candidates"] if c["status"] == "measured"]
    rejected = [c for c in search["candidates"] if c["status"] == "rejected"]
    best = (search.get("best") or {}).get("candidate")
    for c in measured:
        x = (c.get("accuracy") or {}).get(metric)
        lo, hi = c["ci95"]
        ax.errorbar([x], [c["p50_ms"]], yerr=[[c["p50_ms"] - lo], [hi - c["p50_ms"]]], fmt="o", color="#1f77b4")
        ax.annotate(c["name"].rsplit("-", 1)[-1], (x, c["p50_ms"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
        if c["name"] == best:
            ax.scatter([x], [c["p50_ms"]], s=260, facecolors="none", edgecolors="red", linewidths=2,
                       label="best (becomes a variant)")
    if rejected:
        ax.scatter([(c.get("accuracy") or {}).get(metric) for c in rejected], [0] * len(rejected), marker="x",
                   color="#999999", label="rejected on accuracy (not timed)")
    ax.set_xlabel(f"{metric} on the evaluation split")
    o = search["objective"]
    ax.set_ylabel(f"p50 ms on {o['backend']} at batch {o['batch_size']}")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Search candidates ({search['strategy']})", fontsize=11)
    ax.grid(alpha=0.3)
    if best or rejected:
        ax.legend(fontsize=8, loc="best")
    return save(fig, out / "search.png")


def make_plots(results: dict, out: Path, rec: Recommendation, sp: dict) -> list[tuple[str, Path]]:
    out.mkdir(parents=True, exist_ok=True)
    plots = [("Latency by variant and backend", latency_bars(results, out)),
             ("Accuracy against latency (Pareto frontier)", accuracy_vs_latency(results, out, rec)),
             ("Speedup against the baseline, by backend", speedup_bars(results, out, sp)),
             ("Accuracy change against the baseline", accuracy_delta_bars(results, out)),
             ("Model size by variant", size_bars(results, out)),
             ("Memory by cell", memory_bars(results, out)),
             ("Per-node quantization sensitivity", sensitivity_bars(results, out)),
             ("Search candidates", search_plot(results, out)),
             ("Perplexity against decode tokens/s (Pareto frontier)", lm_report.ppl_vs_tokens_per_s(results, out, rec)),
             ("Time to first token and per-token decode latency", lm_report.latency_bars(results, out)),
             ("Memory against context length", lm_report.memory_vs_context(results, out, rec)),
             ("Time to first token against prompt length", lm_report.ttft_vs_prompt_len(results, out)),
             ("Under load: p99 latency against offered QPS", load_report.p99_vs_qps(results, out))]
    made = [(t, p) for t, p in plots if p is not None]
    # A rebuilt report drops the plots it no longer draws (renamed ones, or a panel without data now).
    for old in set(out.glob("*.png")) - {p for _, p in made}:
        old.unlink()
    return made
