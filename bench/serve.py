"""One load-scenario cell, in its own process: `python -m bench.serve JOB.json`.

The job is a bench.cells job plus `scenario` (workbench.recipe.ScenarioSpec as a dict) and `log_dir`.
The process loads `streams` sessions of the artifact, the cell's threads split between them, and puts a
dynamic-batching SUT (bench.serving.Batcher) under MLCommons LoadGen. Its query sample library is the
job's `requests` (the task's evaluation rows, each at its own length: bench.requests), a batch padded
to its longest request, or with `batching: packed` their tokens one after another in one row; without
them (`inputs: synthetic`, or a task with no evaluation inputs) every request is the same synthetic
input of the cell's shape. Every shape a batch can take runs once before
any test (a static-shape engine compiles each then, not while a test is timing it). A causal LM's job also
has `prompts` (max_batch x prompt length) and `new_tokens`: then each request is one greedy generation
of `new_tokens` tokens, the requests batched together generate together (their decode steps are one
batch), and LoadGen measures token latencies (first token, time per output token) against the
scenario's `ttft_bound_ms` and `tpot_bound_ms`:

- single-stream: one query at a time; its latencies are the cell's samples (p90 is MLPerf's figure);
- offline: every query at once; samples/s is the figure;
- server: Poisson arrivals at a target QPS; the capacity search (bench.serving.capacity) finds the
  highest target whose percentile latency meets the bound by LoadGen's verdict, every step kept. The
  samples are the request latencies of the highest VALID step (or of the lowest step when none was).

LoadGen's logs of every test are kept under `log_dir`."""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

PACKED_TOLERANCE = 0.05  # of the largest answer: an int8 engine rounds a packed row's activations differently


