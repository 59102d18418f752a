"""The report, made from results.json alone: results.csv, report.md, a self-contained report.html
(plots embedded as data URIs) and plots/*.png. The numbers it shows come from reporting.analysis."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from reporting.analysis import (MB, TIE_RULE, Recommendation, bound_text, cell_score, faster, labelled, measured,
                                primary_metric, quietness, recommend, reference_speedups, speedups)
from reporting.analysis import fmt_num as _fmt
from reporting import load_report, lm_report
from core.backends import BACKENDS
from reporting.diagnosis import diagnosis_lines
from reporting.plots import make_plots, pareto_points, sensitivity_rankings
from reporting.ship import ship_plan, write_recommended
from core import atomic

CHANCE_TOLERANCE = 0.01  # a baseline this close above the majority-class rate has learnt nothing worth comparing


# ----------------------------------------------------------------------------- data
def cells_frame(results: dict) -> pd.DataFrame:
    """One row per cell, nested fields flattened with dots; raw samples and per-process records left
    out (they stay in the JSON), the processes' medians kept as `repeat_p50s`."""
    rows = [{**{k: v for k, v in c.items() if k not in ("samples_ms", "warmup_ms", "repeats")},
             **({"repeat_p50s": " ".join(str(r["p50"]) for r in c["repeats"])} if c.get("repeats") else {})}
            for c in results["cells"]]
    df = pd.json_normalize(rows)
    for col in ("latency_ms.ci95",):
        if col in df:
            df[col + "_lo"] = df[col].map(lambda x: x[0] if isinstance(x, list) else None)
            df[col + "_hi"] = df[col].map(lambda x: x[1] if isinstance(x, list) else None)
            df = df.drop(columns=[col])
    drop = [c for c in df.columns if c.startswith(("stability.window_medians", "stability.within"))]
    return df.drop(columns=drop)


# ----------------------------------------------------------------------------- tables
def variants_table(results: dict) -> tuple[list[str], list[list[str]]]:
    metric = primary_metric(results)
    head = ["variant", "from", "steps", "format", "params", "size MB", "sparsity", "GFLOPs (b=1)",
            metric or "accuracy", "Δ vs baseline", "status"]
    variants = {v["name"]: v for v in results["variants"]}
    rows = []
    for v in results["variants"]:
        acc = (v.get("accuracy") or {}).get(metric) if metric else None
        delta = (v.get("accuracy_delta") or {}).get(metric) if metric else None
        steps = ", ".join(s["name"] for s in v["steps"]) or "(source model)"
        rows.append([labelled(variants, v["name"]), v.get("parent") or "–", steps, v.get("format", "–"),
                     f"{v['params']:,}" if v.get("params") else "–",
                     _fmt(v["size_bytes"] / MB, 2) if v.get("size_bytes") else "–",
                     _fmt(v.get("sparsity"), 3), _fmt(v["flops"] / 1e9, 4) if v.get("flops") else "–",
                     _fmt(acc, 4), _fmt(delta, 4) if delta is not None else "–",
                     v["status"] + (f": {v['error']}" if v.get("error") else "")])
    return head, rows


# Step notes that change what a variant is (its steps column would mislead without them).
WARNING_NOTES = ("warning", "not_pruned", "tied_weights")


def step_warnings(results: dict) -> list[str]:
    return [f"`{v['name']}` ({n.get('step', 'step')}): {n[key]}" for v in results["variants"]
            for n in v.get("notes") or [] for key in WARNING_NOTES if n.get(key)]


