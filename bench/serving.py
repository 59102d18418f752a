"""Load as a deployment meets it, driven by MLCommons LoadGen (the library every MLPerf Inference
submission uses): a serving system under test (SUT) with dynamic batching, and the scenarios.

- `Batcher`: requests wait in one queue; each of `streams` workers takes what is waiting, up to
  `max_batch`, waiting at most `max_wait_ms` after the oldest request for the batch to fill, runs it
  on its own session (`run_batch(stream, samples)`: the requests' sample indices in the QSL, so the
  batch holds what they asked for), then answers every request in it. Where requests differ in length
  (`width(sample)`: the length a batch holding it is padded to), `by_length` batches the oldest request
  with the waiting ones no longer than it (a batch of one short and one long request costs two long
  ones when the engine's cost grows with its tokens), and `max_tokens` caps a batch's padded tokens
  (batch x width, as text-embeddings-inference's max_batch_tokens does): the oldest request always goes,
  and a batch stops before the first request that would pass the cap, so a long batch cannot hold the
  queue behind it for long. With `packed` (a model made by export.packing), `width` is a request's own
  tokens and a batch is the oldest requests while their tokens together fit `max_tokens`, whatever their
  lengths: they share one row, so none pays for another's length. It records each
  request's latency (arrival to answer) and the batch sizes it ran. A generation server (`tokens`:
  the tokens each answer carries) runs `run_batch(stream, samples, first)`, which calls `first()` as the
  batch's first tokens are out: every request in it gets its first token then (LoadGen's TTFT), and
  its answer when the batch's generation ends (TPOT: the time between). `on_start(stream)` runs in
  each worker before it serves, one worker at a time, and the constructor returns when all have: a
  session is warmed and timed on the thread that will serve it (PyTorch's OpenMP pool belongs to the
  thread that calls it: warmed on the main thread, a torch session then ran 1.8x slower on a worker).
  With `main_thread`, stream 0 is served by the thread that built the Batcher, LoadGen driven from
  another (`serve_test`): even warmed on its own worker thread, PyTorch eager MiniLM cost 19-25 ms per
  16-token request there against 12-16 ms on the main thread (2 OpenMP threads, the 2-vCPU VNNI VM),
  where ONNX Runtime and OpenVINO cost the same on either. A one-process server serves from its main
  thread; so does bench.serve.
- `run_loadgen`: one LoadGen test (SingleStream, Offline or Server at a target QPS) against a Batcher;
  LoadGen's own summary (its VALID / INVALID verdict, percentiles, achieved rate) is parsed from the
  log it writes, which is kept.
- `capacity`: the highest target QPS whose Server run LoadGen calls VALID (the percentile latency meets
  the bound, with its minimum duration and query count): a ladder up from an estimate, then bisection
  between the last valid and the first invalid step; every step is kept."""
from __future__ import annotations

import collections
import itertools
import math
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

SCENARIOS = {"single-stream": "SingleStream", "offline": "Offline", "server": "Server"}
LOOK_AHEAD = 16  # by length, a batch looks among this many times max_batch of the oldest waiting requests


def pick_batch(widths: Iterable[int], max_batch: int, by_length: bool, max_tokens: int,
               packed: bool = False) -> tuple[list[int], bool]:
    """Of a queue's padded widths, oldest first, the positions the next batch takes and whether it is full.
    By length: only requests no longer than the oldest, among the next `LOOK_AHEAD` x max_batch waiting (an
    offline test queues every query at once: a batch must not cost a scan of all of them). With a token
    cap: up to the first that would pass it. Packed (`widths` are then the requests' own tokens): the
    oldest ones, whatever their lengths, while their tokens together fit the cap. The Batcher forms its
    batches by it, and warm-up by it times what a long queue costs (the capacity search's starting point)."""
    picked, widest, total, oldest = [], 0, 0, None
    for k, w in enumerate(itertools.islice(widths, LOOK_AHEAD * max_batch)):
        if oldest is None:
            oldest = w
        if by_length and not packed and w > oldest:
            continue
        if len(picked) == max_batch:
            return picked, True
        if packed and picked and max_tokens and total + w > max_tokens:
            return picked, True
        if not packed and not within_tokens(len(picked) + 1, max(widest, w), max_tokens):
            return picked, True
        picked.append(k)
        widest, total = max(widest, w), total + w
    return picked, len(picked) == max_batch


