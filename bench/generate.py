"""One generation cell of a causal LM, in its own process: `python -m bench.generate JOB.json`.

The job is a bench.cells job plus `prompts` (token ids, batch x prompt length, drawn from the corpus
with the run's seed; in the job itself, so it travels with it to any node) and `new_tokens`. One measured generation is greedy decoding of
exactly `new_tokens` tokens: the prefill with the first token is the time to first token (TTFT), each
later token one decode step. The samples are the decode steps of every timed generation, so the
cell's latency statistics (and everything the report derives from them) are per-token decode latency
and its throughput is tokens/s over the batch; TTFT is kept beside them. Warm-up, minimum iterations
and seconds are the recipe's timing protocol, counted in decode steps."""
from __future__ import annotations

import sys
import time

MIN_GENERATIONS = 3  # timed generations at least, whatever the step counts say
MAX_WARMUP = 3  # warm-up generations at most: one generation is many calls already


def run(job: dict) -> dict:
    import numpy as np

    from bench.worker import setup
    from core.backends import engine_kwargs
    from core.processes import memory_bytes

    backend, torch, threads = setup(job)
    prompts = np.asarray(job["prompts"], dtype=np.int64)
    mask = np.ones_like(prompts)
    n_new, timing = int(job["new_tokens"]), job["timing"]

    rss_before = memory_bytes("VmRSS")
    started = time.time()
    t0 = time.perf_counter()
    gen = backend.load_generator(job["path"], threads, **engine_kwargs(backend, job))
    load_s = time.perf_counter() - t0
    on_cuda = torch is not None and job["device"] == "cuda" and torch.cuda.is_available()
    if on_cuda and backend.uses_torch_allocator:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ids, first = gen.generate(prompts, mask, n_new)
    first_ms = (time.perf_counter() - t0) * 1e3
    # Peak memory over one whole generation at this batch and context (prompt + new tokens), read
    # before the timed ones, as bench.worker does for forward passes.
    memory = {"peak_rss_delta": max(memory_bytes("VmHWM") - rss_before, 0), "rss_idle_baseline": rss_before}
    if on_cuda and backend.uses_torch_allocator:
        memory["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated())

    warmup_ms, samples, ttft, generations = [], [], [], 0
    for _ in range(min(int(timing["warmup"]), MAX_WARMUP)):
        t0 = time.perf_counter()
        gen.generate(prompts, mask, n_new)
        warmup_ms.append(round((time.perf_counter() - t0) * 1e3, 4))
    t_start = time.perf_counter()
    capped = False
    while True:
        out, t = gen.generate(prompts, mask, n_new)
        samples += t["decode_ms"]
        ttft.append(t["prefill_ms"])
        generations += 1
        elapsed = time.perf_counter() - t_start
        if elapsed >= timing["max_seconds"]:
            capped = generations < MIN_GENERATIONS or len(samples) < timing["min_iters"]
            break
        if generations >= MIN_GENERATIONS and len(samples) >= timing["min_iters"] and elapsed >= timing["min_seconds"]:
            break
    # Greedy decoding of the same prompts is deterministic: another answer means the backend is not.
    same = bool(np.array_equal(out, ids))
    by_len = ttft_by_prompt_len(gen, job.get("prompts_by_len") or {}, generations, rss_before)
    result = {"samples_ms": [round(x, 6) for x in samples], "warmup_ms": warmup_ms, "capped_by_max_seconds": capped,
              "started": round(started, 3), "memory": memory,
              "cold": {"load_s": round(load_s, 4), "first_call_ms": round(first_ms, 3),
                       "first_call_timed_ms": round(first["prefill_ms"] + sum(first["decode_ms"]), 3)},
              "threads": {"requested": threads, **gen.info},
              "generation": {"ttft_ms": [round(x, 6) for x in ttft], "generations": generations,
                             "prompt_len": int(prompts.shape[1]), "new_tokens": n_new,
                             "deterministic": same, "tokens": ids[:, :8].tolist(),
                             **({"by_prompt_len": by_len} if by_len else {})}}
    if job.get("eval_inputs"):
        # Perplexity and fidelity from the logits this backend computes, on the real evaluation split.
        from runtime.infer import load_batches, reduce_outputs

        outs = [reduce_outputs(gen.logits(b["input_ids"], b["attention_mask"]), b)
                for b in load_batches(job["eval_inputs"])]
        np.save(job["outputs_path"], np.concatenate(outs).astype(np.float32))
    return result


def ttft_by_prompt_len(gen, prompts_by_len: dict, generations: int, rss_before: int) -> dict:
    """TTFT (a prefill with its first token) at each further prompt length, shortest first: one untimed
    (a new shape, or a bigger context for engines that size it up front), then as many timed as the cell's
    generations (3 to 10). The peak RSS increase is the process's peak up to that length."""
    import numpy as np

    from core.processes import memory_bytes

    out = {}
    for n in sorted(prompts_by_len, key=int):
        p = np.asarray(prompts_by_len[n], dtype=np.int64)
        mask = np.ones_like(p)
        gen.generate(p, mask, 1)
        times = [gen.generate(p, mask, 1)[1]["prefill_ms"] for _ in range(max(MIN_GENERATIONS, min(generations, 10)))]
        out[str(n)] = {"ttft_ms": [round(x, 6) for x in times],
                       "peak_rss_delta": max(memory_bytes("VmHWM") - rss_before, 0)}
    return out


def merge(processes: list[dict]) -> dict:
    """A generation cell's own figures over its processes: TTFT percentiles over every timed
    generation, and what the first process generated (its first tokens per prompt)."""
    import numpy as np

    ttft = np.concatenate([p["generation"]["ttft_ms"] for p in processes]).astype(np.float64)
    first = processes[0]["generation"]
    by_len = {}
    for n in processes[0]["generation"].get("by_prompt_len") or {}:
        t = np.concatenate([p["generation"]["by_prompt_len"][n]["ttft_ms"] for p in processes]).astype(np.float64)
        by_len[n] = {"ttft_ms": _percentiles(t),
                     "peak_rss_delta": max(p["generation"]["by_prompt_len"][n]["peak_rss_delta"] for p in processes)}
    return {"ttft_ms": _percentiles(ttft), **({"by_prompt_len": by_len} if by_len else {}),
            "prompt_len": first["prompt_len"], "new_tokens": first["new_tokens"],
            "generations": sum(p["generation"]["generations"] for p in processes),
            "deterministic": all(p["generation"]["deterministic"] for p in processes), "tokens": first["tokens"]}


def _percentiles(x) -> dict:
    import numpy as np

    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"p50": round(float(p50), 4), "p90": round(float(p90), 4), "p99": round(float(p99), 4),
            "mean": round(float(x.mean()), 4), "n": int(x.size)}


def main() -> int:
    from bench.worker import serve

    return serve(run)


if __name__ == "__main__":
    sys.exit(main())