def run(job: dict) -> dict:
    import numpy as np

    from bench.serving import Batcher, capacity, pick_batch, run_loadgen, stall, within_tokens
    from bench.worker import setup
    from core.backends import engine_kwargs
    from core.model import ModelIO
    from core.processes import memory_bytes

    backend, torch, threads = setup(job)
    sc = job["scenario"]
    streams, max_batch = int(sc["streams"]), int(sc["max_batch"])
    per_stream = max(1, threads // streams)
    if torch is not None:  # torch's pool is per process: its streams share it, each op using per_stream threads
        torch.set_num_threads(per_stream)
    io = ModelIO.from_json(job["io"])
    seq = int(job["seq_len"])

    max_tokens = int(sc.get("max_batch_tokens") or 0)
    by_length = sc.get("batching", "by-length") == "by-length"
    packed = sc.get("batching") == "packed"  # one row of the requests' own tokens (bench.requests.pack)
    if packed and not job.get("requests"):
        raise ValueError("batching: packed sends the task's own requests packed in one row: it needs inputs: task "
                         "and a task with evaluation inputs")

    def fits(n: int, width: int) -> bool:
        return within_tokens(n, width, max_tokens)

    rss_before = memory_bytes("VmRSS")
    started = time.time()
    t0 = time.perf_counter()
    n_new = int(job.get("new_tokens") or 0)
    if "prompts" in job:  # a causal LM: each request is a generation of the same synthetic prompt
        runners = [backend.load_generator(job["path"], per_stream, **engine_kwargs(backend, job))
                   for _ in range(streams)]
        prompts = np.asarray(job["prompts"], dtype=np.int64)
        batches = {n: (prompts[:n], np.ones_like(prompts[:n])) for n in range(1, max_batch + 1)}

        def call(s: int, samples: list, first=None) -> None:
            on_token = (lambda step: first() if step == 0 else None) if first is not None else None
            runners[s].generate(*batches[len(samples)], n_new, on_token=on_token)

        shapes = [(list(range(n)),) for n in range(1, max_batch + 1) if fits(n, seq)]
        requests, n_samples = {"source": "synthetic", "seq_len": seq}, int(sc["samples"])
        width_of = [seq]
    else:
        runners = [backend.load(job["path"], per_stream, **engine_kwargs(backend, job)) for _ in range(streams)]
        if job.get("requests"):  # the task's evaluation rows, each at its own length (bench.requests)
            from bench.requests import (collate, length, lengths_summary, pack, padded_length, padded_width, seq_axes,
                                        widths)
            from runtime.infer import load_batches

            rows, axes = load_batches(job["requests"]["path"]), seq_axes(io)
            pad, multiple, cap = job["requests"]["pad"], int(sc["pad_multiple"]), int(job["requests"]["cap"])
            tokens = lengths_summary(rows, axes)

            def batch(samples: list, width: int = 0) -> dict:
                picked = [rows[i % len(rows)] for i in samples]
                return pack(picked, axes, pad, multiple, width) if packed else \
                    collate(picked, axes, pad, multiple, width, cap)

            # Warm-up meets every shape a test can: each batch size at each padded length up to the longest
            # row, within the token cap; packed, one row at each padded length up to the most tokens a batch
            # can hold (the cap, or max_batch of the longest; the oldest request alone may pass the cap).
            if packed:
                most = max_batch * tokens["max"]
                if max_tokens:
                    most = max(min(max_tokens, most), tokens["max"])
                shapes = [(list(range(max_batch)), w) for w in range(multiple, padded_length(most, multiple) + 1,
                                                                     multiple)]
            else:
                shapes = [(list(range(n)), width) for n in range(1, max_batch + 1)
                          for width in (widths(range(1, tokens["max"] + 1), multiple, cap) if tokens else [0])
                          if fits(n, width)]
            requests = {"source": "task", "samples": len(rows), "pad_multiple": multiple, "tokens": tokens,
                        **({"packed": True} if packed else {})}

            def packed_error(runner) -> float:
                """The artifact's answers to requests packed in one row against each one's alone: a graph not
                made by pack-sequences answers one row for the lot, and is refused here, before any test."""
                together = list(range(min(max_batch, n_samples)))
                while len(together) > 1 and not fits_batch(together):
                    together.pop()
                out = runner.outputs(runner.prepare(batch(together)))
                alone = np.concatenate([runner.outputs(runner.prepare(collate([rows[i]], axes, pad, multiple,
                                                                              cap=cap)))
                                        for i in together])
                if out.shape != alone.shape:
                    raise ValueError(f"batching: packed: {len(together)} requests packed in one row got an answer of "
                                     f"shape {list(out.shape)}, not one row each ({list(alone.shape)}): the variant's "
                                     "model must be made by the pack-sequences step")
                worst = float(np.abs(out - alone).max())
                if worst > PACKED_TOLERANCE * max(float(np.abs(alone).max()), 1e-6):
                    raise ValueError(f"batching: packed: requests packed in one row got answers up to {worst:.3g} "
                                     "away from each one's alone on this engine: it does not honour the packed "
                                     "attention mask")
                return worst
            n_samples = len(rows)
            # Packed, a request's width is its own tokens: a batch costs their sum, padded once.
            width_of = [length(r, axes) if packed else padded_width(length(r, axes), multiple, cap) if tokens
                        else 0 for r in rows]
        else:  # synthetic inputs of the cell's shape: every request the same
            synthetic = {n: io.make(n, seq, seed=job.get("seed", 0)) for n in range(1, max_batch + 1)}

            def batch(samples: list, width: int = 0) -> dict:
                return synthetic[len(samples)]

            shapes = [(list(range(n)),) for n in range(1, max_batch + 1) if fits(n, seq)]
            requests, n_samples = {"source": "synthetic", "seq_len": seq}, int(sc["samples"])
            width_of = [seq]

        def call(s: int, samples: list, width: int = 0) -> None:
            # Collating the batch and handing it to the engine are part of serving it: inside the time.
            runners[s].call(runners[s].prepare(batch(samples, width)))
    load_s = time.perf_counter() - t0

    def fits_batch(samples: list) -> bool:
        """Whether the Batcher could form this batch under the token cap."""
        if packed:
            return len(samples) <= 1 or not max_tokens or sum(width(i) for i in samples) <= max_tokens
        return fits(len(samples), max(width(i) for i in samples))

    def timed(s: int, samples: list) -> float:
        t = time.perf_counter()
        call(s, samples)
        return (time.perf_counter() - t) * 1e3

    service_ms, after_idle, drained = {}, [], []
    draw = np.random.default_rng(int(job.get("seed", 0)))

    def warm(s: int) -> None:
        """On stream `s`'s own serving thread, before any test: every shape a batch can have, once (a
        static-shape engine compiles each here); then stream 0 times each batch size on requests drawn
        from the QSL, the mean of 5, and a long queue of them served in the Batcher's batches (where the
        capacity search starts)."""
        for shape in shapes:
            call(s, *shape)
        if s == 0 and packed:
            requests["packed_max_abs_diff"] = float(f"{packed_error(runners[0]):.3g}")
        if s == 0:
            for n in range(1, max_batch + 1):
                # Batches the token cap allows: n requests drawn at random, drawn again while they would pass it.
                drawn = [d for d in (draw.integers(0, n_samples, n).tolist() for _ in range(100))
                         if fits_batch(d)][:5]
                if drawn:
                    service_ms[n] = float(np.mean([timed(s, d) for d in drawn]))
            if max_batch > 1 and "prompts" not in job:
                # A long queue of requests drawn at random, served in the batches the Batcher would form from
                # it: what the server takes at saturation. Batches drawn to fit the token cap (above) are the
                # short ones and overstate it 2-3x, which cost every search an overloaded first test.
                queue = draw.integers(0, n_samples, 8 * max_batch).tolist()
                t = time.perf_counter()
                while queue:
                    picked, _ = pick_batch((width(i) for i in queue), max_batch, by_length, max_tokens, packed)
                    call(s, [queue[k] for k in picked])
                    for k in reversed(picked):
                        del queue[k]
                drained.append(8 * max_batch / (time.perf_counter() - t))
        # A request that arrives after the session sat idle: at low load most do, and on some machines (a
        # VM whose idle vCPU is descheduled, an engine whose worker threads went to sleep) it costs far
        # more than back to back. The report shows both, so a capacity below the arithmetic is explained.
        for _ in range(5 if s == 0 else 0):
            time.sleep(0.05)
            after_idle.append(timed(0, draw.integers(0, n_samples, 1).tolist()))

    def width(sample: int) -> int:
        return width_of[sample % len(width_of)]

    batcher = Batcher(call, max_batch, float(sc["max_wait_ms"]), streams, tokens=n_new, on_start=warm,
                      main_thread=True, width=width, by_length=by_length,
                      max_tokens=max_tokens, packed=packed)
    memory = {"peak_rss_delta": max(memory_bytes("VmHWM") - rss_before, 0), "rss_idle_baseline": rss_before}
    # A static-shape engine keeps one compiled model per shape: none may be compiled while a test times it.
    warmed = None if "prompts" in job else runners[0].compiled_shapes()  # generators take any shape
    requests["shapes_warmed"] = len(shapes)
    # What `streams` sessions could serve back to back (a long queue in the Batcher's batches; a generator's or
    # one request's at full batches): where the capacity search starts.
    estimate = streams * (drained[0] if drained else max(n / (service_ms[n] / 1e3) for n in service_ms))
    log_dir = Path(job["log_dir"]) / f"process-{os.getpid()}"  # one folder per round's process
    common = dict(samples=n_samples, min_duration_s=float(sc["min_duration_s"]),
                  min_queries=int(sc["min_queries"]), max_duration_s=float(sc["max_duration_s"]),
                  seed=int(job.get("seed", 0)), ttft_bound_ms=sc.get("ttft_bound_ms"),
                  tpot_bound_ms=sc.get("tpot_bound_ms"))
    out: dict = {"scenario": sc["type"], "service_ms": {str(k): round(v, 4) for k, v in service_ms.items()},
                 "service_after_idle_ms": round(sorted(after_idle)[2], 4),
                 "estimate_qps": round(estimate, 3), "requests": requests}
    try:
        if sc["type"] == "server":
            steps = iter(range(1000))

            def step(qps):
                r = run_loadgen(batcher, "server", log_dir / f"step-{next(steps)}", target_qps=qps,
                                latency_bound_ms=float(sc.get("latency_bound_ms") or 0),
                                percentile=float(sc["percentile"]), **common)
                r["target_qps"] = round(qps, 4)
                return r

            bound = sc.get("latency_bound_ms") or sc.get("ttft_bound_ms")
            found = capacity(step, estimate, max_steps=int(sc["max_steps"]),
                             floor_qps=int(sc["min_queries"]) / float(sc["max_duration_s"]),
                             disturbed=lambda r: stall(r["service_ms"], bound, r.get("stalled_ms", 0.0)))
            best = found["best"] or min(found["ladder"], key=lambda r: r["target_qps"])
            samples = best["latencies_ms"]
            out["server"] = {"max_qps": found["max_qps"], "valid": found["best"] is not None,
                             "latency_bound_ms": sc.get("latency_bound_ms"), "percentile": sc["percentile"],
                             "p99_ms": best["percentiles_ms"].get("99"),
                             "batch_histogram": best["batch_histogram"],
                             **_token_figures(best, sc),
                             "latency_rose_as_load_fell": found["latency_rose_as_load_fell"],
                             "retested": found["retested"], "ladder": [_rung(r) for r in found["ladder"]]}
        else:
            # Offline sizes its one query from the expected rate to last min_duration_s: a system faster than
            # expected ends early and is INVALID ("min duration not satisfied"), so it is told twice the
            # estimate (a run twice as long at worst).
            r = run_loadgen(batcher, sc["type"], log_dir / sc["type"], target_qps=2 * estimate,
                            latency_bound_ms=service_ms[1], **common)
            samples = r["latencies_ms"]
            key = "offline" if sc["type"] == "offline" else "single_stream"
            out[key] = {**_rung(r), "samples_per_s": r.get("samples_per_s") or r.get("qps_without_overhead")}
    finally:
        batcher.close()
    if warmed is not None:
        requests["static_shapes"] = {"after_warmup": warmed, "after_tests": runners[0].compiled_shapes()}
    return {"samples_ms": [round(x, 6) for x in samples], "warmup_ms": [], "capped_by_max_seconds": False,
            "started": round(started, 3), "memory": memory,
            "cold": {"load_s": round(load_s, 4), "first_call_ms": round(service_ms[1], 3),
                     "first_call_timed_ms": round(service_ms[1], 3)},
            "threads": {"requested": threads, "streams": streams, "per_stream": per_stream, **runners[0].info},
            "load": out}


def _token_figures(r: dict, sc: dict) -> dict:
    """A generation server's step: its first-token and per-output-token percentiles at the scenario's
    percentile, with their bounds, and the tokens/s it completed."""
    if "ttft_percentiles_ms" not in r:
        return {}
    key = f"{float(sc['percentile']):g}"
    return {"ttft_bound_ms": sc.get("ttft_bound_ms"), "tpot_bound_ms": sc.get("tpot_bound_ms"),
            "ttft_ms": r["ttft_percentiles_ms"].get(key), "tpot_ms": r.get("tpot_percentiles_ms", {}).get(key),
            "tokens_per_s": r.get("tokens_per_s")}


def _rung(r: dict) -> dict:
    """One LoadGen test as results.json keeps it: its verdict, rates, percentiles and batches."""
    p = r["percentiles_ms"]
    tokens = {"tokens_per_s": r["tokens_per_s"]} if r.get("tokens_per_s") is not None else {}
    if "ttft_percentiles_ms" in r:  # a generation server: the token latencies LoadGen judged
        tokens.update(ttft_p99_ms=r["ttft_percentiles_ms"].get("99"),
                      tpot_p99_ms=r.get("tpot_percentiles_ms", {}).get("99"))
    return {"target_qps": r.get("target_qps"), "result": r["result"], "valid": r["valid"],
            "achieved_qps": r.get("completed_per_s") or r.get("samples_per_s"),
            "p50_ms": p.get("50"), "p90_ms": p.get("90"), "p99_ms": p.get("99"), **tokens,
            "queries": len(r["latencies_ms"]), "batch_histogram": r["batch_histogram"], "problems": r["problems"],
            # The SUT's own view, beside LoadGen's: request p99 from its arrival here (LoadGen counts from the
            # scheduled arrival: a gap between the two is time before the request reached the server), the
            # slowest call and the longest the server sat with a batch due (bench.serving.stall).
            "server_p99_ms": _percentile(r["latencies_ms"], 99),
            "slowest_call_ms": round(max(r.get("service_ms") or [0.0]), 3),
            "stalled_ms": round(r.get("stalled_ms", 0.0), 3),
            "log": Path(r["log_dir"]).name, **({"disturbed": r["disturbed"]} if r.get("disturbed") else {})}


def _percentile(values: list, q: float) -> Optional[float]:
    import numpy as np

    return round(float(np.percentile(values, q)), 3) if values else None


def merge(processes: list[dict]) -> dict:
    """A scenario cell's figures over its processes (one per round): the capacity is the median of the
    processes' own, with their spread; a cell is VALID only when every process found a VALID target."""
    import numpy as np

    first = processes[0]["load"]
    out = {"scenario": first["scenario"], "service_ms": first["service_ms"], "estimate_qps": first["estimate_qps"],
           "service_after_idle_ms": first.get("service_after_idle_ms"), "requests": first.get("requests")}
    if "server" in first:
        qps = [p["load"]["server"]["max_qps"] for p in processes]
        found = [q for q in qps if q is not None]
        out["server"] = {**first["server"], "max_qps": float(np.median(found)) if found else None,
                         "max_qps_by_round": qps, "valid": all(q is not None for q in qps),
                         "ladder_by_round": [p["load"]["server"]["ladder"] for p in processes],
                         "latency_rose_as_load_fell_by_round": [
                             bool(p["load"]["server"].get("latency_rose_as_load_fell")) for p in processes],
                         "retested_by_round": [p["load"]["server"].get("retested", 0) for p in processes]}
        out["server"].pop("latency_rose_as_load_fell", None)
        out["server"].pop("retested", None)
        rates = [p["load"]["server"].get("tokens_per_s") for p in processes if p["load"]["server"]["max_qps"]]
        if "tokens_per_s" in first["server"]:  # a generation server: tokens/s at the bound, as the capacity
            out["server"]["tokens_per_s"] = float(np.median(rates)) if rates else None
            out["server"]["tokens_per_s_by_round"] = [p["load"]["server"].get("tokens_per_s") for p in processes]
        del out["server"]["ladder"]
    for key in ("offline", "single_stream"):
        if key in first:
            rates = [p["load"][key]["samples_per_s"] for p in processes]
            out[key] = {**first[key], "samples_per_s": float(np.median(rates)), "samples_per_s_by_round": rates,
                        "valid": all(p["load"][key]["valid"] for p in processes)}
            if "tokens_per_s" in first[key]:  # a causal LM's: tokens/s, median over rounds too
                out[key]["tokens_per_s"] = float(np.median([p["load"][key]["tokens_per_s"] for p in processes]))
    return out


def _rates(load: dict) -> tuple[list, str]:
    """The rate a merged load cell found in each round (None: no VALID target), and what it is."""
    server = load.get("server")
    if server:
        return server.get("max_qps_by_round") or [], "capacities"
    key = "offline" if "offline" in load else "single_stream"
    return (load.get(key) or {}).get("samples_per_s_by_round") or [], "samples/s"


def stability(load: dict, threshold: float) -> dict:
    """A merged load cell's `stability` record: what it is judged on, its rounds' spread, the threshold."""
    rates, what = _rates(load)
    found = [q for q in rates if q]
    spread = (max(found) - min(found)) / statistics.median(found) if len(found) > 1 else None
    return {"judged_on": f"the rounds' {what}", "spread": None if spread is None else round(spread, 4),
            "threshold": threshold}


def unstable_reason(load: dict, threshold: float) -> Optional[str]:
    """Why a merged load cell is unstable, or None. Its figure is a rate found once per round (a capacity,
    samples/s), so its stability is that figure's spread over the rounds: a request's latency under a
    queue swings with the queue by design, and windows of it disagree at any load worth testing."""
    rates, what = _rates(load)
    if any(q is None for q in rates) and any(q is not None for q in rates):
        return "a round found no VALID target where another found one"
    spread = stability(load, threshold)["spread"]
    if spread is not None and spread > threshold:
        return f"the {len([q for q in rates if q])} rounds' {what} spread {spread:.1%} (threshold {threshold:.0%})"
    return None


def main() -> int:
    from bench.worker import serve

    return serve(run)


if __name__ == "__main__":
    sys.exit(main())
