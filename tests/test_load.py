"""Load scenarios under MLCommons LoadGen: a SUT that sleeps a known time gives the capacity and rate
that queueing arithmetic predicts, an overloaded target is INVALID rather than a number, and a small
real model runs through every scenario in a recipe, its report saying what LoadGen found; a tiny
causal LM serves generations under LoadGen's token latencies (first token, time per output token)."""
from __future__ import annotations

import collections
import json
import time

import numpy as np

import pytest

pytest.importorskip("mlperf_loadgen")

# Judges timing (latencies, capacities, a run's progress when a signal lands): run alone, after the rest
# (make test), never beside another test.
pytestmark = pytest.mark.serial

from bench.serving import Batcher, capacity, early_stopping_queries, run_loadgen  # noqa: E402
from conftest import make_tiny_causal_lm, the_run_dir, write_yaml  # noqa: E402
from workbench.cli import main  # noqa: E402


def queue_capacity(service_s, bound_s: float, percentile: float, seed: int = 0) -> float:
    """Queueing arithmetic: the highest Poisson arrival rate at which one server whose service times are
    drawn from `service_s` keeps the given percentile of the time in system (wait + service) within
    the bound: M/G/1 by Lindley's recursion (each request starts when it arrives or when the one before
    it is done), over 20,000 arrivals, bisected on the rate."""
    service_s = np.asarray(service_s)

    def tail(lam):
        rng = np.random.default_rng(seed)
        arrive = np.cumsum(rng.exponential(1 / lam, 20000))
        serve = rng.choice(service_s, arrive.size)
        done, t = np.empty_like(arrive), 0.0
        for i in range(arrive.size):
            t = max(t, arrive[i]) + serve[i]
            done[i] = t
        return np.percentile(done - arrive, percentile)

    lo, hi = 0.0, 0.9999 / service_s.mean()
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) <= bound_s else (lo, mid)
    return lo


class Sleeper:
    """A session whose batch of n requests costs `fixed + per_item * n` seconds of sleep, whatever they ask for."""

    def __init__(self, fixed: float, per_item: float = 0.0):
        self.fixed, self.per_item, self.took = fixed, per_item, []

    def __call__(self, stream: int, samples: list) -> None:
        t0 = time.perf_counter()
        time.sleep(self.fixed + self.per_item * len(samples))
        self.took.append(time.perf_counter() - t0)


def _sleeper_capacity(tmp_path) -> tuple[dict, float]:
    """LoadGen's capacity search on a SUT that sleeps 4 ms per request, and what M/G/1 arithmetic predicts
    from the SUT's own service times."""
    batcher = Batcher(Sleeper(0.004), max_batch=1, max_wait_ms=0, streams=1)
    steps, service = iter(range(100)), []

    def step(qps):
        r = run_loadgen(batcher, "server", tmp_path / f"step-{next(steps)}", samples=16, target_qps=qps,
                        latency_bound_ms=100, percentile=99, min_duration_s=4, min_queries=600)
        service.extend(r["service_ms"])
        return r

    try:
        found = capacity(step, estimate_qps=230, max_steps=9, precision=0.03)
    finally:
        batcher.close()
    # The SUT's own service times (a 4 ms sleep, its jitter and the answer to LoadGen) fed to M/G/1. LoadGen's
    # early stopping asks the bound to hold with confidence over the ~800 queries it saw: about the 99.5th
    # percentile, so the prediction is taken between the 99th's and the 99.5th's.
    s = np.asarray(service) / 1e3
    return found, (queue_capacity(s, 0.100, 99) + queue_capacity(s, 0.100, 99.5)) / 2


@pytest.mark.slow
def test_server_capacity_matches_queueing_arithmetic_within_10_percent(tmp_path):
    # On a shared 2-vCPU VM the found capacity sat 5-7 % under the prediction in most searches, and 11-13 %
    # in searches whose service times ran slow (mean 4.3-4.5 ms against 4.2: correlated slow periods that
    # iid service times do not model): as the benchmark re-measures a disturbed cell, a search outside the
    # tolerance is run again, at most twice more, and every try is in the failure message.
    tries = []
    for attempt in range(3):
        found, predicted = _sleeper_capacity(tmp_path / f"try-{attempt}")
        assert found["max_qps"] is not None, found["ladder"]
        tries.append((found["max_qps"], predicted))
        if abs(found["max_qps"] / predicted - 1) <= 0.10:
            break
    assert abs(found["max_qps"] / predicted - 1) <= 0.10, tries
    # Every step is kept; the one above the capacity was INVALID by LoadGen's own verdict.
    assert any(not r["valid"] and r["target_qps"] > found["max_qps"] for r in found["ladder"])


