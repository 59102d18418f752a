"""Cells measured as Ray tasks, over the machines of a Ray cluster (or a local Ray instance).

The measurement is the local one (bench.rounds.measure_process: a fresh process per measurement,
the noise meter around it); Ray only decides where it runs. What keeps the numbers honest:
- Every node offers one unit of TIMING_RESOURCE and every cell process asks for it, so two timed
  processes never share a node. A local instance is started with it; a cluster's nodes are started
  with `--resources '{"workbench_timing": 1}'` (the executor refuses a cluster where none has it).
- A cell's later rounds are pinned to the node its first process ran on: a cell's statistics never
  mix two machines. Rounds stay interleaved: round r + 1 starts when round r has ended everywhere.
- Artifacts and evaluation inputs travel through Ray's object store, checked by sha256 on arrival
  and kept in a node-local cache; a cell's outputs come back in its result.

Faults: Ray retries a task whose worker or node died (RAY_RETRIES times); a cell whose node is gone
for good fails with the reason. Every finished process reaches the run's journal as it arrives, so
`--resume` keeps it."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from bench.rounds import measure_process
from core.processes import ROOT, default_threads, stop_requested

TIMING_RESOURCE = "workbench_timing"
RAY_RETRIES = 2  # Ray re-runs a process whose worker or node died this many times, then the cell fails
CACHE = Path(os.environ.get("WORKBENCH_RAY_CACHE", Path.home() / ".cache" / "model-workbench" / "ray"))
SHIPPED = ("path", "eval_inputs")  # the job's files a node needs; outputs_path comes back as bytes


class ClusterError(RuntimeError):
    """The cluster cannot run this recipe's cells (no timing resource, nothing that fits)."""


def _companions(path: Path) -> list[Path]:
    """The artifact and the files stored beside it under its stem (ONNX external data
    `model.onnx.data`, a module file's digest `module.sha256`, its io description `module.pt.io.json`):
    what a node needs to load it."""
    return [path] + sorted(p for p in path.parent.glob(path.stem + ".*") if p.is_file() and p != path)


# --------------------------------------------------------------------------- on the node
_NODE: dict[str, Any] = {}


def node_identity(threads: Optional[int]) -> dict:
    """This node: Ray's id, host name, address and environment fingerprint (read once per worker)."""
    if not _NODE:
        import ray

        from core.environment import fingerprint

        env = fingerprint(threads)
        hardware = {k: env.get(k) for k in ("cpu", "cpu_flags", "cores_logical", "gpu", "gpu_count")}
        _NODE.update(id=ray.get_runtime_context().get_node_id(), hostname=socket.gethostname(),
                     ip=ray.util.get_node_ip_address(), environment=env,
                     hardware_sha=hashlib.sha256(json.dumps(hardware, sort_keys=True).encode()).hexdigest()[:12])
    return dict(_NODE)


CACHE_DAYS = 7  # shipped files unused this long are removed from a node's cache


def _prune_cache() -> None:
    """Once per Ray worker: drop shipped files and bundles no run has used for CACHE_DAYS (each use
    touches them), so a node's cache does not grow with every artifact it ever measured."""
    if _NODE.get("pruned"):
        return
    _NODE["pruned"] = True
    limit = time.time() - CACHE_DAYS * 86400
    for kind in ("files", "bundles"):
        for folder in (CACHE / kind).glob("*"):
            try:
                if folder.stat().st_mtime < limit:
                    for f in folder.iterdir():
                        f.unlink()
                    folder.rmdir()
            except OSError:
                continue  # another worker's, or in use


def _materialise(files: dict[str, list]) -> dict[str, str]:
    """Write the shipped files into the node's cache, each checked against its sha256; returns the
    job's keys with their node-local paths. Files already there (same sha256) are not rewritten."""
    import ray

    _prune_cache()
    out = {}
    for key, entries in files.items():
        for name, sha, ref in entries:
            folder = CACHE / "files" / sha
            target = folder / name
            if target.exists():
                os.utime(folder)  # in use: kept by _prune_cache
            else:
                data = ray.get(ref)
                if hashlib.sha256(data).hexdigest() != sha:
                    raise RuntimeError(f"{name} arrived with a different sha256 than it left with")
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f".{name}.{os.getpid()}.part"
                tmp.write_bytes(data)
                os.replace(tmp, target)
        # Companions must sit beside the artifact under their own names: link them into one folder.
        main_name = entries[0][0]
        bundle = CACHE / "bundles" / hashlib.sha256("".join(e[1] for e in entries).encode()).hexdigest()[:24]
        bundle.mkdir(parents=True, exist_ok=True)
        os.utime(bundle)
        for name, sha, _ in entries:
            link = bundle / name
            if not link.exists():
                try:
                    os.symlink(CACHE / "files" / sha / name, link)
                except FileExistsError:
                    pass
        out[key] = str(bundle / main_name)
    return out