def within_tokens(n: int, width: int, max_tokens: int) -> bool:
    """Whether `n` requests padded to `width` tokens make a batch under the cap `max_tokens` (0: none); one
    request always does. The Batcher forms batches by it, and warm-up compiles the shapes it allows."""
    return n <= 1 or not max_tokens or n * width <= max_tokens


def early_stopping_queries(percentile: float, over_bound: int = 0, confidence: float = 0.99) -> int:
    """The fewest queries with which LoadGen's early stopping can call a Server run VALID when `over_bound`
    of them missed the latency bound: the smallest n for which seeing at most that many misses would be
    less likely than 1 - `confidence` were the true `percentile` latency over the bound (a binomial
    tail). For p99: 459 with no miss, 662 with one, 838 with two; a run with fewer queries is INVALID
    however fast it was."""
    miss = 1 - percentile / 100
    n = over_bound + 1
    while sum(math.comb(n, i) * miss ** i * (1 - miss) ** (n - i) for i in range(over_bound + 1)) > 1 - confidence:
        n += 1
    return n


class Batcher:
    def __init__(self, run_batch: Callable[..., None], max_batch: int, max_wait_ms: float, streams: int,
                 tokens: int = 0, on_start: Optional[Callable[[int], None]] = None, main_thread: bool = False,
                 width: Optional[Callable[[int], int]] = None, by_length: bool = False, max_tokens: int = 0,
                 packed: bool = False):
        self.run_batch, self.max_batch, self.max_wait, self.tokens = run_batch, max_batch, max_wait_ms / 1e3, tokens
        self.width, self.by_length, self.max_tokens = width or (lambda sample: 1), by_length, max_tokens
        self.packed = packed
        self.queue: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.latencies_ms: list[float] = []
        self.first_ms: list[float] = []  # a generation server: arrival to first token, per request
        self.busy_ms: list[float] = []
        self.stalled_ms = 0.0  # the longest a stream sat free with a batch overdue, this test (see _loop)
        self.batches: collections.Counter = collections.Counter()
        self.respond: Callable[[list], None] = lambda ids: None
        self.first_token: Callable[[list], None] = lambda ids: None
        self.stopping = False
        # main_thread: stream 0 is served by the thread that built the Batcher (run_loadgen then drives LoadGen
        # from another), as a one-process server serves from its main thread; only the other streams are threads.
        self.main_thread, self._test_over = main_thread, False
        self.on_start, self._one_at_a_time = on_start, threading.Lock()
        first = 1 if main_thread else 0
        self._ready = threading.Barrier(streams - first + 1)
        self.start_error: Optional[BaseException] = None
        self.workers = [threading.Thread(target=self._serve, args=(s,), daemon=True) for s in range(first, streams)]
        for w in self.workers:
            w.start()
        if main_thread:
            self._start(0)
        self._ready.wait()
        if self.start_error is not None:
            self.close()
            raise self.start_error

    def submit(self, ids: list, samples: Optional[list] = None) -> None:
        """Requests `ids` arrive now, asking for QSL samples `samples` (default: sample 0 each)."""
        now = time.perf_counter()
        with self.cond:
            self.queue.extend((i, s, now) for i, s in zip(ids, samples or [0] * len(ids)))
            self.cond.notify_all()

    def _take(self, main: bool = False) -> Optional[list]:
        """The next batch: as soon as it is full (`max_batch` requests that fit, or the next would pass
        `max_tokens`), or `max_wait` after the oldest arrived. None when the Batcher closes (or, for the
        main thread's stream, when the test is over)."""
        with self.cond:
            while not self.queue and not self.stopping and not (main and self._test_over):
                self.cond.wait()
            if self.stopping or not self.queue:
                return None
            deadline = self.queue[0][2] + self.max_wait
            while True:
                picked, full = self._pick()
                left = deadline - time.perf_counter()
                if full or left <= 0 or self.stopping:
                    break
                self.cond.wait(left)
            if not picked:
                return None
            batch = [self.queue[k] for k in picked]
            for k in reversed(picked):  # near the front: cheap in a deque, however long the queue
                del self.queue[k]
            return batch

    def _pick(self) -> tuple[list[int], bool]:
        """The queue positions the next batch takes, oldest first, and whether it is full (pick_batch)."""
        return pick_batch((self.width(sample) for _, sample, _ in self.queue), self.max_batch, self.by_length,
                          self.max_tokens, self.packed)

    def _start(self, stream: int) -> None:
        try:
            if self.on_start is not None:
                with self._one_at_a_time:
                    self.on_start(stream)
        except BaseException as e:  # raised again by the constructor, on the thread that built the Batcher
            self.start_error = e

    def _serve(self, stream: int) -> None:
        try:
            self._start(stream)
        finally:
            self._ready.wait()
        if self.start_error is None:
            self._loop(stream)

    def serve_test(self, test: Callable[[], None]) -> None:
        """Run `test` (a LoadGen test) on another thread while this one serves stream 0, until it ends."""
        errors: list[BaseException] = []

        def drive():
            try:
                test()
            except BaseException as e:
                errors.append(e)
            finally:
                with self.cond:
                    self._test_over = True
                    self.cond.notify_all()

        with self.cond:
            self._test_over = False
        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        self._loop(0, main=True)
        driver.join()
        if errors:
            raise errors[0]

    def _loop(self, stream: int, main: bool = False) -> None:
        free_since = None
        while True:
            batch = self._take(main)
            if batch is None:
                if self.stopping or (main and self._test_over):
                    return
                continue
            began = time.perf_counter()
            if free_since is not None:
                # The batch was due by its oldest request's max_wait and the stream was free: from the later of
                # the two it should have started at once (a condition wake-up, microseconds). Longer is the
                # process not being run (a VM's descheduled vCPU), which no service time shows.
                due = max(free_since, batch[0][2] + self.max_wait)
                self.stalled_ms = max(self.stalled_ms, (began - due) * 1e3)
            ids, samples = [i for i, _, _ in batch], [s for _, s, _ in batch]
            if self.tokens:
                first_at = []

                def first(ids=ids, first_at=first_at):
                    first_at.append(time.perf_counter())
                    self.first_token(ids)

                self.run_batch(stream, samples, first)
            else:
                self.run_batch(stream, samples)
            done = time.perf_counter()
            self.respond(ids)
            with self.cond:
                self.latencies_ms += [(done - t) * 1e3 for _, _, t in batch]
                if self.tokens and first_at:
                    self.first_ms += [(first_at[0] - t) * 1e3 for _, _, t in batch]
                self.batches[len(batch)] += 1
                # How long the stream was taken by this batch, answering included: its service time.
                free_since = time.perf_counter()
                self.busy_ms.append((free_since - began) * 1e3)

    def reset(self) -> None:
        with self.cond:
            self.latencies_ms, self.first_ms, self.busy_ms, self.batches = [], [], [], collections.Counter()
            self.stalled_ms = 0.0

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for w in self.workers:
            w.join(timeout=5)


