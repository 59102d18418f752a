"""Child processes of the workbench (bench cells, fresh-process parity, the harness check): their
environment, and how a child finds a backend or export format registered outside the project's
packages (in a user's module or a test)."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)  # the folder that holds core/, bench/, ...
MB = 1024 * 1024


def last_words(text: str, lines: int = 3, chars: int = 600) -> str:
    """The last non-empty lines of what a child process said, joined, at most `chars` long: the reason a
    failed converter or builder gives, for a recorded failure."""
    found = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return " | ".join(found[-lines:])[-chars:] or "no message"


def module_missing(module: str, install: str) -> str | None:
    """`install` (how to get it) when `module` cannot be imported here, else None; the module is found, not
    imported, so a parent process never loads an engine it only asks about."""
    import importlib.util

    return install if importlib.util.find_spec(module) is None else None


def child_env(threads: int | None = None) -> dict:
    """The parent's environment with the project importable, warnings off, and, when `threads` is
    given, every thread pool sized before the child imports anything (they read it at start-up)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
           "WORKBENCH_PARENT_PID": str(os.getpid())}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    return env


def locate(cls) -> list[str]:
    """[module, folder]: what a fresh process imports to find `cls` in its registry."""
    module = sys.modules[cls.__module__]
    path = getattr(module, "__file__", None)
    return [cls.__module__, str(Path(path).resolve().parent) if path else ""]


def import_located(spec) -> None:
    """In a fresh process: import the module that `locate` named (its folder goes last on sys.path,
    so it shadows nothing)."""
    module, folder = spec
    if folder and folder not in sys.path:
        sys.path.append(folder)
    importlib.import_module(module)


def default_threads() -> int:
    """Every core this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plugin_folders() -> list[str]:
    """Folders of the modules that registered a step, backend or format from outside the project's
    packages: a child process needs them to unpickle a module a step built there, or to find the
    backend itself."""
    from core.backends import BACKENDS
    from core.formats import FORMATS
    from core.steps import STEPS

    folders = []
    for cls in [*STEPS.values(), *BACKENDS.values(), *FORMATS.values()]:
        module, folder = locate(cls)
        if not folder:
            continue
        root = Path(folder).parents[module.count(".") - 1] if "." in module else Path(folder)
        if str(root) != ROOT and str(root) not in folders:  # the folder `module` imports from
            folders.append(str(root))
    return folders


def memory_bytes(field: str, pid: str | int = "self") -> int:
    """A process's VmRSS (resident now) or VmHWM (its peak) from /proc, in bytes; 0 if it is gone.
    VmHWM belongs to the process image: ru_maxrss would not do, since Linux carries it across exec
    and a child of a big parent would report the parent's peak."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def die_with_parent() -> None:
    """Called first thing in a child (bench worker, fresh-process reload): the kernel sends it SIGKILL
    when the process that started it dies, so a killed run leaves no orphan measuring on and writing
    its result into a dead run (Linux). Done in the child, not in a Popen preexec_fn, which would
    make every spawn a full fork: a Ctrl-C arriving during one is lost in the fork hooks. If the
    parent died before the call took effect, the child exits at once."""
    parent = os.environ.get("WORKBENCH_PARENT_PID")
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - elsewhere the child outlives its parent, as before
        return
    if parent and os.getppid() != int(parent):
        os._exit(1)


def pid_alive(pid) -> bool:
    """True when a process of that id exists (and is not a zombie)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{int(pid)}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        return False


_STOP = {"signal": None}


def request_stop(signum, frame) -> None:
    """Handler for SIGINT / SIGTERM: raise KeyboardInterrupt, and remember it. A KeyboardInterrupt
    that lands inside a finaliser or a logging lock is swallowed by Python ("Exception ignored
    in ..."); the loops that run for long check stop_requested() and raise it again."""
    _STOP["signal"] = signum
    raise KeyboardInterrupt


def stop_requested() -> bool:
    return _STOP["signal"] is not None


def clear_stop() -> None:
    _STOP["signal"] = None


@contextlib.contextmanager
def working_directory(path):
    """Run a block in `path`: for libraries that drop files into the current directory (ORT's symbolic
    shape inference, NNCF's debug graphs), inside a folder whose leftovers the caller clears."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