def _count_attempt(spec: dict) -> int:
    """How many times this process has been started (Ray re-runs it after a worker or node died):
    a counter file per process in the node's cache."""
    from bench.rounds import Journal

    path = CACHE / "attempts" / f"{Journal.fingerprint(spec)}-{spec.get('_attempt_key', '')}"
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(n))
    return n


def measure_on_node(spec: dict, files: dict, timeout_s: float, memory_limit_mb: Optional[float]):
    """The Ray task: one process of a cell, measured on whichever node Ray placed it."""
    began = time.time()
    attempt = _count_attempt(spec)
    node = node_identity(spec.get("threads"))
    spec = {**spec, **_materialise(files)}
    outputs_path = None
    work = CACHE / "work" / str(os.getpid())
    if spec.get("outputs_path"):
        outputs_path = work / "outputs.npy"
        spec["outputs_path"] = str(outputs_path)
    failed, record = measure_process(spec, timeout_s, work, memory_limit_mb)
    outputs = None
    if outputs_path is not None and outputs_path.exists():
        outputs = outputs_path.read_bytes()
        outputs_path.unlink()
    # The task's own span around the measured process's `ran`: what the task added on the node.
    return failed, {**record, "node": node, "ray_attempts": attempt,
                    "ray_task": [round(began, 3), round(time.time(), 3)]}, outputs


def profile_on_node(job: dict, files: dict, timeout_s: float, memory_limit_mb: Optional[float]) -> dict:
    from bench.cells import run_cell

    job = {**job, **_materialise(files)}
    return run_cell(job, timeout_s, CACHE / "work" / str(os.getpid()), memory_limit_mb)