def run_loadgen(batcher: Batcher, scenario: str, log_dir: Path, *, samples: int, target_qps: float = 0.0,
                latency_bound_ms: float = 0.0, percentile: float = 99.0, min_duration_s: float = 10.0,
                min_queries: int = 100, max_duration_s: float = 120.0, seed: int = 0,
                ttft_bound_ms: Optional[float] = None, tpot_bound_ms: Optional[float] = None) -> dict:
    """One LoadGen test; returns its summary (`valid`, `result`, percentiles in ms, achieved rates), the
    SUT's own request latencies (`latencies_ms`) and batch sizes (`batch_histogram`). For a generation
    server (`batcher.tokens`) LoadGen measures token latencies: its verdict holds the first-token
    latency to `ttft_bound_ms` and the time per output token to `tpot_bound_ms`, each at `percentile`,
    and the summary adds their percentiles and tokens/s."""
    import mlperf_loadgen as lg

    log_dir.mkdir(parents=True, exist_ok=True)
    settings = lg.TestSettings()
    settings.scenario = getattr(lg.TestScenario, SCENARIOS[scenario])
    settings.mode = lg.TestMode.PerformanceOnly
    settings.min_duration_ms = int(min_duration_s * 1e3)
    settings.max_duration_ms = int(max_duration_s * 1e3)
    settings.min_query_count = int(min_queries)
    settings.qsl_rng_seed = settings.sample_index_rng_seed = settings.schedule_rng_seed = int(seed) + 1
    if batcher.tokens:
        settings.use_token_latencies = True
        if ttft_bound_ms:
            settings.ttft_latency = int(ttft_bound_ms * 1e6)
        if tpot_bound_ms:
            settings.tpot_latency = int(tpot_bound_ms * 1e6)
            if not latency_bound_ms and ttft_bound_ms:  # a whole answer within both bounds
                latency_bound_ms = ttft_bound_ms + tpot_bound_ms * (batcher.tokens - 1)
    if scenario == "server":
        settings.server_target_qps = float(target_qps)
        settings.server_target_latency_ns = int(latency_bound_ms * 1e6)
        settings.server_target_latency_percentile = percentile / 100
    elif scenario == "offline":
        settings.offline_expected_qps = float(target_qps or 1.0)
    else:
        settings.single_stream_expected_latency_ns = int(max(latency_bound_ms, 1.0) * 1e6)

    if batcher.tokens:
        n = batcher.tokens

        def respond(ids):
            lg.QuerySamplesComplete([lg.QuerySampleResponse(i, 0, 0, n) for i in ids])

        batcher.first_token = lambda ids: lg.FirstTokenComplete([lg.QuerySampleResponse(i, 0, 0) for i in ids])
    else:
        def respond(ids):
            lg.QuerySamplesComplete([lg.QuerySampleResponse(i, 0, 0) for i in ids])

    batcher.respond = respond
    batcher.reset()
    sut = lg.ConstructSUT(lambda queries: batcher.submit([q.id for q in queries], [q.index for q in queries]),
                          lambda: None)
    qsl = lg.ConstructQSL(samples, samples, lambda idx: None, lambda idx: None)
    log = lg.LogSettings()
    log.log_output.outdir = str(log_dir)
    log.log_output.copy_summary_to_stdout = False
    try:
        if batcher.main_thread:
            batcher.serve_test(lambda: lg.StartTestWithLogSettings(sut, qsl, settings, log))
        else:
            lg.StartTestWithLogSettings(sut, qsl, settings, log)
    finally:
        lg.DestroyQSL(qsl)
        lg.DestroySUT(sut)
    summary = parse_summary((log_dir / "mlperf_log_summary.txt").read_text())
    tokens = {"first_token_ms": list(batcher.first_ms)} if batcher.tokens else {}
    return {**summary, "target_qps": target_qps or None, "latencies_ms": list(batcher.latencies_ms),
            "service_ms": list(batcher.busy_ms), "stalled_ms": batcher.stalled_ms, **tokens,
            "batch_histogram": {str(k): v for k, v in sorted(batcher.batches.items())}, "log_dir": str(log_dir)}