@pytest.mark.slow
def test_an_overloaded_target_is_invalid_and_offline_rate_is_batch_over_service_time(tmp_path):
    batcher = Batcher(Sleeper(0.010), max_batch=8, max_wait_ms=1, streams=1)
    try:
        # 8 requests per 10 ms batch: at most ~800 requests/s. 3,000 QPS cannot meet a 30 ms bound.
        over = run_loadgen(batcher, "server", tmp_path / "over", samples=16, target_qps=3000, latency_bound_ms=30,
                           min_duration_s=2, min_queries=200)
        offline = run_loadgen(batcher, "offline", tmp_path / "offline", samples=16, target_qps=800,
                              min_duration_s=2, min_queries=400)
    finally:
        batcher.close()
    assert over["result"] == "INVALID" and not over["valid"]
    assert over["percentiles_ms"]["99"] > 30
    assert (tmp_path / "over" / "mlperf_log_summary.txt").exists()  # LoadGen's own log is kept
    # Offline: every query at once, so batches are full: the rate is 8 / 10 ms.
    assert offline["valid"] and abs(offline["samples_per_s"] / 800 - 1) <= 0.10, offline["samples_per_s"]
    assert max(int(k) for k in offline["batch_histogram"]) == 8


def test_a_capacity_search_with_no_valid_target_reports_none():
    ladder = []

    def never(qps):
        ladder.append(qps)
        return {"valid": False, "target_qps": qps}

    found = capacity(never, estimate_qps=100, max_steps=4)
    assert found["max_qps"] is None and found["best"] is None and len(found["ladder"]) == 4
    assert ladder == [50, 25, 12.5, 6.25]  # it falls by 2x looking for a valid target
    # Down to the floor (the lowest target that can reach min_queries within max_duration_s) itself, not below.
    ladder.clear()
    assert capacity(never, estimate_qps=100, max_steps=8, floor_qps=20)["max_qps"] is None
    assert ladder == [50, 25, 20]
    # A machine where a request that finds the session idle costs more: p99 rises as the load falls, and the
    # search stops falling and says so (the measured case: 42 ms at 24.8 QPS, 49 ms at 12.4, 107 ms at 6.2).
    tried = []

    def idle_costs(qps):
        tried.append(qps)
        return {"valid": False, "target_qps": qps, "percentiles_ms": {"99": 40 + 600 / qps}}

    found = capacity(idle_costs, estimate_qps=100, max_steps=8)
    assert found["max_qps"] is None and found["latency_rose_as_load_fell"] and tried == [50, 25]


def test_a_stalled_invalid_test_is_run_again_and_the_search_goes_on_from_the_second_verdict():
    from bench.serving import RETESTS, stall

    # What a 2-vCPU VM did to a batch-1 search: at 307 QPS one call took 190 ms (2.4 ms its median) and p99
    # read 188 ms, where 292 QPS had read 13 ms; without a re-test the search never went above 307 again.
    why = stall([2.4] * 1500 + [190.0], 50)
    assert why and "190 ms, 79x the test's median call" in why
    assert stall([2.4] * 1500 + [20.0], 50) is None  # over 8x, but under a quarter of the bound: the queue's
    assert stall([2.4] * 1500 + [20.0], 1000) is None and stall([], 50) is None
    tried, stalled = [], {300.0}

    def step(qps):  # capacity 400: VALID up to it; one stall at 300, the first time only
        tried.append(qps)
        hit = qps in stalled
        stalled.discard(qps)
        return {"valid": qps <= 400 and not hit, "target_qps": qps, "service_ms": [2.4] * 99 + [190.0 if hit else 3.0]}

    found = capacity(step, estimate_qps=400, max_steps=6, precision=0.01,
                     disturbed=lambda r: stall(r["service_ms"], 50))
    assert tried[:3] == [200, 300, 300] and found["retested"] == 1  # run again at the same target, not counted
    assert len(found["ladder"]) == 7 and 380 < found["max_qps"] <= 400
    assert "a stall of the machine" in found["ladder"][1]["disturbed"] and "disturbed" not in found["ladder"][2]
    # A test that misses again stands INVALID, and re-tests are bounded.
    always = capacity(lambda q: {"valid": False, "target_qps": q, "service_ms": [2.0] * 50 + [300.0]},
                      estimate_qps=400, max_steps=3, disturbed=lambda r: stall(r["service_ms"], 50))
    assert always["max_qps"] is None and always["retested"] == RETESTS and len(always["ladder"]) == 3 + RETESTS


def test_a_server_that_sits_with_a_batch_due_is_a_stall_the_service_times_do_not_show():
    from bench.serving import stall

    batcher = Batcher(lambda stream, samples: time.sleep(0.002), max_batch=1, max_wait_ms=0, streams=1)
    try:
        batcher.submit([0])
        time.sleep(0.05)
        assert batcher.stalled_ms < 20  # a free stream starts a due batch at once
        with batcher.cond:  # the serving thread cannot run (as if the machine paused it) with a request due
            batcher.submit([1])
            time.sleep(0.2)
        time.sleep(0.05)
        assert 150 < batcher.stalled_ms < 1000, batcher.stalled_ms
        why = stall(batcher.busy_ms, 50, batcher.stalled_ms)
        assert why and why.startswith("the server sat") and "batch due" in why
        assert stall(batcher.busy_ms, 50) is None  # every call took its 2 ms
        batcher.reset()
        assert batcher.stalled_ms == 0.0
    finally:
        batcher.close()