# --------------------------------------------------------------------------- the driver
class RayExecutor:
    """Runs each round's processes as Ray tasks; see the module's docstring."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, placement: Optional[dict] = None):
        import ray

        # Ray's own console handler would print its notices ("Token authentication is enabled ...")
        # over the progress lines: its records go up to the run's log instead (a NullHandler swallows
        # those that come before the run's log is open).
        ray_log = logging.getLogger("ray")
        for h in list(ray_log.handlers):
            ray_log.removeHandler(h)
        ray_log.addHandler(logging.NullHandler())
        ray_log.propagate = True
        self.ray, self.placement = ray, placement or {}
        self.started_here = address is None
        t0 = time.perf_counter()
        env = {"env_vars": {"PYTHONPATH": ROOT + (os.pathsep + os.environ["PYTHONPATH"]
                                                  if os.environ.get("PYTHONPATH") else "")}}
        kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                  configure_logging=False, runtime_env=env)
        if address is None:
            # A local instance: this machine as one node, offering the timing resource once. Ray turns
            # token authentication on for it and prints a notice saying so, through a handler of its own.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            ray.init(num_cpus=default_threads(), resources={TIMING_RESOURCE: 1}, **kw)
        else:
            ray.init(address=address, **kw)
        self.init_s = time.perf_counter() - t0
        self.address = address or "local"
        self._refs: dict[str, list] = {}
        self._pinned: dict[str, str] = {}  # job fingerprint -> node id of its first process
        self._run = f"{os.getpid()}-{int(time.time())}"
        nodes = self.nodes()
        if not any(n["resources"].get(TIMING_RESOURCE) for n in nodes.values()):
            self.close()
            raise ClusterError(
                f"no node of the Ray cluster at {address} offers the '{TIMING_RESOURCE}' resource, which keeps two "
                f"timed cells off one machine; start every node with "
                f"ray start ... --resources='{{\"{TIMING_RESOURCE}\": 1}}'")
        self._task = ray.remote(measure_on_node)
        self._profile = ray.remote(profile_on_node)

    def nodes(self) -> dict[str, dict]:
        """The cluster's live nodes: id -> {hostname, address, resources}."""
        return {n["NodeID"]: {"hostname": n.get("NodeManagerHostname"), "address": n.get("NodeManagerAddress"),
                              "resources": n.get("Resources", {})}
                for n in self.ray.nodes() if n.get("Alive")}

    def describe(self) -> dict:
        return {"name": self.name, "address": self.address, "init_s": round(self.init_s, 3),
                "nodes": self.nodes(), "placement": self.placement}

    def _files(self, job: dict) -> dict:
        files = {}
        for key in SHIPPED:
            if not job.get(key):
                continue
            path = Path(job[key])
            if str(path) not in self._refs:
                entries = []
                for p in _companions(path):
                    data = p.read_bytes()
                    entries.append([p.name, hashlib.sha256(data).hexdigest(), self.ray.put(data)])
                self._refs[str(path)] = entries
            files[key] = self._refs[str(path)]
        return files

    def resources(self, job: dict) -> dict:
        """What a cell process asks Ray for: its threads as CPUs, a GPU for a CUDA backend, the timing
        token, and the backend's `bench.placement` resources (a hardware kind, say)."""
        extra = dict((self.placement.get(job["backend"]) or {}).get("resources") or {})
        return {"num_cpus": int(job["threads"]), "num_gpus": 1 if job.get("device") == "cuda" else 0,
                "resources": {TIMING_RESOURCE: 1, **extra}}

    @staticmethod
    def _unplaceable(need: dict, pinned: Optional[str], nodes: dict) -> Optional[str]:
        """Why no live node (`nodes`, from nodes()) can ever run a process with `need` (Ray would wait
        for one forever)."""
        if pinned is not None:
            return None if pinned in nodes else (
                f"node {pinned[:12]} that measured this cell's first round left the cluster; a cell is never "
                "measured across two machines")
        want = {"CPU": need["num_cpus"], "GPU": need["num_gpus"], **need["resources"]}
        for n in nodes.values():
            if all(n["resources"].get(k, 0) >= v for k, v in want.items() if v):
                return None
        return (f"no node of the cluster offers {json.dumps({k: v for k, v in want.items() if v})}; nodes offer "
                + "; ".join(f"{n['hostname']}: {json.dumps(n['resources'], sort_keys=True)}" for n in nodes.values()))

    def run_round(self, todo: list[tuple[Any, dict, dict]], round_: int, timeout_s: float, work_dir: Path,
                  memory_limit_mb: Optional[float]) -> Iterator[tuple[Any, bool, dict]]:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from bench.rounds import Journal

        pending: dict = {}
        live = self.nodes()  # one look at the cluster per round: who can take each process
        for key, job, spec in todo:
            fp = Journal.fingerprint(job)
            need = self.resources(job)
            pinned = self._current(self._pinned.get(fp), live)
            why = self._unplaceable(need, pinned, live)
            if why:
                yield key, True, {"status": "failed", "reason": why}
                continue
            opts = dict(need, max_retries=RAY_RETRIES, retry_exceptions=False)
            if pinned:
                opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(pinned, soft=False)
            keyed = {**spec, "_attempt_key": f"{self._run}-{round_}"}  # counts Ray's retries of this process
            ref = self._task.options(**opts).remote(keyed, self._files(spec), timeout_s, memory_limit_mb)
            pending[ref] = (key, fp, job)
        try:
            while pending:
                if stop_requested():
                    raise KeyboardInterrupt
                done, _ = self.ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in done:
                    key, fp, job = pending.pop(ref)
                    try:
                        failed, record, outputs = self.ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - a lost worker or node is a failed cell, not a crash
                        yield key, True, {"status": "failed", "reason": _ray_reason(e)}
                        continue
                    if outputs is not None and job.get("outputs_path"):
                        _write_bytes(Path(job["outputs_path"]), outputs)
                    node = record.get("node") or {}
                    if node.get("id"):
                        self._pinned.setdefault(fp, node["id"])
                        node["resources"] = live.get(node["id"], {}).get("resources", {})
                    yield key, failed, record
        except BaseException:
            for ref in pending:
                self.ray.cancel(ref, force=True)
            raise

    def _current(self, node_id: Optional[str], live: dict) -> Optional[str]:
        """The node a cell is pinned to, as it stands now: a local instance started afresh (a resumed
        run) has new node ids for the same machine, so an id it no longer has pins nothing."""
        if node_id and node_id not in live and self.started_here:
            return None
        return node_id

    def pin(self, job: dict, node_id: str) -> None:
        """A resumed run: the processes the journal kept decide where the rest of the cell runs (see
        _current for a local instance's stale ids)."""
        from bench.rounds import Journal

        self._pinned.setdefault(Journal.fingerprint(job), node_id)

    def run_once(self, job: dict, timeout_s: float, work_dir: Path, memory_limit_mb: Optional[float],
                 node: Optional[dict] = None) -> dict:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts = dict(self.resources(job), max_retries=RAY_RETRIES)
        live = self.nodes()
        pinned = self._current((node or {}).get("id"), live)
        if pinned:
            if pinned not in live:
                return {"status": "failed", "reason": f"node {pinned[:12]} left the cluster"}
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(pinned, soft=False)
        try:
            return self.ray.get(self._profile.options(**opts).remote(job, self._files(job), timeout_s,
                                                                      memory_limit_mb))
        except Exception as e:  # noqa: BLE001
            return {"status": "failed", "reason": _ray_reason(e)}

    def close(self) -> None:
        self._refs.clear()
        if self.ray.is_initialized():
            self.ray.shutdown()


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _ray_reason(e: Exception) -> str:
    """A Ray failure in a person's words: the first line of Ray's message, with what it means."""
    name = type(e).__name__
    first = (str(e).strip().splitlines() or [""])[0][:300]
    if "WorkerCrashed" in name or "worker died" in first.lower():
        return f"the Ray worker measuring this cell died, {RAY_RETRIES} retries included ({name}: {first})"
    if "NodeDied" in name or "node" in first.lower() and "died" in first.lower():
        return f"the node measuring this cell was lost ({name}: {first})"
    return f"{name}: {first}"