def cells_table(results: dict, sp: dict) -> tuple[list[str], list[list[str]]]:
    metric = primary_metric(results)
    variants = {v["name"]: v for v in results["variants"]}
    # GPU columns only where a cell ran on one: the allocator's peak (torch cells) and NVML's whole
    # process figure (every CUDA cell, CUDA context included).
    gpu = any(c.get("memory", {}).get(k) is not None for c in results["cells"]
              for k in ("cuda_max_allocated", "nvml_process_device_bytes"))
    ref_backend, ref = reference_speedups(results)
    head = ["variant", "backend", "batch", "p50 ms [95% CI]", "p95 ms", "p99 ms", "n", "items/s",
            "speedup vs baseline [95% CI]"] + ([f"vs baseline on {ref_backend} [95% CI]"] if ref else [])
    head += [metric or "accuracy", "peak RSS Δ MB"]
    head += ["GPU alloc peak MB", "GPU process MB (NVML)"] if gpu else []
    head += ["% of GEMM peak", "status"]
    rows = []
    for i, c in enumerate(results["cells"]):
        lat = c.get("latency_ms")
        if lat:
            p50 = f"{lat['p50']:.3f} [{lat['ci95'][0]:.3f}, {lat['ci95'][1]:.3f}]"
            ratio = lambda s: f"{s[0]:.2f}x [{s[1]:.2f}, {s[2]:.2f}]" if s else "–"  # noqa: E731
            speed = ratio(sp.get(i))
            memory = c.get("memory", {})
            mb = lambda key: _fmt(memory[key] / MB, 1) if memory.get(key) is not None else "–"  # noqa: E731
            rows.append([labelled(variants, c["variant"]), c["backend"], str(c["batch_size"]), p50,
                         _fmt(lat["p95"]), _fmt(lat["p99"]), str(lat["n"]), _fmt(c.get("throughput"), 1), speed]
                        + ([ratio(ref.get(i))] if ref else [])
                        + [_fmt(cell_score(c, variants, metric), 4), mb("peak_rss_delta")]
                        + ([mb("cuda_max_allocated"), mb("nvml_process_device_bytes")] if gpu else [])
                        + [f"{100 * c['roofline_fraction']:.1f}" if c.get("roofline_fraction") is not None else "–",
                           c["status"]])
        else:
            rows.append([labelled(variants, c["variant"]), c["backend"], str(c["batch_size"])]
                        + ["–"] * (len(head) - 4) + [c["status"]])
    return head, rows


def artifacts_table(results: dict) -> tuple[list[str], list[list[str]]]:
    head = ["variant", "format", "exporter", "max abs diff", "min cosine", "top-1 agree", "status"]
    rows = []
    for a in results.get("artifacts", []):
        p = a.get("parity") or {}
        status = a["status"] + (f": {a['reason']}" if a.get("reason") else "")
        if a.get("parity_note"):  # a graph its steps changed on purpose (quantized): compared, not gated
            status += f" ({a['parity_note']})"
        rows.append([a["variant"], a["format"], a.get("exporter") or "–",
                     f"{p['max_abs_diff']:.2e}" if "max_abs_diff" in p else "–", _fmt(p.get("cosine_min"), 6),
                     _fmt(p.get("top1_agreement"), 4), status])
    return head, rows