def _recipe(**bench) -> dict:
    return {
        "name": "digits-load",
        "model": {"source": "builtin", "name": "digits-cnn"},
        "task": {"type": "classification", "data": {"source": "builtin", "name": "digits"}},
        "variants": {"baseline": {}},
        "export": {"formats": ["onnx"]},
        "bench": {"backends": ["ort-cpu"], "batch_sizes": [1], "repeats": 2,
                  "timing": {"warmup": 2, "min_iters": 5, "min_seconds": 0.05, "stability_threshold": 100.0},
                  "scenarios": [
                      {"type": "single-stream"},
                      {"type": "offline", "max_batch": 8},
                      {"type": "server", "latency_bound_ms": 20, "max_batch": 4, "max_wait_ms": 1, "max_steps": 4},
                  ], **bench},
        "report": {"target_qps": 5000},
    }


@pytest.mark.slow
def test_a_small_model_runs_through_every_scenario_in_a_recipe(tmp_path):
    spec = _recipe()
    spec["report"]["objective"] = "capacity"  # the recommendation ranks by the server scenario's capacity
    recipe = write_yaml(tmp_path / "load.yaml", spec)
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quick"]) == 0
    run_dir = the_run_dir(tmp_path / "out", "digits-load")
    r = json.loads((run_dir / "results.json").read_text())
    load = {c["scenario"]: c for c in r["load"]}
    assert set(load) == {"single-stream", "offline-b8", "server-b4"}
    for c in load.values():
        assert c["status"] in ("ok", "unstable"), c["reason"]
        assert len(c["repeats"]) == 2  # one process per round, as latency cells
        assert c["stability"]["judged_on"].startswith("the rounds' ")  # their rates, not latency windows
    server = load["server-b4"]["load"]["server"]
    assert server["valid"] and server["max_qps"] > 0 and len(server["max_qps_by_round"]) == 2
    assert all(len(ladder) >= 2 for ladder in server["ladder_by_round"])
    assert load["offline-b8"]["load"]["offline"]["samples_per_s"] > 0
    # LoadGen's logs of every test are kept in the run folder.
    assert list((run_dir / "loadgen").rglob("mlperf_log_summary.txt"))
    # Load cells stay apart from the latency cells, which the recommendation ranks.
    assert all("scenario" not in c for c in r["cells"]) and r["recommendation"]["variant"] == "baseline"
    report = (run_dir / "report.md").read_text()
    assert "Under load" in report and "machines for 5000 QPS" in report
    assert r["recommendation"]["objective"] == "capacity" and r["recommendation"]["max_qps"] == server["max_qps"]
    assert "the highest capacity under load" in report
    assert (run_dir / "plots" / "load_p99_vs_qps.png").exists()


def test_a_server_scenario_without_a_bound_is_refused(tmp_path, capsys):
    spec = _recipe()
    spec["bench"]["scenarios"] = [{"type": "server"}]
    assert main(["validate", str(write_yaml(tmp_path / "bad.yaml", spec))]) == 2
    err = capsys.readouterr().err
    assert "bench.scenarios[0].latency_bound_ms" in err and "Traceback" not in err


