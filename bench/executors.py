"""Where a run's cell processes execute: `local` (this machine, one at a time: the default) or `ray`
(each one a Ray task on a local Ray instance or a cluster; bench.ray_executor). Both measure a process
the same way (bench.rounds.measure_process) and give the same records, so results.json has one schema."""
from __future__ import annotations

from typing import Optional

from bench.rounds import LocalExecutor
from core.errors import RecipeError

EXECUTORS = ("local", "ray")


def make_executor(name: str, address: Optional[str] = None, placement: Optional[dict] = None):
    """The executor a run uses; a RecipeError (before any work) when Ray is missing or the cluster
    cannot take the run."""
    if name == "local":
        return LocalExecutor()
    if name != "ray":
        raise RecipeError(f"bench.executor: unknown executor {name!r}. Accepted: {', '.join(EXECUTORS)}")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RecipeError("bench.executor 'ray' needs the ray package, an optional extra: "
                          "pip install -e '.[ray]' (scripts/setup.sh installs it)") from None
    from bench.ray_executor import ClusterError, RayExecutor

    try:
        return RayExecutor(address, placement)
    except ClusterError as e:
        raise RecipeError(f"bench.executor 'ray': {e}") from None
    except ConnectionError as e:
        raise RecipeError(f"bench.ray_address {address!r}: could not join a Ray cluster there ({e}); "
                          "`ray start --head` prints the address to give") from None
