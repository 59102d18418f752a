"""The report's "Under load" part, from results.json's `load` cells alone (bench.serve under LoadGen):
a capacity table (the highest QPS whose percentile latency meets the bound, by LoadGen's VALID verdict,
over rounds; offline and single-stream rates), how many machines a target load needs, and the
p99-against-QPS curves of every server cell with the bound drawn. A causal LM's server cells serve
generations: their bounds are on the first token and on each later one (LoadGen's token latencies),
and tokens/s at the capacity stands beside it."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from reporting.analysis import bound_text, is_reference, labelled
from reporting.figures import save, subplots


def load_cells(results: dict) -> list[dict]:
    return results.get("load") or []


def _fmt(x, nd: int = 1) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _generation(results: dict) -> bool:
    return any("new_tokens" in (c.get("shape") or {}) for c in load_cells(results))


def capacity_table(results: dict) -> tuple[list[str], list[list[str]]]:
    target = ((results.get("recipe") or {}).get("parsed") or {}).get("report", {}).get("target_qps")
    gen = _generation(results)
    head = ["variant", "backend", "scenario", "max batch / wait ms / streams",
            ("1 generation" if gen else "1 request") + " ms: back to back / after 50 ms idle",
            "capacity QPS (by round)",
            "TTFT / TPOT p99 ms at capacity" if gen else "p99 ms at capacity",
            "tokens/s at capacity" if gen else "samples/s", "LoadGen", "batches at capacity"] + (
        [f"machines for {target:g} QPS"] if target else [])
    rows = []
    variants = {v["name"]: v for v in results.get("variants") or []}
    for c in load_cells(results):
        s = c.get("settings") or {}
        shape = serving_shape(s)
        name = labelled(variants, c["variant"])  # a reference (an engine's own defaults) says it is one
        load = c.get("load") or {}
        if c["status"] not in ("ok", "unstable") or not load:
            rows.append([name, c["backend"], c["scenario"], shape, "–", "–", "–", "–", c["status"],
                         c.get("reason") or ""] + (["–"] if target else []))
            continue
        one = f"{_fmt((load.get('service_ms') or {}).get('1'), 2)} / {_fmt(load.get('service_after_idle_ms'), 2)}"
        server = load.get("server")
        rate = load.get("offline") or load.get("single_stream") or {}
        if server:
            by_round = ", ".join(_fmt(q) for q in server.get("max_qps_by_round", []))
            cap = (f"{_fmt(server['max_qps'])} ({by_round})" if server["max_qps"] is not None
                   else f"none valid ({by_round})")
            if c["status"] == "unstable":  # the rounds disagree: the median alone would overstate what is known
                cap += f"; unstable: {c.get('reason')}"
            verdict = "VALID" if server["valid"] else "INVALID in a round: " + why_invalid(server, s)
            retested = sum(server.get("retested_by_round") or [])
            if retested:  # bench.serving.stall: a test with one call 10x its peers was run again
                verdict += f" ({retested} stalled test{'s' if retested > 1 else ''} re-tested)"
            hist = ", ".join(f"{k}×{v}" for k, v in (server.get("batch_histogram") or {}).items())
            machines = (str(math.ceil(target / server["max_qps"])) if server["max_qps"] else "–") if target else None
            if gen:
                tail = f"{_fmt(server.get('ttft_ms'), 1)} / {_fmt(server.get('tpot_ms'), 2)}"
                rate_at = _fmt(server.get("tokens_per_s"))
            else:
                tail, rate_at = _fmt(server.get("p99_ms"), 2), "–"
            rows.append([name, c["backend"], c["scenario"], shape, one, cap, tail, rate_at,
                         verdict, hist] + ([machines] if target else []))
        else:
            rows.append([name, c["backend"], c["scenario"], shape, one, "–",
                         "–" if gen else _fmt(rate.get("p99_ms"), 2),
                         _fmt(rate.get("tokens_per_s") if gen else rate.get("samples_per_s")),
                         "VALID" if rate.get("valid") else "INVALID",
                         ", ".join(f"{k}×{v}" for k, v in (rate.get("batch_histogram") or {}).items())]
                        + (["–"] if target else []))
    return head, rows


def _bound_key(settings: dict) -> tuple:
    """Server cells are compared only at the same bound."""
    return tuple(settings.get(k) for k in ("percentile", "latency_bound_ms", "ttft_bound_ms", "tpot_bound_ms"))


def _label(c: dict) -> str:
    return f"`{c['variant']}` on {c['backend']} ({c['scenario']})"


def _ratio(a: dict, b: dict) -> dict:
    """a's capacity over b's, and the same ratio round by round (the rounds ran interleaved, so round i of
    both cells met the same machine): a median alone would hide two rounds that disagree."""
    sa, sb = a["load"]["server"], b["load"]["server"]
    pairs = [x / y for x, y in zip(sa.get("max_qps_by_round") or [], sb.get("max_qps_by_round") or [])
             if x and y]
    return {"ratio": sa["max_qps"] / sb["max_qps"], "by_round": pairs}


def ratio_text(r: dict) -> str:
    text = f"**{r['ratio']:.2f}x**"
    if len(r["by_round"]) > 1:
        text += f" (round by round: {', '.join(f'{x:.2f}x' for x in r['by_round'])})"
    return text


def serving_ratios(results: dict) -> list[dict]:
    """The capacity table's verdicts as ratios, each at one bound: what dynamic batching gave a variant on a
    backend over serving it one request per call (`batching`), and the highest capacity against the
    baseline's best (`vs_baseline`) and against the best reference, an engine's own defaults
    (`vs_reference`; `reference_leads` when a reference serves as much or more). Each record names its two
    cells (`top`, `under`: label and QPS) and has the ratio with its rounds'. A cell counts only with a
    VALID capacity. `workbench compare` matches these between two runs."""
    variants = {v["name"]: v for v in results.get("variants") or []}
    refs = {name for name in variants if is_reference(variants, name)}
    baseline = (((results.get("recipe") or {}).get("parsed") or {}).get("report") or {}).get("baseline")
    groups: dict[tuple, list[dict]] = {}
    for c in load_cells(results):
        server = (c.get("load") or {}).get("server")
        if c.get("status") in ("ok", "unstable") and server and server.get("max_qps"):
            groups.setdefault(_bound_key(c.get("settings") or {}), []).append(c)
    out = []

    def qps(c):
        return c["load"]["server"]["max_qps"]

    def cell(c):
        return {"label": _label(c), "scenario": c["scenario"], "qps": qps(c)}

    def record(kind, bound, top, under, **more):
        return {"kind": kind, "bound": bound, "top": cell(top), "under": cell(under), **_ratio(top, under), **more}

    for cells in groups.values():
        bound = bound_text(cells[0]["load"]["server"])
        for c in cells:
            s = c.get("settings") or {}
            if (s.get("max_batch") or 1) <= 1:
                continue
            single = [o for o in cells if (o["variant"], o["backend"]) == (c["variant"], c["backend"])
                      and (o.get("settings") or {}).get("max_batch", 1) == 1
                      and (o.get("settings") or {}).get("streams") == s.get("streams")]
            if single:
                out.append(record("batching", bound, c, max(single, key=qps)))
        ours = [c for c in cells if c["variant"] not in refs]
        if not ours:
            continue
        best = max(ours, key=qps)
        base = [c for c in cells if c["variant"] == baseline and c is not best]
        if base:
            out.append(record("vs_baseline", bound, best, max(base, key=qps)))
        ref = [c for c in cells if c["variant"] in refs]
        if ref:
            r = max(ref, key=qps)
            out.append(record("vs_reference", bound, r, best, reference_leads=True) if qps(r) >= qps(best)
                       else record("vs_reference", bound, best, r, reference_leads=False))
    return out


def serving_verdicts(results: dict) -> list[str]:
    """serving_ratios in words: one line per batching gain, one per bound for the highest capacity against
    the baseline's and the engines' defaults. A reference that serves the most is said, not hidden."""
    ratios = serving_ratios(results)
    lines = []
    for r in ratios:
        if r["kind"] == "batching":
            top, under = r["top"], r["under"]
            lines.append(f"Dynamic batching, {top['label']}: {top['qps']:.1f} QPS at {r['bound']} against "
                         f"{under['qps']:.1f} served one request per call ({under['scenario']}): {ratio_text(r)}.")
    for bound in dict.fromkeys(r["bound"] for r in ratios if r["kind"] != "batching"):
        best = [r for r in ratios if r["bound"] == bound and r["kind"] != "batching"]
        parts, head = [], None
        for r in best:
            if r["kind"] == "vs_baseline":
                head = r["top"]
                parts.append(f"{ratio_text(r)} the baseline's best, {r['under']['label']} at "
                             f"{r['under']['qps']:.1f} QPS")
            elif r["reference_leads"]:
                head = head or r["under"]
                parts.append(f"but the engines' own defaults serve as much or more: {r['top']['label']} at "
                             f"{r['top']['qps']:.1f} QPS, {ratio_text(r)} the best of this recipe's variants")
            else:
                head = head or r["top"]
                parts.append(f"{ratio_text(r)} the best reference (an engine's own defaults), {r['under']['label']} "
                             f"at {r['under']['qps']:.1f} QPS")
        lines.append(f"Highest capacity at {bound}: {head['label']}, {head['qps']:.1f} QPS; " + "; ".join(parts)
                     + ".")
    return lines


def serving_shape(settings: dict) -> str:
    """'max batch / wait ms / streams', and how a batch picks its requests where it takes more than one."""
    shape = f"{settings.get('max_batch')} / {settings.get('max_wait_ms')} / {settings.get('streams')}"
    if (settings.get("max_batch") or 1) > 1:
        shape += {"by-length": ", by length", "fifo": ", first in first out",
                  "packed": ", packed in one row"}[settings.get("batching", "by-length")]
        if settings.get("max_batch_tokens"):
            shape += f", ≤ {settings['max_batch_tokens']} tokens"
    return shape


def why_invalid(server: dict, settings: dict) -> str:
    """Why a round found no VALID target, from LoadGen's own words at the lowest target it tried: the
    percentile latency over the bound, early stopping short of queries, and the floor below which no
    target is tried (one that could not reach min_queries within max_duration_s)."""
    rose = server.get("latency_rose_as_load_fell_by_round") or []
    for i, ladder in enumerate(server.get("ladder_by_round") or []):
        if not ladder or any(r["valid"] for r in ladder):
            continue
        if i < len(rose) and rose[i]:
            steps = sorted(ladder, key=lambda r: r["target_qps"])[:2]
            return (f"latency rose as the load fell (p99 {_fmt(steps[0].get('p99_ms'))} ms at "
                    f"{steps[0]['target_qps']:.1f} QPS against {_fmt(steps[1].get('p99_ms'))} ms at "
                    f"{steps[1]['target_qps']:.1f} QPS): a request that finds the session idle costs more "
                    "here, so lower targets were not tried; the bound is not met at any rate this machine "
                    "showed, and the idle cost is the thing to fix")
        low = min(ladder, key=lambda r: r["target_qps"])
        if low.get("ttft_p99_ms") is not None:
            said = f"TTFT p99 {_fmt(low['ttft_p99_ms'])} ms, TPOT p99 {_fmt(low.get('tpot_p99_ms'), 2)} ms"
        else:
            said = f"p99 {_fmt(low.get('p99_ms'))} ms against {settings.get('latency_bound_ms')} ms"
        more = next((p.strip("* ,") for p in low.get("problems") or [] if "more queries" in p), None)
        if more:
            said += f"; LoadGen's early stopping: {more.lower()}"
        floor = (settings.get("min_queries") or 0) / (settings.get("max_duration_s") or 1)
        return (f"at the lowest target tried, {low['target_qps']:.1f} QPS, {said} (no target under {floor:.1f} QPS "
                "is tried: it could not reach min_queries within max_duration_s)")
    return "see the ladder in results.json"


def requests_note(results: dict) -> str:
    """What the load cells' requests held: the task's evaluation rows at their own lengths, or one synthetic input."""
    seen = {}
    for c in load_cells(results):
        r = (c.get("load") or {}).get("requests")
        if r:
            seen.setdefault(r["source"], r)
    parts = []
    if "task" in seen:
        r, t = seen["task"], seen["task"].get("tokens") or {}
        parts.append(f"Requests are the task's evaluation inputs, {r['samples']} rows, LoadGen choosing which row "
                     "each request sends" + (
                         f"; each at its own length (tokens: median {t['p50']:g}, p90 {t['p90']:g}, longest "
                         f"{t['max']}), a batch padded to its longest request rounded up to a multiple of "
                         f"{r['pad_multiple']}." if t else "."))
    if "synthetic" in seen:
        parts.append(f"{'Some cells send' if 'task' in seen else 'Every request is'} one synthetic input of "
                     f"{seen['synthetic'].get('seq_len')} tokens (`inputs: synthetic`, a task without evaluation "
                     f"inputs, or a causal LM's prompt).")
    return " ".join(parts)


def load_note(results: dict) -> str:
    requests = requests_note(results)
    return ("Each load cell runs a serving SUT under MLCommons LoadGen in its own process, once per round: requests "
            "wait in one queue; `streams` sessions (the cell's threads split between them) each take up to "
            "`max_batch` waiting requests, waiting at most `max_wait_ms` for a batch to fill; by length (the "
            "default `batching`), a batch takes the oldest request and the waiting ones no longer than it, and "
            "`max_batch_tokens` stops a batch before it would pass that many padded tokens; packed (`batching: "
            "packed`, a variant made with pack-sequences), a batch is the oldest requests' own tokens one after "
            "another in one row, padded once. A server cell's "
            "capacity is the highest target QPS (Poisson arrivals) whose percentile latency meets the bound by "
            "LoadGen's own verdict, which also requires its minimum duration, query count and early-stopping test; "
            "the ladder of targets tried is in results.json and LoadGen's logs under `loadgen/`. The capacity is "
            "the median over rounds. Offline sends every query at once (samples/s); single-stream one at a time. "
            "A request that finds the session idle can cost far more than one back to back (sleeping engine "
            "threads, a VM's idle vCPU): the table shows both, and at a tight bound that, not the queue, can "
            "decide the capacity."
            + (" A causal LM's requests are generations of `bench.new_tokens` tokens: requests batched together "
               "prefill and decode together, their first tokens answered as the batch's first step ends; LoadGen "
               "holds the time to first token (TTFT) and the time per output token after it (TPOT) to the "
               "scenario's `ttft_bound_ms` / `tpot_bound_ms` at its percentile, and tokens/s is what the highest "
               "VALID target completed." if _generation(results) else "")
            + (" " + requests if requests else ""))


def p99_vs_qps(results: dict, out: Path) -> Optional[Path]:
    """p99 latency against the target QPS of every server cell's ladder (first round), the bound drawn;
    a generation server's TTFT and TPOT p99, each against its bound."""
    servers = [c for c in load_cells(results) if (c.get("load") or {}).get("server")]
    if not servers:
        return None
    if _generation(results):
        return _token_latencies_vs_qps(servers, out)
    fig, ax = subplots(figsize=(7, 4.2))
    _ladder_panel(ax, servers, "p99_ms", "latency_bound_ms", "p99 latency, ms (log)")
    ax.set_title("Under load: p99 against offered QPS (x: INVALID by LoadGen)")
    ax.legend(fontsize=7, loc="upper left")
    return save(fig, out / "load_p99_vs_qps.png")


