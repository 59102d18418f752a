"""Plots for the report, from results.json and bench.analysis. Every plot has a title, axis labels with units
and a legend; latency axes turn logarithmic when values span more than an order of magnitude."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.analysis import Recommendation, cell_score, primary_metric  # noqa: E402
from core import atomic  # noqa: E402

MB = 1024 * 1024


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def _measured(results):
    return [c for c in results["cells"] if c.get("latency_ms")]


def latency_bars(results, out: Path) -> Path | None:
    cells = _measured(results)
    if not cells:
        return None
    variants = [v["name"] for v in results["variants"]]
    backends = [b for b in results["recipe"]["parsed"]["bench"]["backends"] if any(c["backend"] == b for c in cells)]
    batches = sorted({c["batch_size"] for c in cells})
    fig, axes = plt.subplots(1, len(batches), figsize=(max(6, 1.2 * len(variants) * len(batches) + 2), 4.5),
                             squeeze=False)
    width = 0.8 / max(len(backends), 1)
    for ax, batch in zip(axes[0], batches):
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
    axes[0][-1].legend(title="backend (hatched: unstable)", fontsize=8)
    fig.suptitle("Latency by variant and backend (lower is better)")
    return _save(fig, out / "latency_by_variant.png")


def accuracy_vs_latency(results, out: Path, rec: Recommendation) -> Path | None:
    """At the batch size the recommendation was made for, with the recommended cell circled."""
    metric = primary_metric(results)
    if not metric:
        return None
    variants = {v["name"]: v for v in results["variants"]}
    batch = rec.batch_size
    pts = []
    for c in _measured(results):
        if c["batch_size"] != batch:
            continue
        s = cell_score(c, variants, metric)
        if s is not None:
            pts.append((c["latency_ms"]["p50"], s, f"{c['variant']} / {c['backend']}", c))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    backends = sorted({p[3]["backend"] for p in pts})
    markers = dict(zip(backends, "osD^vP*X"))
    for b in backends:
        sel = [p for p in pts if p[3]["backend"] == b]
        ax.scatter([p[0] for p in sel], [p[1] for p in sel], marker=markers[b], s=50, label=b, zorder=3)
    for x, y, label, _ in pts:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    # Pareto frontier: no other point is both faster and more accurate.
    front = []
    for x, y, *_ in sorted(pts, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray", ls="--", label="Pareto frontier",
            zorder=2)
    if rec.winner:
        w = rec.winner
        ax.scatter([w.p50], [w.score], s=300, facecolors="none", edgecolors="red", linewidths=2, label="recommended",
                   zorder=4)
    xs = [p[0] for p in pts]
    if max(xs) / max(min(xs), 1e-9) > 10:
        ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency at batch {batch} (ms)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against latency (up and left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "accuracy_vs_latency.png")


def size_bars(results, out: Path) -> Path | None:
    vs = [v for v in results["variants"] if v.get("size_bytes")]
    if not vs:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(vs) + 2), 4))
    ax.bar([v["name"] for v in vs], [v["size_bytes"] / MB for v in vs], color="tab:green")
    ax.set_ylabel("model file size (MiB)")
    ax.set_title("Model size on disk by variant")
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "size_by_variant.png")


def _cell_label(c: dict) -> str:
    return f"{c['variant']}\n{c['backend']} b{c['batch_size']}"


DEVICE_MEMORY = (("cuda_allocated_after_load", "model and inputs loaded (torch allocator)", "tab:green"),
                 ("cuda_max_allocated", "peak while running (torch allocator)", "tab:orange"),
                 ("nvml_process_device_bytes", "whole process on the GPU, CUDA context included (NVML)", "tab:gray"))


def memory_bars(results, out: Path) -> Path | None:
    """Host memory of every cell; a second panel with device memory when any cell ran on a GPU."""
    cells = [c for c in _measured(results) if c.get("memory", {}).get("peak_rss_delta") is not None]
    if not cells:
        return None
    gpu = [c for c in cells if any(c["memory"].get(k) is not None for k, _, _ in DEVICE_MEMORY)]
    width = max(6, 0.7 * len(cells) + 2)
    fig, axes = plt.subplots(1, 2 if gpu else 1, figsize=(width + (max(5, 0.9 * len(gpu) + 2) if gpu else 0), 4.8),
                             squeeze=False)
    ax = axes[0][0]
    x = np.arange(len(cells))
    ax.bar(x, [c["memory"]["peak_rss_delta"] / MB for c in cells], color="tab:purple")
    ax.set_xticks(x)
    ax.set_xticklabels([_cell_label(c) for c in cells], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title("Host: peak RSS increase of the cell's process", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if gpu:
        ax = axes[0][1]
        x = np.arange(len(gpu))
        w = 0.8 / len(DEVICE_MEMORY)
        for j, (key, label, color) in enumerate(DEVICE_MEMORY):
            values = [c["memory"].get(key) for c in gpu]
            if any(v is not None for v in values):
                ax.bar(x + (j - 1) * w, [(v or 0) / MB for v in values], width=w, color=color, label=label)
        ax.set_xticks(x)
        ax.set_xticklabels([_cell_label(c) for c in gpu], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("MiB")
        ax.set_title("GPU memory (ONNX Runtime cells: NVML only)", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "memory_by_cell.png")


def speedup_vs_accuracy_delta(results, out: Path, sp: dict) -> Path | None:
    """Two panels: speedup over the baseline (95% CI) per cell, and each variant's metric change."""
    measured = [(i, c) for i, c in enumerate(results["cells"]) if i in sp]
    if not measured:
        return None
    metric = primary_metric(results)
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(12 if metric else 7, 4.8), squeeze=False)
    ax = axes[0][0]
    vals = [sp[i] for i, _ in measured]
    x = np.arange(len(measured))
    ax.bar(x, [v[0] for v in vals], yerr=[[v[0] - v[1] for v in vals], [v[2] - v[0] for v in vals]], capsize=3,
           color=["tab:green" if v[1] > 1 else "tab:red" if v[2] < 1 else "tab:gray" for v in vals])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([_cell_label(c) for _, c in measured], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("speedup over baseline (x), 95% CI")
    ax.set_title("Speedup against the baseline, same backend and batch")
    ax.grid(axis="y", alpha=0.3)
    if metric:
        ax2 = axes[0][1]
        vs = [v for v in results["variants"] if (v.get("accuracy_delta") or {}).get(metric) is not None]
        ax2.bar([v["name"] for v in vs], [v["accuracy_delta"][metric] for v in vs], color="tab:blue")
        ax2.axhline(0, color="black", lw=0.8)
        ax2.set_ylabel(f"{metric} change vs baseline")
        ax2.set_title(f"{metric} change against the baseline (higher is better)")
        ax2.tick_params(axis="x", rotation=30)
        ax2.grid(axis="y", alpha=0.3)
    return _save(fig, out / "speedup_and_accuracy_delta.png")


def make_plots(results: dict, out: Path, rec: Recommendation, sp: dict) -> list[tuple[str, Path]]:
    out.mkdir(parents=True, exist_ok=True)
    plots = [("Latency by variant and backend", latency_bars(results, out)),
             ("Accuracy against latency (Pareto frontier)", accuracy_vs_latency(results, out, rec)),
             ("Speedup and accuracy change against the baseline", speedup_vs_accuracy_delta(results, out, sp)),
             ("Model size by variant", size_bars(results, out)),
             ("Memory by cell", memory_bars(results, out))]
    return [(t, p) for t, p in plots if p is not None]