def md_table(head, rows) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def html_table(head, rows) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    # A cell without spaces (a backend's name, a number) stays on one line: browsers would break it at a
    # hyphen; cells with spaces wrap there, so wide tables still fit the page.
    cell = lambda x: f"<td{'' if ' ' in str(x) else ' class=tok'}>{html.escape(str(x))}</td>"  # noqa: E731
    body = "".join("<tr>" + "".join(cell(x) for x in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def chance_warning(results: dict) -> str | None:
    """A classifier whose baseline scores no better than always answering the most common class makes every
    accuracy comparison between variants meaningless; say so before anything else. Needs the task's
    `majority_rate` (or, from older runs, `n_classes`: 1 / n_classes); without either, nothing is said."""
    task = results.get("task") or {}
    if task.get("primary") == "perplexity":
        return _lm_chance_warning(results)
    if task.get("primary") != "accuracy":
        return None
    if task.get("majority_rate") is not None:
        chance = task["majority_rate"]
        what = f"a majority-class rate of {chance:.4f} (always answering the most common class)"
    elif task.get("n_classes"):
        chance = 1 / task["n_classes"]
        what = f"a chance rate of {chance:.4f} (1 / {task['n_classes']} classes)"
    else:
        return None
    name = results["recipe"]["parsed"]["report"]["baseline"]
    base = next((v for v in results["variants"] if v["name"] == name), None)
    acc = ((base or {}).get("accuracy") or {}).get("accuracy")
    if acc is None or acc > chance + CHANCE_TOLERANCE:
        return None
    return (f"BASELINE AT CHANCE: `{name}` scores accuracy {acc:.4f} against {what}, so the "
            "accuracy comparisons between variants below say nothing. Most likely the model is untrained, or the "
            "labels or data do not match it.")


def _lm_chance_warning(results: dict) -> str | None:
    """A language model whose perplexity is near its vocabulary size predicts no better than a uniform guess
    over the tokens (perplexity = vocabulary): an untrained model, or a head its checkpoint lacked."""
    vocab = (((results.get("model") or {}).get("io") or {}).get("inputs") or {}).get("input_ids", {}).get("high")
    name = results["recipe"]["parsed"]["report"]["baseline"]
    base = next((v for v in results["variants"] if v["name"] == name), None)
    ppl = ((base or {}).get("accuracy") or {}).get("perplexity")
    if not vocab or ppl is None or ppl < 0.5 * vocab:
        return None
    return (f"BASELINE AT CHANCE: `{name}` has perplexity {ppl:.1f} with a vocabulary of {vocab} tokens, where a "
            f"uniform guess over the tokens scores {vocab}, so the perplexity comparisons between variants below say "
            "nothing. Most likely the model is untrained; `model.weights: random` measures an architecture and "
            "ranks variants by their fidelity to it instead.")


def pareto_table(results: dict, rec: Recommendation) -> tuple[list[str], list[list[str]]]:
    """The key to the numbers printed on the accuracy-against-latency plot."""
    head = ["#", "variant", "backend", f"p50 ms (batch {rec.batch_size})", primary_metric(results) or "accuracy",
            "Pareto frontier", "recommended"]
    variants = {v["name"]: v for v in results["variants"]}
    return head, [[str(p["n"]), labelled(variants, p["variant"]), p["backend"], f"{p['p50']:.3f}", _fmt(p['score'], 4),
                   "yes" if p["frontier"] else "", "yes" if p["recommended"] else ""]
                  for p in pareto_points(results, rec)]


def reference_lines(rec: Recommendation) -> list[str]:
    """The recommendation against the fastest reference at each batch size (`Recommendation.vs_reference`)."""
    w, lines = rec.winner, []
    for e in rec.vs_reference:
        ref = f"`{e['reference']['variant']}` on `{e['reference']['backend']}`"
        if e["speedup"] is None:
            lines.append(f"batch {e['batch_size']}: no figure against the best engine default ({ref}): {e['note']}")
            continue
        paired = f"{e['paired_rounds']} paired rounds" if e["paired_rounds"] else "pooled samples, no rounds"
        lines.append(f"`{w.variant}` on `{w.backend}` is {e['speedup']:.2f}x the best engine default ({ref}) at "
                     f"batch {e['batch_size']} (95% CI {e['ci'][0]:.2f}–{e['ci'][1]:.2f}, {paired})")
    return lines


def ship_text(results: dict, rec: Recommendation) -> str | None:
    """Where the recommended file is ready to pick up (reporting.ship). Said from results.json alone, so the same
    results give the same document whether or not the run's files are still here."""
    plan = ship_plan(results, rec)
    if plan is None:
        return None
    name = Path(plan["path"]).name
    return (f"Ready to pick up: `recommended/` beside this report holds `{name}` (a copy of `{plan['path']}`), its "
            f"input description `{name}.io.json` and `load_and_call.py`, which loads it as `{rec.winner.backend}` "
            "did and calls it once; `recommended/README.md` says how to run it. (Copied from the run's own "
            "files: a report rebuilt without `variants/` has no such folder.)")


def profile_table(results: dict, batch_size: int) -> tuple[list[str], list[list[str]]]:
    """Each profiled cell's op time per call and its three costliest op types."""
    per = "generated token" if any((c.get("profile") or {}).get("per") for c in results["cells"]) else "call"
    head = ["variant", "backend", f"op time ms / {per}", "top ops (share of op time)", "quantized kernels (engine census)"]
    variants = {v["name"]: v for v in results["variants"]}
    rows = []
    for c in results["cells"]:
        prof = c.get("profile") or {}
        if c["batch_size"] != batch_size or not prof.get("by_op_ms"):
            continue
        total = sum(prof["by_op_ms"].values()) or 1.0
        top = sorted(prof["by_op_ms"].items(), key=lambda kv: -kv[1])[:3]
        engine = BACKENDS.get(c["backend"])
        kernels = engine.kernel_census(variants, c["variant"]) if engine is not None else None
        int8 = ", ".join(f"{k} {v}" for k, v in (kernels or {}).get("int8_kernels", {}).items()) or "–"
        rows.append([labelled(variants, c["variant"]), c["backend"], f"{prof['op_total_ms']:.3f}",
                     ", ".join(f"{op} {ms / total:.0%}" for op, ms in top), int8])
    return head, rows


def search_blocks(results: dict) -> list[tuple[str, object]]:
    """The search: what it tried, what it rejected before timing, what it measured, what won."""
    search = results.get("search")
    if not search:
        return []
    c, o, best = search["constraints"], search["objective"], search.get("best")
    metric = c.get("metric") or "accuracy"
    text = (f"Strategy {search['strategy']}, {len(search['candidates'])} candidates; objective: p50 on "
            f"`{o['backend']}` at batch {o['batch_size']}; constraint: {metric} drop <= {c.get('max_accuracy_drop')} "
            f"against the baseline, checked before any timing. Candidates are scored on {search['selected_on']}, "
            "the same rows as the report: picking among them is a selection on those rows. ")
    if best:
        lead = best.get("lead")
        text += f"Best: `{best['candidate']}` ({best['p50_ms']:.3f} ms p50), which became the variant `{best['variant']}`"
        if lead and lead.get("speedup"):
            r = lead["speedup"]
            text += (f"; {r[0]:.2f}x [{r[1]:.2f}, {r[2]:.2f}] the runner-up `{lead['runner_up']}`, "
                     + ("a significant lead." if lead["significant"] else "not a significant lead: they tie."))
        else:
            text += "."
    else:
        text += "No candidate passed the constraint and ran: nothing was added."
    rows = []
    for cand in search["candidates"]:
        score = (cand.get("accuracy") or {}).get(metric)
        p50 = (f"{cand['p50_ms']:.3f} [{cand['ci95'][0]:.3f}, {cand['ci95'][1]:.3f}]" if cand.get("p50_ms")
               else "–")
        rows.append([cand["name"], ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in cand["params"].items()),
                     _fmt(score, 4), p50, cand["status"] + (f": {cand['reason']}" if cand.get("reason") else "")])
    return [("h2", "Search"), ("p", text),
            ("table", (["candidate", "parameters", metric, "p50 ms [95% CI]", "status"], rows))]


def sensitivity_blocks(results: dict) -> list[tuple[str, object]]:
    """Per-node sensitivity a quantizing step measured (its notes' `sensitivity`): the most sensitive nodes, the
    suggestion for a fidelity target, and what was kept in float."""
    blocks = []
    for name, sens in sensitivity_rankings(results):
        if not blocks:
            blocks.append(("h2", "Quantization sensitivity"))
        sug = sens.get("suggestion") or {}
        text = (f"`{name}`: {len(sens['ranking'])} nodes, each quantized alone ({sens['measured_on']}; the metric: "
                f"{sens['metric']}). Kept in float: {', '.join(f'`{n}`' for n in sens['kept_fp32']) or 'none'}.")
        if sug:
            text += (f" The fewest to keep in float for fidelity {sug['target']}: {len(sug['nodes'])} node(s)"
                     f"{'' if sug['met'] else ' (target not met even with all of them tried)'}; fidelity by how "
                     f"many are kept: {', '.join(f'{k}: {v:.5f}' for k, v in sug['fidelity_by_kept'].items())}.")
        blocks.append(("p", text))
        blocks.append(("table", (["node", "op", "cosine when quantized alone", "kept in float"],
                                 [[r["node"], r["op_type"], f"{r['fidelity']:.6f}",
                                   "yes" if r["node"] in sens["kept_fp32"] else ""] for r in sens["ranking"][:10]])))
    return blocks


def suggestion_blocks(results: dict) -> list[tuple[str, object]]:
    """What the suggestions of an earlier report (`workbench suggest`) gave: each suggested variant against
    the variant it was suggested for, on the same backend and batch size, paired by round."""
    variants = {v["name"]: v for v in results["variants"]}
    cells = {(c["variant"], c["backend"], c["batch_size"]): c for c in results["cells"] if measured(c)}
    metric = primary_metric(results)
    rows = []
    for name, v in variants.items():
        sug = v.get("suggested")
        if not sug:
            continue
        tried = sorted(((b, bs, c) for (n, b, bs), c in cells.items() if n == name), key=lambda t: (t[0], t[1]))
        if not tried:
            rows.append([f"`{name}`", f"`{sug['for']}`", sug["kind"], "–", "–", "not measured: "
                         + (v.get("error") or "no measured cell"), "–"])
        for backend, bs, c in tried:
            old = cells.get((sug["for"], backend, bs))
            r = faster(c, old) if old else None
            verdict = ("–" if r is None else f"{r[0]:.2f}x [{r[1]:.2f}, {r[2]:.2f}]"
                       + (" faster" if r[1] > 1 else " slower" if r[2] < 1 else " (no significant change)"))
            score = lambda cell: (cell.get("accuracy") or {}).get(metric) if cell else None  # noqa: E731
            rows.append([f"`{name}`", f"`{sug['for']}`", sug["kind"], f"`{backend}`", str(bs), verdict,
                         f"{_fmt(score(c), 4)} (was {_fmt(score(old), 4)})" if metric else "–"])
    if not rows:
        return []
    return [("h2", "Suggestions tested"),
            ("p", "Variants an earlier report suggested (`workbench suggest`), each against the variant it was "
                  "suggested for, on the same backend and batch size, paired by round: the advice measured."),
            ("table", (["suggested", "for", "finding", "backend", "batch", "speedup vs that variant [95% CI]",
                        metric or "metric"], rows))]


def diagnosis_blocks(results: dict, batch_size: int) -> list[tuple[str, object]]:
    """"Why isn't it faster?": a diagnosis per variant that does not beat its parent, and the profiles."""
    lines = diagnosis_lines(results, batch_size)
    head, rows = profile_table(results, batch_size)
    if not lines and not rows:
        return []
    blocks = [("h2", "Why isn't it faster?")]
    if lines:
        blocks.append(("p", f"Variants not significantly faster than their parent at batch {batch_size}, and "
                            "static int8 that does not beat dynamic int8, with what the run's figures say about why:"))
        blocks.append(("list", lines))
    if rows:
        blocks.append(("p", "Op-level profiles (one extra process per cell, after the timed ones; a profiler's "
                            "own overhead makes these times longer than the p50s above):"))
        blocks.append(("table", (head, rows)))
    return blocks


# ----------------------------------------------------------------------------- document
def executor_gaps(results: dict) -> list[float]:
    """Seconds between the end of one process and the start of the next on the same node, within a
    round (rounds wait for each other, so the gap across them is not the executor's): the time the
    executor adds per process when its queue is full."""
    by: dict[tuple, list] = {}
    for c in results["cells"]:
        for r in c.get("repeats") or []:
            if r.get("ran") and r.get("node"):
                by.setdefault((r["node"], r["round"]), []).append(r["ran"])
    gaps = []
    for spans in by.values():
        spans.sort()
        gaps += [b[0] - a[1] for a, b in zip(spans, spans[1:]) if b[0] >= a[1]]
    return gaps


def nodes_blocks(results: dict) -> list[tuple[str, object]]:
    """Under Ray: which machine measured which cells, grouped by hardware, and a warning for every
    speedup whose two cells were measured on different hardware."""
    nodes = results.get("nodes")
    if not nodes:
        return []
    ex = results.get("executor") or {}
    blocks: list[tuple[str, object]] = [("h2", "Where the cells ran")]
    blocks.append(("p", f"Executor `{ex.get('name', 'ray')}` ({ex.get('address', '?')}; Ray started or joined in "
                        f"{ex.get('init_s', 0):.1f} s). Each cell ran all its processes on one node, which held the "
                        "node's timing token meanwhile: no two timed processes shared a node."))
    groups: dict[str, list[str]] = {}
    for nid, n in nodes.items():
        groups.setdefault(n.get("hardware_sha") or nid, []).append(nid)
    rows = []
    for sha, ids in groups.items():
        env = nodes[ids[0]].get("environment") or {}
        hardware = env.get("cpu", "?") + (f" + {env['gpu']}" if env.get("gpu") else "")
        flags = ", ".join(f for f in env.get("cpu_flags", []) if "vnni" in f or f.startswith("amx") or f == "avx512f")
        measured = [c for c in results["cells"] if (c.get("node") or {}).get("id") in ids]
        rows.append([hardware, flags or "–", ", ".join(f"{nodes[i].get('hostname')} ({i[:8]})" for i in ids),
                     str(len(measured)), ", ".join(sorted({c["backend"] for c in measured}))])
    blocks.append(("table", (["hardware", "int8 / bf16 flags", "nodes", "cells", "backends"], rows)))
    gaps = executor_gaps(results)
    if gaps:
        median, p90 = np.median(gaps) * 1000, np.percentile(gaps, 90) * 1000
        blocks.append(("p", f"Between one timed process and the next on the same node, the executor spent a median "
                            f"{median:.0f} ms (90th percentile {p90:.0f} ms, {len(gaps)} gaps): scheduling, shipping "
                            "the artifact, starting the task."))
    base = results["recipe"]["parsed"]["report"]["baseline"]
    hw = {(c["variant"], c["backend"], c["batch_size"]): (c.get("node") or {}).get("hardware_sha")
          for c in results["cells"]}
    mixed = sorted({f"{c['variant']} on {c['backend']} b{c['batch_size']}" for c in results["cells"]
                    if c["variant"] != base and (c.get("node") or {}).get("hardware_sha")
                    and hw.get((base, c["backend"], c["batch_size"])) not in (None, c["node"]["hardware_sha"])})
    if mixed:
        blocks.append(("warn", "These cells were measured on different hardware than the baseline they are compared "
                               "with, so their speedups mix the machine with the variant: " + "; ".join(mixed) + "."))
    return blocks


def sections(results: dict, plots: list[tuple[str, str]], rec: Recommendation, sp: dict) -> list[tuple[str, object]]:
    """The report as (kind, content) blocks; md and html render the same blocks."""
    blocks: list[tuple[str, object]] = [("h1", f"model-workbench report: {results['recipe']['name']}")]
    meta = (f"Recipe `{results['recipe']['path']}` (sha256 {str(results['recipe']['sha256'])[:12]}), "
            f"run {results['started']} → {results['finished']}. Model: {results['model']['description']}. "
            f"Task: {results['task']['description']}.")
    blocks.append(("p", meta))
    chance = chance_warning(results)
    if chance:
        blocks.append(("warn", chance))
    if results.get("quick"):
        blocks.append(("warn", "QUICK RUN: timing and training budgets were shrunk (--quick). These numbers are a "
                               "smoke test, not a basis for a decision."))
    quiet = quietness(results)
    if quiet:
        blocks.append(("p", f"Machine while measuring ({quiet['processes']} cell processes): other processes used "
                            f"a median {quiet['other_cpu_cores_median']:.2f} cores (at most "
                            f"{quiet['other_cpu_cores_max']:.2f}); CPU steal at most {quiet['steal_cores_max']:.2f} "
                            f"cores; {quiet['remeasured']} process(es) re-measured because the machine was busy, "
                            f"{quiet['busy_kept']} kept busy after the retries ran out."))
    blocks.append(("h2", "Recommendation"))
    w = rec.winner
    if w is None:
        blocks.append(("p", f"No measured cell meets the constraints ({'; '.join(rec.rules)}). "
                            "See the tables below for what was measured and why cells failed."))
    else:
        c, score = w.cell, w.score
        if rec.objective == "capacity":
            s = rec.capacities[(w.variant, w.backend)]
            why = (f"the highest capacity under load: {s['max_qps']:.1f} QPS at {bound_text(s)} "
                   f"in scenario {rec.scenario} (per round: "
                   f"{', '.join(f'{q:.1f}' if q is not None else 'none valid' for q in s.get('max_qps_by_round', []))}), "
                   f"among the cells meeting: {'; '.join(rec.rules)}; its single-request p50 is "
                   f"{c['latency_ms']['p50']:.3f} ms")
            if rec.runner_up is not None:
                q2 = rec.capacity(rec.runner_up)
                why += f"; {s['max_qps'] / q2:.2f}x the capacity of the runner-up ({q2:.1f} QPS)"
        else:
            why = (f"fastest median latency ({c['latency_ms']['p50']:.3f} ms, 95% CI {c['latency_ms']['ci95'][0]:.3f}–"
                   f"{c['latency_ms']['ci95'][1]:.3f}) among the cells meeting: {'; '.join(rec.rules)}")
        if w.cell_index in sp:
            s = sp[w.cell_index]
            why += f"; {s[0]:.2f}x the baseline on the same backend (95% CI {s[1]:.2f}–{s[2]:.2f})"
        if rec.metric and score is not None:
            why += f"; {rec.metric} {_fmt(score, 4)}"
            if rec.base_score is not None:
                why += f" (baseline {_fmt(rec.base_score, 4)})"
        if c["status"] == "unstable":
            why += (". Warning: this cell's latency was unstable (its within-process timings spread past the "
                    "threshold); it is recommended because it "
                    + ("beats the fastest stable cell significantly, paired round by round" if rec.stable_beaten
                       else "is all that meets the constraints"))
        if len(rec.tied) > 1:
            names = ", ".join(f"`{t.variant}` on `{t.backend}` ({t.p50:.3f} ms)" for t in rec.tied)
            why += (f". It is not significantly faster than the others that tie with the fastest within the "
                    f"rounds' noise ({names}); among those it was picked by the rule: {TIE_RULE}")
        elif rec.runner_up is not None and rec.objective == "latency":
            r = faster(w.cell, rec.runner_up.cell)
            if r is not None:
                why += f"; {r[0]:.2f}x the runner-up, paired by round (95% CI {r[1]:.2f}–{r[2]:.2f})"
        blocks.append(("p", f"**Ship `{w.variant}` on `{w.backend}`** — {why}."))
        if rec.vs_reference:
            blocks.append(("p", "Against the engines' own defaults (the variants marked `reference: true`, shown as "
                                "\"(reference)\" below: measured like the others, never recommended), the best "
                                "reference at each batch size, paired by round:"))
            blocks.append(("list", reference_lines(rec)))
        r = rec.runner_up
        if r:
            shown = (f"{rec.capacity(r):.1f} QPS in {rec.scenario}, {r.p50:.3f} ms p50" if rec.objective == "capacity"
                     else f"{r.p50:.3f} ms p50")
            blocks.append(("p", f"Runner-up: `{r.variant}` on `{r.backend}` "
                                f"({shown}). {rec.rejected} measured cell(s) at this "
                                f"batch size did not meet the constraints."))
        ready = ship_text(results, rec)
        if ready:
            blocks.append(("p", ready))
    if rec.unjudged:
        blocks.append(("p", "Cells that failed a constraint because it could not be judged: "
                            + "; ".join(rec.unjudged) + "."))
    if plots:
        blocks.append(("h2", "Plots"))
        for title, path in plots:
            blocks.append(("img", (title, path)))
            if Path(path).name == "accuracy_vs_latency.png":
                blocks.append(("p", "The numbers on the accuracy-against-latency plot:"))
                blocks.append(("table", pareto_table(results, rec)))
    if lm_report.generation_cells(results):
        blocks.append(("h2", "Generation: time to first token, decode latency, perplexity"))
        blocks.append(("p", lm_report.generation_note(results)))
        blocks.append(("table", lm_report.generation_table(results)))
        by_len = lm_report.prompt_len_table(results)
        if by_len:
            blocks.append(("p", "Time to first token at each prompt length measured (`bench.prompt_lens`, after "
                                "each cell's timed generations, in the same process): a prefill with its first token."))
            blocks.append(("table", by_len))
        by_method = lm_report.int4_by_method(results, rec.batch_size or 1)
        if by_method:
            blocks.append(("h2", "4-bit weights by method, at equal bits"))
            blocks.append(("p", "Every 4-bit weight-only variant made straight from the baseline, sorted by KL "
                                "to the fp32 model on each backend: round-to-nearest needs no data; HQQ fits its "
                                "scales without data; GPTQ and AWQ / scale estimation calibrate on training text. "
                                "Perplexity, KL and top-1 agreement are on the held-out blocks, from each backend's "
                                "own logits."))
            blocks.append(("table", by_method))
        mine_vs, table = lm_report.own_vs_engines(results, rec.batch_size or 1)
        if mine_vs:
            blocks.append(("h2", "The workbench's own path against the engines' own artifacts"))
            blocks += [("p", line) for line in mine_vs]
            if table:
                blocks.append(("table", table))
    if load_report.load_cells(results):
        blocks.append(("h2", "Under load: capacity at the latency bound (MLCommons LoadGen)"))
        blocks.append(("p", load_report.load_note(results)))
        blocks.append(("table", load_report.capacity_table(results)))
        blocks += [("p", line) for line in load_report.serving_verdicts(results)]
    blocks += diagnosis_blocks(results, rec.batch_size)
    blocks += suggestion_blocks(results)
    blocks += search_blocks(results)
    blocks += sensitivity_blocks(results)
    blocks.append(("h2", "Variants"))
    blocks.append(("table", variants_table(results)))
    said = step_warnings(results)
    if said:
        blocks.append(("p", "What the steps said a reader of the table above would not see:"))
        blocks.append(("list", said))
    if any((v.get("sparsity") or 0) > 0.05 and v.get("format") == "torch" for v in results["variants"]):
        blocks.append(("p", "Sparsity is the fraction of exact zeros in weight matrices. Dense kernels do not "
                            "skip zeros: unstructured and 2:4 sparsity shrink nothing and speed nothing up here."))
    blocks.append(("h2", "Latency, throughput, accuracy and memory per cell"))
    rounds = max((len(c.get("repeats") or []) for c in results["cells"]), default=0)
    protocol = (f"Each cell was measured in {rounds} processes, one per interleaved round; p50 is the median of "
                "their medians, and its 95% interval resamples processes, then samples: it says what a rerun "
                "would see. Speedup is the baseline's p50 over this cell's on the same backend and batch, paired "
                "round by round, with an interval over rounds." if rounds > 1 else
                "Each cell was measured in one process (`bench.repeats: 1`): p50 with a 95% bootstrap interval over "
                "its samples. No speedup is given (–): a ratio of two single processes cannot be told from the "
                "spread between processes, which only two or more rounds show; set `bench.repeats: 2` or more."
                if rounds == 1 else
                "p50 with a 95% bootstrap interval; speedup is the ratio of baseline p50 to this p50 on the "
                "same backend and batch.")
    blocks.append(("p", protocol + " Accuracy is computed from the outputs this backend produced. "
                        f"Timing protocol: {json.dumps(results.get('timing', {}))}."))
    probe = results["environment"].get("roofline_probe")
    if probe:
        paper = probe.get("paper") or {}
        paper_text = (f" Paper peaks: fp32 {paper['fp32'] / 1e9:.1f}, bf16 {paper['bf16'] / 1e9:.1f}, int8 "
                      f"{paper['int8'] / 1e9:.1f} G op/s ({paper['method']}); a cell counts against the larger of "
                      "the measured and the paper peak of its precision (int8 cells with their ancestor's FLOPs), "
                      "so it cannot pass 100 %." if paper else " Quantized kernels are not counted.")
        blocks.append(("p", f"% of GEMM peak: FLOPs per forward × batch / p50, over this machine's measured "
                            f"{probe['peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({probe['method']})." + paper_text +
                            f" Copy bandwidth: {probe['peak_bytes_per_s'] / 1e9:.1f} GB/s, against the weight bytes "
                            "a forward streams (embedding tables left out)."
                            + (" Warning: the probe ran while the machine was busy, so the peak is understated."
                               if probe.get("measured_under_load") else "")))
    blocks.append(("table", cells_table(results, sp)))
    blocks += nodes_blocks(results)
    blocks.append(("h2", "Exported artifacts and parity"))
    blocks.append(("table", artifacts_table(results)))
    problems = [c for c in results["cells"] if c["status"] != "ok"]
    blocks.append(("h2", "Failed, skipped and unstable cells"))
    if problems:
        variants = {v["name"]: v for v in results["variants"]}
        blocks.append(("table", (["variant", "backend", "batch", "status", "reason"],
                                 [[labelled(variants, c["variant"]), c["backend"], str(c["batch_size"]), c["status"],
                                   c.get("reason") or ""] for c in problems])))
    else:
        blocks.append(("p", "None: every cell ran and was stable."))
    blocks.append(("h2", "Lineage"))
    for v in results["variants"]:
        steps = "; ".join(f"{s['name']}({', '.join(f'{k}={val}' for k, val in s['params'].items())})"
                          for s in v["steps"]) or "the source model, unchanged"
        cached = " (reused from cache)" if v.get("cached") else ""
        blocks.append(("p", f"`{v['name']}` ← `{v.get('parent') or 'source'}`: {steps}{cached}"))
    blocks.append(("h2", "Environment"))
    env = results["environment"]
    blocks.append(("table", (["key", "value"], [[k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)]
                                                for k, v in env.items()])))
    return blocks