_FIELDS = {"Completed samples per second": "completed_per_s", "Scheduled samples per second": "scheduled_per_s",
           "Samples per second": "samples_per_s", "QPS w/o loadgen overhead": "qps_without_overhead",
           "Completed tokens per second": "tokens_per_s", "Tokens per second": "tokens_per_s"}
# Token latencies (a generation server): LoadGen's lines for the first token and the time per output token.
_TOKEN_PERCENTILES = {"first token latency": "ttft_percentiles_ms", "time to output token": "tpot_percentiles_ms"}


def parse_summary(text: str) -> dict:
    """LoadGen's mlperf_log_summary.txt: its verdict, rates, and latency percentiles (ns -> ms)."""
    out: dict = {"percentiles_ms": {}}
    m = re.search(r"Result is\s*:\s*(\w+)", text)
    out["result"] = m.group(1) if m else "UNKNOWN"
    out["valid"] = out["result"] == "VALID"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in _FIELDS:
            out[_FIELDS[key]] = _number(value)
        m = re.match(r"(\d+(?:\.\d+)?) percentile (latency|first token latency|time to output token) \(ns\)", key)
        if m:
            where = out["percentiles_ms"] if m.group(2) == "latency" else \
                out.setdefault(_TOKEN_PERCENTILES[m.group(2)], {})
            where[m.group(1).rstrip("0").rstrip(".")] = _number(value) / 1e6
        elif key in ("Min latency (ns)", "Max latency (ns)", "Mean latency (ns)"):
            out[key.split()[0].lower() + "_ms"] = _number(value) / 1e6
    out["problems"] = [ln.strip() for ln in text.splitlines() if "not met" in ln.lower() or "* " in ln[:3]]
    return out


def _number(s: str) -> float:
    try:
        return float(s.split()[0])
    except (ValueError, IndexError):
        return float("nan")


RETESTS = 2  # disturbed INVALID tests run again per search, at most (as bench.rounds re-measures a busy process)