def _token_latencies_vs_qps(servers: list[dict], out: Path) -> Optional[Path]:
    fig, axes = subplots(1, 2, figsize=(10, 4.2))
    drawn = [_ladder_panel(axes[0], servers, "ttft_p99_ms", "ttft_bound_ms", "time to first token p99, ms (log)"),
             _ladder_panel(axes[1], servers, "tpot_p99_ms", "tpot_bound_ms", "time per output token p99, ms (log)")]
    if not any(drawn):
        return None
    axes[0].set_title("Under load: generations (x: INVALID by LoadGen)", fontsize=9)
    axes[0].legend(fontsize=7, loc="upper left")
    return save(fig, out / "load_p99_vs_qps.png")


def _ladder_panel(ax, servers: list[dict], key: str, bound_key: str, ylabel: str) -> bool:
    """One latency figure (`key` of each ladder step) against the target QPS of every server cell's first
    round, INVALID steps crossed, each cell's bound (`bound_key`) drawn; False when no step had it."""
    bounds, drawn = set(), False
    for c in servers:
        s = c["load"]["server"]
        ladder = sorted((r for r in (s.get("ladder_by_round") or [[]])[0] if r.get(key) is not None),
                        key=lambda r: r["target_qps"])
        if not ladder:
            continue
        drawn = True
        line, = ax.plot([r["target_qps"] for r in ladder], [r[key] for r in ladder], marker="o",
                        label=f"{c['variant']} · {c['backend']} · {c['scenario']}")
        bad = [r for r in ladder if not r["valid"]]
        ax.scatter([r["target_qps"] for r in bad], [r[key] for r in bad], marker="x", color=line.get_color(),
                   zorder=3)
        if s.get(bound_key):
            bounds.add(s[bound_key])
    for b in bounds:
        ax.axhline(b, color="black", linestyle="--", linewidth=1)
        ax.annotate(f"bound {b:g} ms", (ax.get_xlim()[0], b), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("target QPS (Poisson arrivals)")
    ax.set_ylabel(ylabel)
    return drawn
