"""A run's folder and log: `<out>/<recipe>/<run id>/`, created once and never reused, with run.log
beside what the run writes. The console gets progress bars and short lines; details go to the log."""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from core.errors import one_line
from core.progress import write

log = logging.getLogger("workbench")


def new_run_dir(root: Path, name: str) -> Path:
    base = root / name
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        d = base / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            d.mkdir(parents=True)
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run directory under {base}")


def open_log(run_dir: Path) -> logging.Handler:
    """run.log gets the workbench's own lines and, instead of the console, what the libraries say:
    Python warnings and records of loggers without a handler of their own (ONNX Runtime's
    quantizer logs to the root logger)."""
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.captureWarnings(True)
    for name in ("py.warnings", ""):
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("py.warnings").propagate = False
    return handler


def route_library_loggers() -> None:
    """Libraries with a console handler of their own (transformers prints its warnings through one,
    e.g. "`loss_type=None` was set in the config but it is unrecognized") are sent to run.log with
    everything else. Only for what is already imported: importing a library to silence it would cost
    every run its import time."""
    import sys

    if "transformers" in sys.modules:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_default_handler()
            hf_logging.enable_propagation()
        except Exception:  # noqa: BLE001 - an unusual transformers build keeps its own handler
            pass


def close_log(handler: logging.Handler) -> None:
    for name in ("workbench", "py.warnings", ""):
        logging.getLogger(name).removeHandler(handler)
    logging.captureWarnings(False)
    handler.close()


def say(msg: str) -> None:
    """A line for the person watching and for the log."""
    log.info(msg)
    write(msg)


def writable_folder(path, flag: str) -> None:
    """Make the folder a command writes into (if missing), before any work: a file there, or a place this
    user may not write, is the command line's to fix (a RecipeError naming the flag)."""
    from core.errors import RecipeError

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RecipeError(f"{flag} {str(path)!r}: a file is in the way; give a folder") from None
    except OSError as e:
        raise RecipeError(f"{flag} {str(path)!r}: cannot be made here ({e.strerror})") from None


def reason(e: BaseException) -> str:
    """One line naming the exception: what a failed variant, artifact or cell records (core.errors.one_line)."""
    return one_line(e)


class _Watcher:
    def __init__(self, proc):
        self.proc = proc

    def stop(self) -> None:
        """The run wrote its own end: the watcher has nothing left to do."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def watch_status(status_path: Path) -> _Watcher:
    """Start workbench.watcher for this run: it records `interrupted` if this process is killed.
    In its own session, so a Ctrl-C meant for the run does not stop the watcher first."""
    import os
    import subprocess
    import sys

    from core.processes import child_env

    try:
        proc = subprocess.Popen([sys.executable, "-m", "workbench.watcher", str(status_path), str(os.getpid())], env=child_env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError:  # the run goes on; only a hard kill would go unrecorded
        proc = None
    return _Watcher(proc)