def capacity(step: Callable[[float], dict], estimate_qps: float, *, max_steps: int = 8, precision: float = 0.05,
             floor_qps: float = 0.0, disturbed: Optional[Callable[[dict], Optional[str]]] = None) -> dict:
    """The highest target QPS whose Server run is VALID. `step(qps)` runs one LoadGen Server test. From
    half the estimate, the ladder climbs by 1.5x while runs are valid (and falls by 2x while they are
    not, down to `floor_qps` itself, never below it: a target that cannot reach LoadGen's minimum query
    count within its maximum duration), then bisects between the last valid and the first invalid target
    until they are within `precision` of each other or `max_steps` runs were made. Returns max_qps (None: no valid
    target), the step that achieved it and the ladder. The fall stops early when a lower target's p99 is
    10 % worse than the higher one's (`latency_rose_as_load_fell`): on a machine where a request that finds the
    session idle costs more, lower targets only get slower, and the search says so instead of walking on.

    `disturbed(r)`: why an INVALID test was disturbed (a stall of the machine, not the queue), or None. Such a
    test is run again at the same target, at most RETESTS times per search and not counted in max_steps, and
    the second verdict stands; both stay in the ladder, the first marked `disturbed`. One stall of a VM makes a
    whole test miss its p99, and a bracketing search never goes back above a target it once saw INVALID, so
    without this one hiccup lowers a round's capacity for the rest of the search. A disturbance only ever
    slows a test, so re-testing it removes a one-sided error; a test that misses again is INVALID."""
    ladder: list[dict] = []
    rose = False

    def p99(r: dict):
        return (r.get("percentiles_ms") or {}).get("99")

    retests = 0

    def run(qps: float) -> bool:
        nonlocal retests
        r = step(qps)
        ladder.append(r)
        why = None if r["valid"] or disturbed is None or retests >= RETESTS else disturbed(r)
        if why:
            retests += 1
            r["disturbed"] = why
            r = step(qps)
            ladder.append(r)
        return r["valid"]

    def steps() -> int:
        return len(ladder) - retests

    q = max(estimate_qps * 0.5, floor_qps, 0.1)
    lo, hi = None, None
    while steps() < max_steps and (lo is None or hi is None):
        if run(q):
            lo = q
            q *= 1.5
        else:
            hi = q
            if q <= floor_qps:  # the floor itself was INVALID: nothing lower can be measured
                break
            above = next((r for r in reversed(ladder[:-1]) if r.get("target_qps") != ladder[-1].get("target_qps")),
                         None)
            # More than noise: 10 % worse at half the load.
            now = p99(ladder[-1])
            if lo is None and above is not None and now and p99(above) and now > 1.1 * p99(above):
                rose = True
                break
            q = max(q / 2, floor_qps)
    while lo is not None and hi is not None and hi / lo > 1 + precision and steps() < max_steps:
        mid = (lo * hi) ** 0.5
        if run(mid):
            lo = mid
        else:
            hi = mid
    best = max((r for r in ladder if r["valid"]), key=lambda r: r["target_qps"], default=None)
    return {"max_qps": best["target_qps"] if best else None, "best": best, "ladder": ladder,
            "bracket": [lo, hi], "latency_rose_as_load_fell": rose, "retested": retests}


def stall(service_ms: list, bound_ms: Optional[float], stalled_ms: float = 0.0, factor: float = 10.0) -> Optional[str]:
    """Why a test shows a stall of the machine, or None: one call took `factor` times the test's median call,
    or a stream sat free that long with a batch overdue (`stalled_ms`, Batcher._loop), and over a quarter
    of the bound. Under a queue at any load each call takes about what its batch costs and a free stream
    starts the next batch at once; 10x that is the machine pausing the process (a VM's hiccup, a page-fault
    storm), and at a few hundred QPS one pause of 150 ms queues enough requests to miss a p99."""
    if not service_ms or not bound_ms:
        return None
    med, worst = statistics.median(service_ms), max(service_ms)
    if worst > factor * med and worst > 0.25 * bound_ms:
        return (f"one call took {worst:.0f} ms, {worst / med:.0f}x the test's median call ({med:.2f} ms): a stall "
                "of the machine, not the queue; re-tested")
    if stalled_ms > factor * med and stalled_ms > 0.25 * bound_ms:
        return (f"the server sat {stalled_ms:.0f} ms with a batch due and its session free ({stalled_ms / med:.0f}x "
                f"the test's median call, {med:.2f} ms): a stall of the machine, not the queue; re-tested")
    return None
