"""The one cell planner, for a recipe run, `workbench bench FILE` and the search alike: every
(variant, backend, batch size) becomes a cell, measurable (with the job its processes run) or not
(failed / skipped, with the reason a person needs: the variant failed, its artifact is missing or
failed, the backend cannot run here, the backend cannot generate). A causal LM is measured by
generation (bench.generate: per-token decode latency, TTFT) wherever it is planned, so a search over
a decoder ranks what the report ranks."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from bench.cells import cell_job
from core.backends import BACKENDS


@dataclass
class Target:
    """One variant to measure: its artifacts by format ({"status", "reason", "path"}: an absolute path,
    or relative to `root`), or why it cannot be measured at all."""

    variant: str
    artifacts: dict[str, dict] = field(default_factory=dict)
    failed: Optional[str] = None  # the variant itself failed: why
    missing: Optional[Callable[[str], str]] = None  # fmt -> why there is no artifact of that format
    root: Optional[Path] = None


@dataclass
class Generation:
    """A causal LM's cells generate: prompts per batch size, new tokens, and the KV cache's bytes."""

    new_tokens: int
    prompts: Callable[..., "object"]  # (batch, length=seq_len) -> int64 array (batch, length)
    kv_bytes: Callable[[str, int], Optional[int]] = lambda variant, batch: None
    prompt_lens: list = field(default_factory=list)  # more prompt lengths each cell measures TTFT at


def plan(targets: list[Target], backends_of: Callable[[str], list[str]], batch_sizes: list[int], *, io, seq_len: int,
         threads: int, timing: dict, seed: int = 0, generation: Optional[Generation] = None,
         eval_inputs=None, outputs_dir: Optional[Path] = None, sys_path=(),
         options_of: Optional[Callable[[str, str], dict]] = None) -> tuple[list[dict], list[tuple[int, dict]]]:
    """(cells, [(index of the cell, its job)]) in the order variant, backend, batch size. `options_of(variant,
    backend)`: the engine options its cells run with ({}: the backend's measuring protocol alone; None: the
    engine's own defaults, for a reference variant)."""
    seq = seq_len if io.has_seq() else None
    cells, jobs = [], []
    for t in targets:
        for backend in backends_of(t.variant):
            cls = BACKENDS[backend]
            for batch in batch_sizes:
                shape = {"seq_len": seq, **({"new_tokens": generation.new_tokens} if generation else {})}
                cell = {"variant": t.variant, "format": cls.format, "backend": backend, "device": cls.device,
                        "batch_size": batch, "shape": shape, "status": None, "reason": None}
                cells.append(cell)
                outputs = outputs_dir / f"outputs-{len(cells)}.npy" if outputs_dir is not None else None
                job = _job(t, cls, cell, generation, options_of, io=io, batch=batch, seq_len=seq_len,
                           threads=threads, timing=timing, seed=seed, eval_inputs=eval_inputs,
                           outputs_path=outputs, sys_path=sys_path)
                if job is None:
                    continue
                if generation:
                    job.update(entry="bench.generate", prompts=generation.prompts(batch).tolist(),
                               new_tokens=generation.new_tokens)
                    if generation.prompt_lens:
                        job["prompts_by_len"] = {str(n): generation.prompts(batch, n).tolist()
                                                 for n in sorted(set(generation.prompt_lens))}
                    cell["generation"] = {"kv_cache_bytes": generation.kv_bytes(t.variant, batch),
                                          "context": seq_len + generation.new_tokens}
                jobs.append((len(cells) - 1, job))
    return cells, jobs


def _job(t: Target, cls, cell: dict, generation, options_of, *, io, batch: int, seq_len: int, threads: int,
         timing: dict, seed: int, **extra) -> Optional[dict]:
    """The job that measures `cell` (bench.cells.cell_job on the target's artifact of the backend's format,
    with the variant's engine options), or None when it cannot run: then `cell` says why."""
    why = _why_not(t, cls, generation)
    if why is None and cls.max_batch is not None and batch > cls.max_batch:
        why = "skipped", cls.max_batch_why or f"{cls.name} runs batches of at most {cls.max_batch}"
    if why:
        cell.update(status=why[0], reason=why[1])
        return None
    art = t.artifacts[cls.format]
    path = Path(art["path"]) if t.root is None else t.root / art["path"]
    job = cell_job(cls.name, path, io.to_json(), batch, seq_len, threads, timing, seed=seed,
                   options=options_of(t.variant, cls.name) if options_of else {}, **extra)
    if job["options"] is None:  # a reference: the engine as its defaults leave it
        cell["engine_defaults"] = True
    elif job["options"]:
        cell["options"] = job["options"]
    return job


def _why_not(t: Target, cls, generation) -> Optional[tuple[str, str]]:
    if t.failed is not None:
        return "failed", f"variant '{t.variant}' failed: {t.failed}"
    art = t.artifacts.get(cls.format)
    if art is None:
        return "skipped", (t.missing(cls.format) if t.missing else f"no {cls.format} artifact")
    if art["status"] != "ok":
        return art["status"], f"{cls.format} artifact {art['status']}: {art['reason']}"
    why = cls.unavailable()
    if why:
        return "skipped", why
    if generation and not cls.generates:
        return "skipped", (f"{cls.name} does not run the generation benchmark of causal LMs; these do: "
                           f"{', '.join(n for n, b in BACKENDS.items() if b.generates)}")
    return None


def plan_load(targets: list[Target], scenarios: list[dict], backends_of: Callable[[str], list[str]], *, io,
              seq_len: int, threads: int, timing: dict, seed: int, log_root: Path, sys_path=(),
              options_of: Optional[Callable[[str, str], dict]] = None,
              generation: Optional[Generation] = None,
              requests_of: Optional[Callable[[dict], Optional[dict]]] = None
              ) -> tuple[list[dict], list[tuple[int, dict]]]:
    """The load-scenario cells (bench.serve): each scenario (a workbench.recipe.ScenarioSpec dumped, with its
    `label`) for its variants (default all) on its backends (default each variant's), at the batch size
    its SUT batches up to. A causal LM's (`generation`) serve generations: a backend that cannot generate,
    or cannot batch that many, is a skipped cell with the reason. `requests_of(scenario)`: the task's
    evaluation rows its requests hold (bench.requests: their file and padding), or None for synthetic
    inputs. Same (cells, jobs) shape as `plan`."""
    cells, jobs = [], []
    for sc in scenarios:
        for t in targets:
            if sc.get("variants") and t.variant not in sc["variants"]:
                continue
            # The scenario's backends narrow the variant's own; none: all of the variant's.
            for backend in [b for b in backends_of(t.variant) if not sc.get("backends") or b in sc["backends"]]:
                cls = BACKENDS[backend]
                cell = {"variant": t.variant, "format": cls.format, "backend": backend, "device": cls.device,
                        "scenario": sc["label"], "type": sc["type"], "batch_size": sc["max_batch"],
                        "settings": {k: v for k, v in sc.items() if k not in ("variants", "backends", "name", "label")},
                        "status": None, "reason": None}
                if generation:
                    cell["shape"] = {"seq_len": seq_len, "new_tokens": generation.new_tokens}
                cells.append(cell)
                job = _job(t, cls, cell, generation, options_of, io=io, batch=sc["max_batch"], seq_len=seq_len,
                           threads=threads, timing=timing, seed=seed, sys_path=sys_path)
                if job is None:
                    continue
                job.update(entry="bench.serve", scenario=sc,
                           log_dir=str(log_root / f"{t.variant}--{backend}--{sc['label']}"))
                if generation:
                    job.update(prompts=generation.prompts(sc["max_batch"]).tolist(), new_tokens=generation.new_tokens)
                elif requests_of is not None and requests_of(sc) is not None:
                    job["requests"] = requests_of(sc)
                jobs.append((len(cells) - 1, job))
    return cells, jobs