def render_md(blocks) -> str:
    out = []
    for kind, content in blocks:
        if kind == "h1":
            out.append(f"# {content}")
        elif kind == "h2":
            out.append(f"## {content}")
        elif kind == "p":
            out.append(str(content))
        elif kind == "warn":
            out.append(f"> **{content}**")
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in content))
        elif kind == "table":
            out.append(md_table(*content))
        elif kind == "img":
            out.append(f"![{content[0]}]({content[1]})")
        out.append("")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0;display:block;overflow-x:auto}
td,th{border:1px solid #ccc;padding:3px 6px}.tok{white-space:nowrap}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}.warn{background:#fff3cd;padding:.6em;
border:1px solid #e0c060}code{background:#f5f5f5;padding:0 3px}"""


def render_html(blocks, run_dir: Path) -> str:
    import re

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(blocks[0][1])}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for kind, content in blocks:
        if kind == "h1":
            out.append(f"<h1>{html.escape(content)}</h1>")
        elif kind == "h2":
            out.append(f"<h2>{html.escape(content)}</h2>")
        elif kind == "p":
            out.append(f"<p>{inline(str(content))}</p>")
        elif kind == "warn":
            out.append(f"<p class='warn'>{inline(str(content))}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{inline(str(item))}</li>" for item in content) + "</ul>")
        elif kind == "table":
            out.append(html_table(*content))
        elif kind == "img":
            data = base64.b64encode((run_dir / content[1]).read_bytes()).decode()
            out.append(f"<figure><img alt='{html.escape(content[0])}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(content[0])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run_dir: Path) -> None:
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    df = cells_frame(results)
    atomic.write_text(run_dir / "results.csv", df.to_csv(index=False))
    rec, sp = recommend(results), speedups(results)
    plots = make_plots(results, run_dir / "plots", rec, sp)
    plots = [(t, str(p.relative_to(run_dir))) for t, p in plots]
    blocks = sections(results, plots, rec, sp)
    atomic.write_text(run_dir / "report.md", render_md(blocks))
    atomic.write_text(run_dir / "report.html", render_html(blocks, run_dir))
    write_recommended(run_dir, results, rec, sp)
