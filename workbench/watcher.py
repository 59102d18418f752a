"""The watcher of a run: a small process started with the run that outlives it only to say how it
ended. A run killed outright (SIGKILL, the kernel's out-of-memory killer) cannot write its own
status; when the watcher sees its parent gone and status.json still saying `running`, it records
`interrupted` with the reason and adds the end to run.log, so the folder never passes for a run
in progress.

    python -m workbench.watcher RUN_DIR/status.json PARENT_PID
"""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

POLL_S = 0.25


def watch(status_path: Path, parent: int) -> None:
    while os.getppid() == parent:  # re-parented: the run's process is gone
        time.sleep(POLL_S)
    from core import atomic

    try:
        status = json.loads(status_path.read_text())
    except (OSError, ValueError):
        return
    if status.get("state") != "running":
        return  # the run wrote how it ended
    ended = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    why = (f"the workbench process (pid {status.get('pid')}) was killed before it finished (SIGKILL, out of "
           f"memory, or a crash); `workbench run --resume {status_path.parent}` finishes it")
    atomic.write_json(status_path, {**status, "state": "interrupted", "ended": ended, "reason": why})
    with open(status_path.parent / "run.log", "a") as fh:
        fh.write(f"{ended} ERROR workbench.watcher: run killed: {why}\n")


if __name__ == "__main__":
    watch(Path(sys.argv[1]), int(sys.argv[2]))