def test_compare_puts_capacities_side_by_side_with_the_ranges_of_their_rounds():
    from reporting.compare import capacities

    def run(by_round):
        qps = [q for q in by_round if q is not None]
        return {"load": [{"variant": "v", "backend": "ort-cpu", "scenario": "server-b8",
                          "load": {"server": {"max_qps": sorted(qps)[len(qps) // 2], "max_qps_by_round": by_round}}}]}

    same = capacities(run([100.0, 110.0, 104.0]), run([108.0, 120.0, 115.0]))
    assert same == [{"variant": "v", "backend": "ort-cpu", "scenario": "server-b8", "capacity_a": (104.0, 100.0, 110.0),
                     "capacity_b": (115.0, 108.0, 120.0), "intervals_overlap": True}]
    moved = capacities(run([100.0, 104.0]), run([150.0, 160.0]))
    assert moved[0]["intervals_overlap"] is False


def _ranked(objective: str, **report) -> dict:
    """results.json as the recommendation reads it: `fast` wins on latency, `batched` takes the most load."""
    def cell(v, p50):
        return {"variant": v, "backend": "ort-cpu", "batch_size": 1, "status": "ok",
                "latency_ms": {"p50": p50, "ci95": [p50 * 0.99, p50 * 1.01]}}

    def server(v, by_round):
        qps = [q for q in by_round if q is not None]
        return {"variant": v, "backend": "ort-cpu", "scenario": "server-b8", "status": "ok",
                "load": {"server": {"max_qps": sorted(qps)[len(qps) // 2] if len(qps) == len(by_round) else None,
                                    "max_qps_by_round": by_round, "latency_bound_ms": 50.0, "percentile": 99.0}}}

    return {"recipe": {"parsed": {"report": {"baseline": "fast", "constraints": {}, "objective": objective, **report},
                                  "bench": {"batch_sizes": [1]}}},
            "task": {}, "variants": [{"name": n, "steps": []} for n in ("fast", "batched", "never-valid")],
            "cells": [cell("fast", 10.0), cell("batched", 14.0), cell("never-valid", 5.0)],
            "load": [server("fast", [80.0, 85.0]), server("batched", [200.0, 210.0]), server("never-valid", [None, 300.0])]}


def test_objective_capacity_ranks_by_valid_capacity_where_latency_ranks_by_p50():
    from reporting.analysis import recommend, recommendation_record

    assert recommend(_ranked("latency")).winner.variant == "never-valid"  # the lowest p50
    rec = recommend(_ranked("capacity"))
    assert rec.winner.variant == "batched" and rec.runner_up.variant == "fast" and rec.scenario == "server-b8"
    assert any("never-valid / ort-cpu: no VALID capacity" in u for u in rec.unjudged)  # INVALID is not a number
    record = recommendation_record(_ranked("capacity"))
    assert record["objective"] == "capacity" and record["max_qps"] == 210.0


def test_objective_capacity_needs_a_server_scenario(tmp_path, capsys):
    spec = _recipe()
    spec["bench"]["scenarios"] = [{"type": "offline", "max_batch": 8}]
    spec["report"] = {**spec.get("report", {}), "objective": "capacity"}
    assert main(["validate", str(write_yaml(tmp_path / "bad.yaml", spec))]) == 2
    err = capsys.readouterr().err
    assert "report.objective" in err and "server scenario" in err and "Traceback" not in err


def test_early_stopping_needs_459_queries_for_a_p99_and_a_recipe_with_fewer_is_refused(tmp_path, capsys):
    # LoadGen's own figures: with 300 queries and two over the bound it asks for 538 more (838 in all).
    assert [early_stopping_queries(99, k) for k in range(3)] == [459, 662, 838]
    assert early_stopping_queries(90) == 44
    spec = _recipe()
    spec["bench"]["scenarios"] = [{"type": "server", "latency_bound_ms": 50, "min_queries": 300}]
    assert main(["validate", str(write_yaml(tmp_path / "bad.yaml", spec))]) == 2
    err = capsys.readouterr().err
    assert "bench.scenarios[0].min_queries" in err and "459" in err and "300" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_generation_server_reports_first_token_and_per_token_latency_as_its_sut_times_them(tmp_path):
    """A SUT whose generation of 8 tokens sleeps 20 ms to its first token and 5 ms per later one: LoadGen's
    TTFT and TPOT are those times, its tokens/s the rate times 8, and a TPOT bound under 5 ms is INVALID."""
    def generate(stream, samples, first):
        time.sleep(0.020)
        first()
        time.sleep(0.005 * 7)

    batcher = Batcher(generate, max_batch=1, max_wait_ms=0, streams=6, tokens=8)  # 55 ms each: 40 QPS keeps ~2 busy
    try:
        ok = run_loadgen(batcher, "server", tmp_path / "ok", samples=8, target_qps=40, min_duration_s=2,
                         min_queries=500, ttft_bound_ms=200, tpot_bound_ms=20)
        tight = run_loadgen(batcher, "server", tmp_path / "tight", samples=8, target_qps=40, min_duration_s=2,
                            min_queries=100, ttft_bound_ms=200, tpot_bound_ms=4)
    finally:
        batcher.close()
    assert ok["valid"], ok["problems"]
    assert 20 <= ok["ttft_percentiles_ms"]["50"] < 30, ok["ttft_percentiles_ms"]
    assert 5 <= ok["tpot_percentiles_ms"]["50"] < 6.5, ok["tpot_percentiles_ms"]
    assert abs(ok["tokens_per_s"] / (8 * ok["completed_per_s"]) - 1) < 0.02
    # The SUT's own first-token times agree with LoadGen's (LoadGen counts from the scheduled arrival).
    assert abs(np.median(ok["first_token_ms"]) - ok["ttft_percentiles_ms"]["50"]) < 3
    assert not tight["valid"] and tight["result"] == "INVALID"


def _lm_load_recipe(model_dir) -> dict:
    return {
        "name": "tiny-lm-load",
        "model": {"source": "hf", "path": str(model_dir), "head": "causal-lm"},
        "task": {"type": "language-modeling", "data": {"source": "builtin", "name": "stdlib-docstrings"},
                 "block_size": 32, "eval_blocks": 8},
        "variants": {"baseline": {}},
        "export": {"formats": ["onnx"], "parity": {"max_abs_diff": 1.0e-3, "min_top1_agreement": 0.99}},
        "bench": {"backends": ["torch-cpu", "ort-cpu"], "batch_sizes": [1], "seq_len": 16,
                  "new_tokens": 6, "profile": False, "repeats": 1,
                  "timing": {"warmup": 1, "min_iters": 5, "min_seconds": 0.05, "stability_threshold": 100.0},
                  "scenarios": [{"type": "server", "ttft_bound_ms": 400, "tpot_bound_ms": 100, "max_batch": 2,
                                 "max_wait_ms": 2, "max_steps": 3, "backends": ["ort-cpu"]},
                                {"type": "offline", "max_batch": 2, "backends": ["torch-cpu", "ort-cpu"]}]},
        "report": {"constraints": {"max_perplexity_increase": "5%"}, "objective": "capacity"},
    }


@pytest.mark.slow
def test_a_causal_lm_serves_generations_under_token_latency_bounds(tmp_path):
    spec = _lm_load_recipe(make_tiny_causal_lm(tmp_path / "model", "llama"))
    recipe = write_yaml(tmp_path / "lm-load.yaml", spec)
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quick"]) == 0
    run_dir = the_run_dir(tmp_path / "out", "tiny-lm-load")
    r = json.loads((run_dir / "results.json").read_text())
    load = {(c["scenario"], c["backend"]): c for c in r["load"]}
    assert set(load) == {("server-b2", "ort-cpu"), ("offline-b2", "torch-cpu"), ("offline-b2", "ort-cpu")}
    server = load[("server-b2", "ort-cpu")]
    assert server["status"] in ("ok", "unstable"), server["reason"]
    assert server["shape"] == {"seq_len": 16, "new_tokens": 6}
    s = server["load"]["server"]
    assert s["valid"] and s["max_qps"] > 0, s["ladder_by_round"]
    assert s["ttft_ms"] <= 400 and s["tpot_ms"] <= 100 and s["ttft_bound_ms"] == 400
    assert s["tokens_per_s"] > 0
    for rung in s["ladder_by_round"][0]:
        assert rung["ttft_p99_ms"] is not None and rung["tpot_p99_ms"] is not None
    offline = load[("offline-b2", "torch-cpu")]["load"]["offline"]
    assert offline["valid"] and offline["samples_per_s"] > 0
    # LoadGen measured token latencies: a server test's summary has the first-token percentiles, offline's
    # its tokens/s.
    servers = list((run_dir / "loadgen" / "baseline--ort-cpu--server-b2").rglob("mlperf_log_summary.txt"))
    assert servers and all("first token latency" in p.read_text() for p in servers)
    offline_logs = list((run_dir / "loadgen").glob("*offline-b2/*/offline/mlperf_log_summary.txt"))
    assert len(offline_logs) == 2 and all("Tokens per second" in p.read_text() for p in offline_logs)
    report = (run_dir / "report.md").read_text()
    assert "TTFT / TPOT p99 ms at capacity" in report and "tokens/s at capacity" in report
    assert "TTFT p99 <= 400 ms and TPOT p99 <= 100 ms" in report  # ranked by capacity at both bounds
    assert r["recommendation"]["objective"] == "capacity" and r["recommendation"]["backend"] == "ort-cpu"
    assert (run_dir / "plots" / "load_p99_vs_qps.png").exists()


def test_a_causal_lm_server_needs_both_token_bounds_and_not_a_request_bound(tmp_path, capsys):
    spec = _lm_load_recipe(tmp_path / "model")
    spec["bench"]["scenarios"] = [{"type": "server", "ttft_bound_ms": 400}]
    assert main(["validate", str(write_yaml(tmp_path / "no-tpot.yaml", spec))]) == 2
    err = capsys.readouterr().err
    assert "bench.scenarios[0].tpot_bound_ms" in err and "Traceback" not in err
    spec["bench"]["scenarios"] = [{"type": "server", "latency_bound_ms": 50, "ttft_bound_ms": 400,
                                   "tpot_bound_ms": 100}]
    assert main(["validate", str(write_yaml(tmp_path / "request-bound.yaml", spec))]) == 2
    err = capsys.readouterr().err
    assert "bench.scenarios[0].latency_bound_ms" in err and "ttft_bound_ms and tpot_bound_ms" in err
    digits = _recipe()
    digits["bench"]["scenarios"] = [{"type": "server", "latency_bound_ms": 20, "ttft_bound_ms": 400}]
    assert main(["validate", str(write_yaml(tmp_path / "not-an-lm.yaml", digits))]) == 2
    assert "bench.scenarios[0].ttft_bound_ms" in capsys.readouterr().err


def test_each_stream_is_warmed_on_the_thread_that_serves_it_one_at_a_time_and_a_failure_is_raised(tmp_path):
    import threading

    warmed, served, overlap, busy = {}, {}, [], threading.Lock()

    def warm(stream):
        if not busy.acquire(blocking=False):
            overlap.append(stream)
        else:
            time.sleep(0.02)
            busy.release()
        warmed[stream] = threading.get_ident()

    def serve(stream, samples):
        served[stream] = threading.get_ident()

    batcher = Batcher(serve, max_batch=1, max_wait_ms=0, streams=3, on_start=warm)
    try:
        assert set(warmed) == {0, 1, 2} and not overlap  # all warmed before the constructor returned, in turn
        for i in range(30):
            batcher.submit([i])
        deadline = time.time() + 5
        while len(batcher.latencies_ms) < 30 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        batcher.close()
    assert served and all(served[s] == warmed[s] for s in served)

    def broken(stream):
        raise RuntimeError("the session would not load")

    with pytest.raises(RuntimeError, match="would not load"):
        Batcher(serve, max_batch=1, max_wait_ms=0, streams=2, on_start=broken)


def test_requests_are_the_tasks_rows_at_their_own_length_and_a_batch_of_them_gives_the_padded_outputs(tmp_path):
    """bench.requests: each evaluation row cut to its own tokens, then batched with padding to the longest
    (rounded up), gives the same logits as the tokenizer's own right-padded batch, whichever side the
    evaluation batches were padded on (BERT's positions count from the left, so right is its padding)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bench.requests import collate, lengths_summary, max_width, rows, seq_axes, widths
    from conftest import make_tiny_text_model
    from core.model import ModelIO

    folder = make_tiny_text_model(tmp_path / "bert", "bert")
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    texts = ["the movie was good", "the film was very very not good", "awful", "the acting was fine"]
    io = ModelIO(inputs={k: {"shape": ["batch", "seq"], "dtype": "int64"} for k in ("input_ids", "attention_mask")},
                 kind="classification")
    axes = seq_axes(io)

    def logits(batch):
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()

    def encode(side):
        tok.padding_side = side
        enc = tok(texts, padding="longest", return_tensors="np")
        return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    right = encode("right")
    for side in ("right", "left"):
        batch = encode(side)
        picked, pad = rows([batch], io, limit=10)
        assert [r["input_ids"].shape[1] for r in picked] == batch["attention_mask"].sum(1).tolist()
        assert pad == {"input_ids": tok.pad_token_id, "attention_mask": 0}  # the tokenizer's own padding
        assert all((r["attention_mask"] == 1).all() for r in picked)
        together = collate(picked, axes, pad, multiple=8)
        assert together["input_ids"].shape == (4, 16)  # longest row 9 tokens, rounded up to 16
        np.testing.assert_allclose(logits(together), logits(right), atol=1e-5)
        alone = np.concatenate([logits(collate([r], axes, pad, multiple=1)) for r in picked])
        np.testing.assert_allclose(alone, logits(right), atol=1e-5)
        # Rounding up never outgrows the task's own padded width (here 9: a model may take no more).
        assert collate(picked, axes, pad, multiple=8, cap=max_width([batch], io))["input_ids"].shape == (4, 9)
        assert widths([1, 8, 9], 8, cap=9) == [8, 9] and widths([1, 8, 9], 8) == [8, 16]
        # Warm-up asks for exact widths, whatever the rows: longer ones are cut, shorter padded.
        assert [collate(picked, axes, pad, multiple=8, width=w)["input_ids"].shape for w in (4, 24)] == [(4, 4), (4, 24)]
    assert lengths_summary(picked, axes)["max"] == 9  # [CLS] the film was very very not good [SEP]
    assert len(rows([batch], io, limit=3)[0]) == 3


@pytest.mark.slow
def test_a_text_model_is_served_its_evaluation_texts_at_their_own_lengths(tmp_path):
    """A server cell of a text model sends the task's texts, each at its own length, not bench.seq_len: on
    OpenVINO with static shapes every (batch size, padded length) is compiled at warm-up, so the test's
    requests find their shapes ready and the search finds a VALID capacity."""
    from conftest import make_reviews_csv, make_tiny_text_model

    make_tiny_text_model(tmp_path / "bert", "bert")
    make_reviews_csv(tmp_path / "reviews.csv")
    spec = {
        "name": "text-load",
        "model": {"source": "hf", "path": "./bert", "head": "sequence-classification"},
        "task": {"type": "text-classification", "data": {"source": "file", "path": "reviews.csv"}, "max_length": 32},
        "variants": {"baseline": {}},
        "export": {"formats": ["onnx", "openvino"]},
        "bench": {"backends": ["openvino-cpu"], "batch_sizes": [1], "seq_len": 32, "repeats": 1, "profile": False,
                  "timing": {"warmup": 2, "min_iters": 5, "min_seconds": 0.05, "stability_threshold": 100.0},
                  "scenarios": [{"type": "server", "latency_bound_ms": 30, "max_batch": 4, "max_wait_ms": 1,
                                 "max_steps": 3, "pad_multiple": 4, "max_batch_tokens": 16},
                                {"type": "offline", "max_batch": 4, "inputs": "synthetic"}]},
    }
    recipe = write_yaml(tmp_path / "text-load.yaml", spec)
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quick"]) == 0
    run_dir = the_run_dir(tmp_path / "out", "text-load")
    r = json.loads((run_dir / "results.json").read_text())
    load = {c["scenario"]: c for c in r["load"]}
    server, offline = load["server-b4"], load["offline-b4"]
    assert server["status"] in ("ok", "unstable"), server["reason"]
    req = server["load"]["requests"]
    # The reviews are 5-8 tokens with [CLS] and [SEP]: far under the 32 the latency cells use.
    assert req["source"] == "task" and req["pad_multiple"] == 4 and req["samples"] > 1
    assert 5 <= req["tokens"]["p50"] <= req["tokens"]["max"] <= 8, req["tokens"]
    assert server["load"]["server"]["valid"], server["load"]["server"]
    # Every shape a request met had been compiled at warm-up: 4 batch sizes x widths 4 and 8 within 16 tokens
    # (1x4, 1x8, 2x4, 2x8, 3x4, 4x4), and the batches kept to it.
    assert req["shapes_warmed"] == 6 and req["static_shapes"] == {"after_warmup": 6, "after_tests": 6}, req
    assert server["settings"]["max_batch_tokens"] == 16 and server["settings"]["batching"] == "by-length"
    assert offline["load"]["requests"] == {"source": "synthetic", "seq_len": 32, "shapes_warmed": 4,
                                           "static_shapes": {"after_warmup": 4, "after_tests": 4}}
    report = (run_dir / "report.md").read_text()
    assert "Requests are the task's evaluation inputs" in report and "synthetic input of 32 tokens" in report
    assert "4 / 1.0 / 1, by length, ≤ 16 tokens" in report  # how the batches were formed, in the capacity table


def test_with_main_thread_stream_0_is_served_by_the_thread_that_built_the_batcher(tmp_path):
    import threading

    served = collections.defaultdict(set)

    def serve(stream, samples):
        served[stream].add(threading.get_ident())
        time.sleep(0.002)

    batcher = Batcher(serve, max_batch=1, max_wait_ms=0, streams=2, main_thread=True)
    try:
        r = run_loadgen(batcher, "offline", tmp_path / "offline", samples=8, target_qps=500, min_duration_s=0.5,
                        min_queries=200)
        again = run_loadgen(batcher, "offline", tmp_path / "again", samples=8, target_qps=500, min_duration_s=0.5,
                            min_queries=200)
    finally:
        batcher.close()
    assert len(r["latencies_ms"]) >= 200 and len(again["latencies_ms"]) >= 200, (r["problems"], again["problems"])
    assert served[0] == {threading.get_ident()}  # this thread served stream 0, in both tests
    assert served[1] and threading.get_ident() not in served[1]


@pytest.mark.parametrize("batching, max_tokens, expected", [
    # by length: the oldest (32 tokens) with the waiting ones no longer than it; the 64-token one goes alone.
    ("by-length", 0, [[0, 1, 3, 4, 5], [2]]),
    # a 64-token cap: the oldest and one more of 32; the 64 alone; then 16s together, the 32 after them.
    ("by-length", 64, [[0, 1], [2], [3, 5], [4]]),
    # first in, first out under the same cap: a batch stops at the first request that would pass it.
    ("fifo", 64, [[0, 1], [2], [3, 4], [5]]),
    ("fifo", 0, [[0, 1, 2, 3, 4, 5]]),
])
def test_a_batch_takes_requests_by_length_and_within_the_token_cap(batching, max_tokens, expected):
    widths = [32, 16, 64, 16, 32, 16]  # each sample's padded length
    batches = []
    batcher = Batcher(lambda stream, samples: batches.append(samples), max_batch=8, max_wait_ms=30, streams=1,
                      width=widths.__getitem__, by_length=batching == "by-length", max_tokens=max_tokens)
    try:
        batcher.submit(list(range(6)), list(range(6)))  # all six waiting at once
        deadline = time.perf_counter() + 5
        while sum(map(len, batches)) < 6 and time.perf_counter() < deadline:
            time.sleep(0.01)
    finally:
        batcher.close()
    assert batches == expected


def test_the_batch_rule_works_on_any_queue_of_widths_so_warm_up_can_time_a_long_queue_as_the_batcher_serves_it():
    from bench.serving import pick_batch

    # By length: the oldest (16) and the waiting ones no longer than it; a 64 and a 32 wait for a later batch.
    assert pick_batch([16, 64, 16, 32, 16], 8, True, 64) == ([0, 2, 4], False)
    assert pick_batch([16, 64, 16, 32, 16], 8, True, 32) == ([0, 2], True)  # the cap: 2 x 16 tokens
    assert pick_batch([16, 64, 16], 8, False, 0) == ([0, 1, 2], False)  # first in first out
    assert pick_batch([], 8, True, 0) == ([], False)
    queue, batches = [32, 16, 16, 128, 16, 32], []  # drained as serve.warm drains it
    while queue:
        picked, _ = pick_batch(queue, 4, True, 64)
        batches.append([queue[k] for k in picked])
        for k in reversed(picked):
            del queue[k]
    assert batches == [[32, 16], [16, 16], [128], [32]]


def test_a_load_cell_is_judged_stable_on_the_rate_each_round_found_not_on_its_request_latencies():
    from bench.serve import stability, unstable_reason

    assert unstable_reason({"server": {"max_qps_by_round": [474.2, 442.5]}}, 0.25) is None  # 7 % apart
    # The cell's `stability` record says the same, not the latency windows' verdict of a latency cell.
    assert stability({"server": {"max_qps_by_round": [305.0, 393.0]}}, 0.25) == {
        "judged_on": "the rounds' capacities", "spread": 0.2521, "threshold": 0.25}
    assert "capacities spread 25.2%" in unstable_reason({"server": {"max_qps_by_round": [305.0, 393.0]}}, 0.25)
    assert "no VALID target" in unstable_reason({"server": {"max_qps_by_round": [None, 390.0]}}, 0.25)
    # No round found one: not unstable but INVALID, which the capacity table says in LoadGen's words.
    assert unstable_reason({"server": {"max_qps_by_round": [None, None]}}, 0.25) is None
    assert "samples/s spread" in unstable_reason({"offline": {"samples_per_s_by_round": [100.0, 150.0]}}, 0.25)


def test_the_capacity_table_says_how_batches_were_formed_and_when_the_rounds_disagree():
    from reporting.load_report import capacity_table

    cell = {"variant": "int8", "backend": "openvino-cpu", "scenario": "server-b8", "status": "unstable",
            "reason": "the 2 rounds' capacities spread 28.4% (threshold 25%)",
            "settings": {"max_batch": 8, "max_wait_ms": 2.0, "streams": 1, "batching": "by-length",
                         "max_batch_tokens": 128},
            "load": {"service_ms": {"1": 2.4}, "service_after_idle_ms": 2.3,
                     "server": {"max_qps": 348.8, "max_qps_by_round": [398.4, 299.2], "valid": True,
                                "p99_ms": 27.0, "batch_histogram": {"1": 10, "2": 4}, "retested_by_round": [1, 0]}}}
    head, rows = capacity_table({"load": [cell, {**cell, "status": "ok", "reason": None,
                                                 "settings": {**cell["settings"], "batching": "fifo",
                                                              "max_batch_tokens": None}}]})
    row, fifo = (dict(zip(head, r)) for r in rows)
    assert row["max batch / wait ms / streams"] == "8 / 2.0 / 1, by length, ≤ 128 tokens"
    assert row["capacity QPS (by round)"] == ("348.8 (398.4, 299.2); unstable: the 2 rounds' capacities spread "
                                              "28.4% (threshold 25%)")
    assert row["LoadGen"] == "VALID (1 stalled test re-tested)"  # bench.serving.stall
    assert fifo["max batch / wait ms / streams"] == "8 / 2.0 / 1, first in first out"
    assert fifo["capacity QPS (by round)"] == "348.8 (398.4, 299.2)"


def _serving(ref=(100.0, 100.0), single=(300.0, 400.0), batched=(600.0, 500.0)) -> dict:
    """results.json's parts serving_ratios reads: a baseline, a reference (an engine's defaults) and `int8`
    one per call and batched, all at p99 <= 50 ms, and one cell at another bound."""
    def cell(variant, backend, scenario, by_round, max_batch=1, bound=50.0):
        by_round = list(by_round)
        return {"variant": variant, "backend": backend, "scenario": scenario, "status": "ok",
                "settings": {"max_batch": max_batch, "streams": 1, "latency_bound_ms": bound, "percentile": 99.0},
                "load": {"server": {"max_qps": sum(by_round) / len(by_round), "max_qps_by_round": by_round,
                                    "valid": True, "latency_bound_ms": bound, "percentile": 99.0}}}

    return {
        "recipe": {"parsed": {"report": {"baseline": "baseline"}}},
        "variants": [{"name": "baseline"}, {"name": "int8"}, {"name": "ov-defaults", "reference": True}],
        "load": [cell("baseline", "torch-cpu", "server", [30.0, 20.0]),
                 cell("ov-defaults", "openvino-cpu", "server", ref),
                 cell("int8", "openvino-cpu", "server", single),
                 cell("int8", "openvino-cpu", "server-b8", batched, max_batch=8),
                 # Another bound: compared with nothing above.
                 cell("int8", "ort-cpu", "server-tight", [50.0, 50.0], bound=5.0),
                 {"variant": "int8", "backend": "ort-cpu", "scenario": "server", "status": "failed", "load": {}}],
    }


def test_the_report_says_what_batching_gave_and_how_the_best_capacity_compares_with_baseline_and_engine_defaults():
    from reporting.load_report import serving_verdicts

    from reporting.load_report import capacity_table

    head, rows = capacity_table(_serving())
    assert [r[0] for r in rows][:3] == ["baseline", "ov-defaults (reference)", "int8"]  # as the other tables say it
    batching, best = serving_verdicts(_serving())
    assert batching.startswith("Dynamic batching, `int8` on openvino-cpu (server-b8): 550.0 QPS at p99 <= 50 ms "
                               "against 350.0 served one request per call (server): **1.57x**")
    assert "round by round: 2.00x, 1.25x" in batching  # round i against round i
    assert best.startswith("Highest capacity at p99 <= 50 ms: `int8` on openvino-cpu (server-b8), 550.0 QPS")
    assert "**22.00x** (round by round: 20.00x, 25.00x) the baseline's best, `baseline` on torch-cpu" in best
    assert "**5.50x** (round by round: 6.00x, 5.00x) the best reference (an engine's own defaults)" in best
    # A reference that serves the most is said so, not hidden behind the recipe's best variant.
    assert "but the engines' own defaults serve as much or more: `ov-defaults` on openvino-cpu (server) at 900.0" \
        in serving_verdicts(_serving(ref=(900.0, 900.0)))[1]


def test_compare_says_which_serving_verdicts_agree_in_a_second_run():
    from reporting.compare import _verdict_text, serving_agreement

    held = {(v["kind"], v["agree"]) for v in serving_agreement(_serving(), _serving(batched=(520.0, 470.0)))}
    assert held == {("batching", True), ("vs_baseline", True), ("vs_reference", True)}  # 1.73x..1.18x, 1.25x..2x
    moved = serving_agreement(_serving(), _serving(single=(450.0, 450.0), batched=(460.0, 470.0)))
    by_kind = {v["kind"]: v for v in moved}
    assert by_kind["batching"]["agree"] is False and by_kind["batching"]["same_cells"] is True  # 1.02x..1.04x
    # The engines' defaults overtaking the best variant is another verdict, not the same one moved.
    led = {v["kind"]: v for v in serving_agreement(_serving(), _serving(ref=(900.0, 900.0)))}
    assert led["vs_reference"]["agree"] is False and led["vs_reference"]["same_cells"] is False
    text = _verdict_text({"recommendation_a": None, "recommendation_b": None, "same_recommendation": False,
                          "median_change": None, "speedups": [], "serving": moved,
                          "serving_agreeing": sum(v["agree"] for v in moved)})
    assert "Serving verdicts (capacity ratios, each run's own, round by round): 1 of 3 agree" in text
    assert "| dynamic batching over one per call | p99 <= 50 ms | 1.57x [2.00, 1.25]: `int8` on openvino-cpu " \
           "(server-b8) over `int8` on openvino-cpu (server) |" in text
