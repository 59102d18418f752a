"""bench.protocol: the timing loop and the statistics every latency number in a report rests on."""
from __future__ import annotations

import time

import numpy as np
import pytest

from bench.protocol import measure, ratio_ci, stability


# ----------------------------------------------------------------------------- stability
def test_stability_marks_a_drifting_series_unstable():
    samples = [1.0] * 50 + [2.0] * 50  # the machine got twice as slow half-way through
    s = stability(samples, threshold=0.25)
    assert s["stable"] is False
    assert s["window_spread"] > 0.25
    assert s["window_medians_ms"][0] == pytest.approx(1.0) and s["window_medians_ms"][-1] == pytest.approx(2.0)


def test_stability_marks_a_flat_noisy_series_stable():
    rng = np.random.default_rng(0)
    samples = 1.0 + rng.normal(0, 0.03, 100)
    s = stability(samples, threshold=0.25)
    assert s["stable"] is True
    assert s["window_spread"] < 0.25


def test_stability_does_not_judge_too_few_samples():
    s = stability([1.0, 5.0, 1.0, 5.0], threshold=0.25)
    assert s["stable"] is True and s["window_spread"] is None and "too few" in s["note"]


# ----------------------------------------------------------------------------- ratio_ci
def test_ratio_ci_of_identical_distributions_brackets_one():
    rng = np.random.default_rng(0)
    a = 1.0 + rng.normal(0, 0.05, 200)
    b = 1.0 + rng.normal(0, 0.05, 200)
    ratio, lo, hi = ratio_ci(a, b)
    assert lo <= 1.0 <= hi
    assert ratio == pytest.approx(1.0, abs=0.05)


def test_ratio_ci_of_a_twice_slower_set_is_one_half():
    rng = np.random.default_rng(0)
    base = 1.0 + rng.normal(0, 0.02, 200)
    slower = 2.0 * (1.0 + rng.normal(0, 0.02, 200))
    ratio, lo, hi = ratio_ci(base, slower)
    assert ratio == pytest.approx(0.5, abs=0.02)
    assert lo <= ratio <= hi
    assert hi < 1.0  # significantly slower, not a toss-up


# ----------------------------------------------------------------------------- measure
def test_measure_honours_warmup_and_min_iters():
    calls = []

    def timed():
        calls.append(1)
        return 0.001

    m = measure(timed, warmup=3, min_iters=7, min_seconds=0.0, max_seconds=10.0)
    assert len(m["warmup_ms"]) == 3
    assert len(m["samples_ms"]) == 7
    assert len(calls) == 10
    assert m["capped"] is False


def test_measure_honours_min_seconds():
    t0 = time.perf_counter()
    m = measure(lambda: 0.001, warmup=0, min_iters=5, min_seconds=0.1, max_seconds=10.0)
    elapsed = time.perf_counter() - t0
    assert elapsed >= 0.1
    assert len(m["samples_ms"]) > 5  # a trivial call runs far more than min_iters times in 0.1 s
    assert m["capped"] is False


def test_measure_stops_at_max_seconds_and_says_so():
    def slow():
        time.sleep(0.02)
        return 20.0

    m = measure(slow, warmup=0, min_iters=1000, min_seconds=0.0, max_seconds=0.1)
    assert 1 <= len(m["samples_ms"]) < 1000
    assert m["capped"] is True


def test_measure_keeps_the_raw_samples():
    values = iter(range(100))
    m = measure(lambda: float(next(values)), warmup=2, min_iters=5, min_seconds=0.0, max_seconds=10.0)
    assert m["warmup_ms"] == [0.0, 1.0]
    assert m["samples_ms"] == [2.0, 3.0, 4.0, 5.0, 6.0]


# ----------------------------------------------------------------------------- across processes
def _processes(medians, n=400, jitter=0.01, seed=0):
    rng = np.random.default_rng(seed)
    return [{"samples_ms": list(m * (1 + rng.normal(0, jitter, n)))} for m in medians]


def test_median_draws_match_a_plain_bootstrap_of_the_median():
    from bench.protocol import median_draws

    rng = np.random.default_rng(3)
    samples = rng.lognormal(0, 0.3, 301)
    fast = np.percentile(median_draws(samples, 4000, np.random.default_rng(1)), [2.5, 97.5])
    slow = np.percentile(np.median(samples[rng.integers(0, 301, size=(4000, 301))], axis=1), [2.5, 97.5])
    assert fast == pytest.approx(slow, rel=0.02)


def test_a_cell_is_the_median_of_its_processes_and_its_interval_spans_them():
    from bench.protocol import combine

    cell = combine(_processes([10.0, 11.0, 12.0]), batch_size=4, threshold=0.25)
    lat = cell["latency_ms"]
    assert lat["p50"] == pytest.approx(11.0, rel=0.01) and lat["processes"] == 3 and lat["n"] == 1200
    # The interval says what a rerun would see: it reaches towards the other processes' medians,
    # far wider than any one process's own interval (about +-0.1 %).
    assert lat["ci95"][0] < 10.5 and lat["ci95"][1] > 11.5
    assert cell["unstable_reason"] is None


def test_processes_that_disagree_or_too_few_samples_make_a_cell_unstable():
    from bench.protocol import combine

    spread = combine(_processes([10.0, 15.0, 10.2]), batch_size=1, threshold=0.25)
    assert "medians spread 49%" in spread["unstable_reason"]
    few = combine(_processes([10.0, 10.0], n=6), batch_size=1, threshold=0.25)
    assert "only 6 samples" in few["unstable_reason"]
    capped = combine([{**p, "capped_by_max_seconds": True} for p in _processes([10.0, 10.0])], 1, 0.25)
    assert "max_seconds" in capped["unstable_reason"]


def test_pairing_by_round_cancels_drift_that_an_unpaired_comparison_cannot():
    from bench.protocol import paired_ratio_ci, unpaired_ratio_ci

    drift = [10.0, 13.0, 8.0, 11.0]  # the machine's speed wanders from round to round
    base = {"repeats": [{"round": r, **p} for r, p in enumerate(_processes(drift, seed=1))]}
    slow = {"repeats": [{"round": r, **p} for r, p in enumerate(_processes([1.2 * m for m in drift], seed=2))]}
    point, lo, hi = paired_ratio_ci(base, slow)
    assert point == pytest.approx(1 / 1.2, rel=0.01) and hi < 0.86  # clearly slower, round by round
    _, ulo, uhi = unpaired_ratio_ci(base, slow)
    assert ulo < 1.0 < uhi  # the same data, unpaired: drift swamps a 20 % change


def test_a_fast_cells_stored_samples_are_thinned_in_time_order_and_say_so():
    from bench.rounds import KEEP_SAMPLES, thin

    samples = list(np.linspace(1.0, 2.0, 30_001))  # a slow drift upwards, as a fast cell would record it
    kept = thin(samples)
    assert len(kept["samples_ms"]) <= KEEP_SAMPLES and kept["samples_stride"] == 31
    assert kept["samples_ms"] == samples[::31]  # every k-th, order kept: the drift is still visible
    assert np.median(kept["samples_ms"]) == pytest.approx(np.median(samples), rel=1e-3)
    assert thin([1.0, 2.0]) == {"samples_ms": [1.0, 2.0], "samples_stride": 1}
