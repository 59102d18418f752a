"""The report's part for causal LMs, from results.json alone: the generation table (time to first
token, per-token decode latency, tokens/s, perplexity and fidelity, memory with the KV cache) and its
plots (perplexity against tokens/s, TTFT and per-token latency by cell, memory against context)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

from reporting.analysis import MB, Recommendation, cell_score, faster, fmt_num as _fmt, labelled
from reporting.figures import save, subplots


def generation_cells(results: dict, batch: int | None = None) -> list[dict]:
    return [c for c in results["cells"] if c.get("generation", {}).get("ttft_ms") and c.get("latency_ms")
            and (batch is None or c["batch_size"] == batch)]


def _label(c: dict) -> str:
    return f"{c['variant']} / {c['backend']}"


def generation_table(results: dict) -> tuple[list[str], list[list[str]]]:
    variants = {v["name"]: v for v in results["variants"]}
    base = (variants.get(results["recipe"]["parsed"]["report"]["baseline"], {}).get("accuracy") or {}).get("perplexity")
    head = ["variant", "backend", "batch", "prompt + new", "TTFT p50 ms", "decode ms/token p50 (p90, p99)",
            "tokens/s", "perplexity", "vs baseline", "top-1 agree", "KL", "peak RSS +MB", "KV cache MB"]
    rows = []
    for c in generation_cells(results):
        g, lat = c["generation"], c["latency_ms"]
        ppl = cell_score(c, variants, "perplexity")
        acc = c.get("accuracy") or variants.get(c["variant"], {}).get("accuracy") or {}
        kv = g.get("kv_cache_bytes")
        rows.append([labelled(variants, c["variant"]), c["backend"], str(c["batch_size"]),
                     f"{g['prompt_len']} + {g['new_tokens']}",
                     f"{g['ttft_ms']['p50']:.2f}", f"{lat['p50']:.3f} ({lat['p90']:.3f}, {lat['p99']:.3f})",
                     f"{c['throughput']:.1f}", f"{ppl:.3f}" if ppl is not None else "–",
                     f"{(ppl / base - 1):+.1%}" if ppl is not None and base else "–",
                     f"{acc['top1_agreement']:.4f}" if "top1_agreement" in acc else "–",
                     _fmt(acc["kl"], 4) if "kl" in acc else "–",
                     f"{c['memory']['peak_rss_delta'] / MB:.1f}" if "peak_rss_delta" in c.get("memory", {}) else "–",
                     f"{kv / MB:.2f}" if kv else "–"])
    return head, rows


def generation_note(results: dict) -> str:
    cells = generation_cells(results)
    nondet = [_label(c) for c in cells if not c["generation"].get("deterministic", True)]
    text = ("Causal LMs are measured by generation: greedy decoding of a fixed number of new tokens from prompts "
            "drawn (seeded) from the evaluation text. TTFT is the prefill with the first token; a cell's latency "
            "(and every speedup and the recommendation) is the per-token decode latency over the later tokens, "
            "its throughput tokens/s over the batch. Perplexity, top-1 agreement and KL come from the logits this "
            "backend computes on the held-out blocks; KL(source || variant) is summed over the source model's "
            "top-32 next tokens. The KV cache figure is the float32 cache at the full context "
            "(2 x layers x key/value heads x head size x tokens x batch). Peak RSS is over a whole generation.")
    if results.get("model", {}).get("random_weights"):
        text += (" The model has random weights (built from its config): its next-token distributions are nearly "
                 "flat, so perplexity and top-1 agreement mean little; KL to the random fp32 model is the fidelity "
                 "measure, and the timings and memory are those of a model of this size.")
    if nondet:
        text += f" Warning: greedy decoding gave different tokens between generations in {', '.join(nondet)}."
    return text


def ppl_vs_tokens_per_s(results: dict, out: Path, rec: Recommendation) -> Path | None:
    """Perplexity against tokens/s at the recommendation's batch size; down and right is better."""
    variants = {v["name"]: v for v in results["variants"]}
    pts = [(c, cell_score(c, variants, "perplexity")) for c in generation_cells(results, rec.batch_size)]
    pts = [(c, s) for c, s in pts if s is not None]
    if not pts:
        return None
    fig, ax = subplots(figsize=(8, 5))
    backends = sorted({c["backend"] for c, _ in pts})
    for b, marker in zip(backends, "osD^vP*X"):
        sel = [(c, s) for c, s in pts if c["backend"] == b]
        ax.scatter([c["throughput"] for c, _ in sel], [s for _, s in sel], marker=marker, s=50, label=b, zorder=3)
    front, best = [], None  # no other point is both faster and lower in perplexity
    for c, s in sorted(pts, key=lambda p: -p[0]["throughput"]):
        if best is None or s < best:
            front.append((c, s))
            best = s
    ax.step([c["throughput"] for c, _ in front], [s for _, s in front], where="post", color="gray", ls="--",
            label="Pareto frontier", zorder=2)
    for c, s in pts:
        ax.annotate(c["variant"], (c["throughput"], s), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if rec.winner is not None and rec.winner.cell is c:
            ax.scatter([c["throughput"]], [s], s=300, facecolors="none", edgecolors="red", linewidths=2,
                       label="recommended", zorder=4)
    ax.set_xlabel(f"decode tokens/s at batch {rec.batch_size}")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title("Perplexity against decode throughput (down and right is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out / "perplexity_vs_tokens_per_s.png")


def latency_bars(results: dict, out: Path) -> Path | None:
    """TTFT and per-token decode latency (p50, whiskers to p90) of every generation cell."""
    cells = generation_cells(results)
    if not cells:
        return None
    labels = [f"{_label(c)} b{c['batch_size']}" for c in cells]
    fig, axes = subplots(1, 2, figsize=(12, 0.35 * len(cells) + 1.8), sharey=True)
    for ax, key, title in ((axes[0], "ttft", "time to first token (ms)"),
                           (axes[1], "decode", "decode latency per token (ms)")):
        p50 = [c["generation"]["ttft_ms"]["p50"] if key == "ttft" else c["latency_ms"]["p50"] for c in cells]
        p90 = [c["generation"]["ttft_ms"]["p90"] if key == "ttft" else c["latency_ms"]["p90"] for c in cells]
        ax.barh(range(len(cells)), p50, xerr=[[0] * len(cells), [max(b - a, 0) for a, b in zip(p50, p90)]],
                color="#4c72b0", capsize=2)
        ax.set_title(f"{title}; p50, whisker to p90", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(cells)), labels, fontsize=7)
    axes[0].invert_yaxis()
    return save(fig, out / "ttft_and_decode_latency.png")


def memory_vs_context(results: dict, out: Path, rec: Recommendation) -> Path | None:
    """Per variant at the recommendation's batch size: the weights plus the KV cache as the context
    grows (a line: the cache grows by the same bytes per token), and the peak RSS measured at the
    context the cells ran (points)."""
    cells = generation_cells(results, rec.batch_size)
    cells = [c for c in cells if c["generation"].get("kv_cache_bytes")]
    if not cells:
        return None
    sizes = {v["name"]: v.get("size_bytes") or 0 for v in results["variants"]}
    fig, ax = subplots(figsize=(8, 5))
    names = list(dict.fromkeys(c["variant"] for c in cells))
    tab10 = matplotlib.colormaps["tab10"]
    colors = {n: tab10(i % 10) for i, n in enumerate(names)}  # one colour per variant: line and points
    backends = list(dict.fromkeys(c["backend"] for c in cells))
    markers = dict(zip(backends, "xo^sDv"))
    for name in names:
        g = next(c["generation"] for c in cells if c["variant"] == name)
        per_token = g["kv_cache_bytes"] / g["context"]
        ctx = [0, g["context"], 4 * g["context"], 16 * g["context"]]
        ax.plot(ctx, [(sizes.get(name, 0) + per_token * n) / MB for n in ctx], lw=1, color=colors[name],
                label=f"{name}: file + KV cache ({per_token / 1024:.1f} KiB/token)")
    for c in cells:
        ax.scatter([c["generation"]["context"]], [c["memory"]["peak_rss_delta"] / MB], s=30, zorder=3,
                   marker=markers[c["backend"]], color=colors[c["variant"]])
    for b in backends:  # legend entries for the measured points' markers
        ax.scatter([], [], marker=markers[b], color="gray", label=f"measured peak RSS increase, {b}")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("MB")
    ax.set_title(f"Memory against context at batch {rec.batch_size}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, out / "memory_vs_context.png")


def _ttft_points(c: dict) -> dict[int, dict]:
    """A cell's TTFT percentiles by prompt length: its own prompt length and every `bench.prompt_lens` one."""
    g = c["generation"]
    return {g["prompt_len"]: g["ttft_ms"], **{int(n): v["ttft_ms"] for n, v in (g.get("by_prompt_len") or {}).items()}}


def prompt_len_table(results: dict):
    """TTFT p50 (p90) per cell at each prompt length measured (bench.seq_len and bench.prompt_lens), with
    the peak RSS increase up to the longest; None when the recipe measured one length only."""
    cells = [c for c in generation_cells(results) if c["generation"].get("by_prompt_len")]
    if not cells:
        return None
    variants = {v["name"]: v for v in results["variants"]}
    lens = sorted({n for c in cells for n in _ttft_points(c)})
    head = ["variant", "backend", "batch"] + [f"TTFT ms at {n} tokens p50 (p90)" for n in lens] + \
        ["peak RSS +MB (longest prompt)"]
    rows = []
    for c in cells:
        pts = _ttft_points(c)
        longest = max((int(n) for n in c["generation"]["by_prompt_len"]), default=None)
        peak = c["generation"]["by_prompt_len"][str(longest)]["peak_rss_delta"] if longest else None
        rows.append([labelled(variants, c["variant"]), c["backend"], str(c["batch_size"])]
                    + [f"{pts[n]['p50']:.1f} ({pts[n]['p90']:.1f})" if n in pts else "–" for n in lens]
                    + [f"{peak / MB:.1f}" if peak is not None else "–"])
    return head, rows


def ttft_vs_prompt_len(results: dict, out: Path) -> Path | None:
    """TTFT p50 against prompt length per cell, with its p90 as a band: measured at each length."""
    cells = [c for c in generation_cells(results) if c["generation"].get("by_prompt_len")]
    if not cells:
        return None
    fig, ax = subplots(figsize=(8, 5))
    for c in cells:
        pts = sorted(_ttft_points(c).items())
        xs = [n for n, _ in pts]
        line, = ax.plot(xs, [v["p50"] for _, v in pts], marker="o", lw=1.2, label=f"{_label(c)} (batch {c['batch_size']})")
        ax.fill_between(xs, [v["p50"] for _, v in pts], [v["p90"] for _, v in pts], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("time to first token, ms (p50; band to p90)")
    ax.set_title("Time to first token against prompt length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, out / "ttft_vs_prompt_len.png")


OWN_FORMATS = ("torch", "onnx")  # a variant in another format is an engine's own artifact (a GGUF, an ORT GenAI folder)


def own_vs_engines(results: dict, batch: int = 1) -> tuple[list[str], tuple[list[str], list[list[str]]] | None]:
    """The workbench's fastest own generation cell (a torch or ONNX variant, its own graph and settings)
    against the fastest cell of an engine's own artifact (a GGUF made by llama.cpp's tools, an ORT GenAI
    folder made by its builder), at `batch`: per-token decode and TTFT, the paired speedup, and where both
    have ONNX Runtime op profiles, the op types that differ most, per generated token. ([], None) when the
    run has no such pair."""
    variants = {v["name"]: v for v in results["variants"]}
    cells = [c for c in generation_cells(results, batch) if c["status"] in ("ok", "unstable")]
    own = [c for c in cells if variants.get(c["variant"], {}).get("format") in OWN_FORMATS
           and variants.get(c["variant"], {}).get("parent")]  # the unquantized source is no "path"
    peers = [c for c in cells if variants.get(c["variant"], {}).get("format") not in OWN_FORMATS]
    if not own or not peers:
        return [], None
    mine = min(own, key=lambda c: c["latency_ms"]["p50"])
    best = min(peers, key=lambda c: c["latency_ms"]["p50"])
    m, b = mine["latency_ms"]["p50"], best["latency_ms"]["p50"]
    r = faster(mine, best)
    ratio = (f"{r[0]:.2f}x (95% CI {r[1]:.2f}–{r[2]:.2f}, paired by round)" if r else f"{b / m:.2f}x (one round: "
             "no interval)")
    unstable = [_label(c) for c in (mine, best) if c["status"] == "unstable"]
    lines = [f"The workbench's fastest own path, `{_label(mine)}`, decodes at {m:.2f} ms/token; the fastest engine's "
             f"own artifact, `{_label(best)}`, at {b:.2f} ms/token: the own path is {ratio} as fast per token"
             + (f" (unstable cells: {', '.join(unstable)}: the figure is indicative)" if unstable else "") + ". "
             f"Time to first token: {mine['generation']['ttft_ms']['p50']:.0f} ms against "
             f"{best['generation']['ttft_ms']['p50']:.0f} ms."]
    # Kernel by kernel against the fastest peer, or, where its engine has no op profiler (llama.cpp), the
    # fastest peer that has one (an ORT GenAI model runs ONNX Runtime's kernels, as the own path does).
    profiled = [c for c in peers if (c.get("profile") or {}).get("by_op_ms")]
    partner = best if best in profiled or not profiled else min(profiled, key=lambda c: c["latency_ms"]["p50"])
    pm, pb = (c.get("profile") or {} for c in (mine, partner))
    if not (pm.get("by_op_ms") and pb.get("by_op_ms")):
        why = [f"`{_label(c)}` has no op profile" + (f" ({p['error'][:120]})" if p.get("error") else "")
               for c, p in ((mine, pm), (partner, pb)) if not p.get("by_op_ms")]
        lines.append("No kernel-by-kernel comparison: " + "; ".join(why) + ".")
        return lines, None
    if partner is not best:
        lines.append(f"`{_label(best)}` has no op profile; kernel by kernel, the own path is set against "
                     f"`{_label(partner)}` ({partner['latency_ms']['p50']:.2f} ms/token), the fastest engine "
                     "artifact whose engine has one.")
    ops = set(pm["by_op_ms"]) | set(pb["by_op_ms"])
    diff = {op: pm["by_op_ms"].get(op, 0.0) - pb["by_op_ms"].get(op, 0.0) for op in ops}
    order = sorted(ops, key=lambda op: -abs(diff[op]))[:8]
    per = pm.get("per", "call")
    rows = [[op, f"{pm['by_op_ms'].get(op, 0.0):.3f}", f"{pb['by_op_ms'].get(op, 0.0):.3f}", f"{diff[op]:+.3f}"]
            for op in order]
    rows.append(["all ops", f"{pm['op_total_ms']:.3f}", f"{pb['op_total_ms']:.3f}",
                 f"{pm['op_total_ms'] - pb['op_total_ms']:+.3f}"])
    worst = max(ops, key=lambda op: diff[op])
    if diff[worst] > 0:
        lines.append(f"From the two ONNX Runtime profiles (ms per {per}): the own path's costliest excess is "
                     f"`{worst}`, {pm['by_op_ms'].get(worst, 0.0):.2f} against {pb['by_op_ms'].get(worst, 0.0):.2f} "
                     f"ms ({diff[worst]:+.2f} ms); the table lists the op types that differ most.")
    else:
        lines.append(f"From the two ONNX Runtime profiles (ms per {per}): no op type costs the own path more.")
    head = ["op type", f"{mine['variant']} ms", f"{partner['variant']} ms", "difference ms"]
    return lines, (head, rows)


def _four_bit_method(v: dict) -> str | None:
    """How a variant made its 4-bit weights, in words, when its last step is weight-only int4 of its
    parent's graph (None otherwise)."""
    step = (v.get("steps") or [{}])[-1]
    p = step.get("params") or {}
    if step.get("name") == "onnx-quantize" and p.get("mode") == "weight-only" and p.get("bits") == 4:
        algo = {None: "round-to-nearest (ORT's default)", "default": "round-to-nearest (ORT's default)",
                "rtn": "round-to-nearest (INC's RTN)", "hqq": "HQQ (half-quadratic, no data)",
                "gptq": f"GPTQ ({p.get('calibration_batches')} calibration batches)"}.get(p.get("algorithm"),
                                                                                       p.get("algorithm"))
        extra = ", embeddings too" if "Gather" in (p.get("op_types") or []) else ""
        return f"ORT MatMulNBits, {algo}, block {p.get('block_size')}{extra}"
    if step.get("name") == "nncf-compress-weights" and str(p.get("mode", "")).startswith("int4"):
        data = [m for m, on in (("AWQ", p.get("awq")), ("scale estimation", p.get("scale_estimation"))) if on]
        keep = "" if p.get("all_layers") else ", embeddings and output projection int8"
        return (f"NNCF {p['mode']}, {' + '.join(data) if data else 'data-free'}, group {p.get('group_size')}"
                f"{keep}" + (f", ratio {p['ratio']:g}" if p.get("ratio", 1) < 1 else ""))
    return None


def int4_by_method(results: dict, batch: int = 1) -> tuple[list[str], list[list[str]]] | None:
    """Every 4-bit weight-only variant made straight from the baseline, side by side: how its weights were
    made (round-to-nearest, HQQ, GPTQ, AWQ / scale estimation), its file, and, per backend that ran it,
    perplexity, KL and top-1 agreement against the fp32 model and per-token decode at `batch`. None when
    fewer than two such variants ran."""
    base = results["recipe"]["parsed"]["report"]["baseline"]
    variants = {v["name"]: v for v in results["variants"]}
    methods = {n: m for n, v in variants.items() if v.get("status") == "ok" and v.get("parent") == base
               and (m := _four_bit_method(v))}
    if len(methods) < 2:
        return None
    base_ppl = (variants.get(base, {}).get("accuracy") or {}).get("perplexity")
    head = ["variant", "how the 4-bit weights were made", "file MB", "backend", "perplexity", "vs baseline",
            "KL", "top-1 agree", f"decode ms/token p50 (batch {batch})"]
    rows = []
    for c in generation_cells(results, batch):
        if c["variant"] not in methods:
            continue
        acc = c.get("accuracy") or variants[c["variant"]].get("accuracy") or {}
        ppl = acc.get("perplexity")
        size = variants[c["variant"]].get("size_bytes")
        rows.append([c["variant"], methods[c["variant"]], f"{size / MB:.1f}" if size else "–", c["backend"],
                     f"{ppl:.2f}" if ppl is not None else "–",
                     f"{ppl / base_ppl - 1:+.2%}" if ppl is not None and base_ppl else "–",
                     f"{acc['kl']:.5f}" if "kl" in acc else "–",
                     f"{acc['top1_agreement']:.4f}" if "top1_agreement" in acc else "–",
                     f"{c['latency_ms']['p50']:.3f}"])
    rows.sort(key=lambda r: (r[3], float(r[6]) if r[6] != "–" else float("inf")))
    return (head, rows) if rows else None
