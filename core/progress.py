"""Progress for a person: tqdm bars on a terminal; on a pipe or a log file, plain lines (one when a
stage ends, one a minute while it runs) instead of thousands of carriage-return redraws. Nested
bars (leave=False: a distillation epoch, a layer) show only on a terminal."""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import time

HEARTBEAT_S = 60.0  # a long stage on a pipe says where it is this often


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", leave: bool = True):
    """A tqdm bar where stderr is a terminal, else a Lines reporter with the same small interface
    (iteration, update, set_postfix(_str), close, write)."""
    if on_terminal():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
    return Lines(iterable, total=total, desc=desc, unit=unit, leave=leave)


def write(msg: str) -> None:
    """A line that does not tear a bar on a terminal."""
    if on_terminal():
        from tqdm import tqdm

        tqdm.write(msg)
    else:
        print(msg, flush=True)


class Lines:
    def __init__(self, iterable=None, *, total=None, desc="", unit="it", leave=True):
        self.iterable, self.desc, self.unit, self.show = iterable, desc, unit, leave
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix, self.closed = 0, "", False
        self.t0 = self.last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.show and time.monotonic() - self.last > HEARTBEAT_S:
            self.last = time.monotonic()
            self._line(final=False)

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        if self.show and not self.closed:
            self._line(final=True)
        self.closed = True

    def _line(self, final: bool) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        now = "" if final or not self.postfix else f", now {self.postfix}"
        units = self.unit + ("es" if self.unit.endswith("s") else "s")
        print(f"{self.desc}: {self.n}{of} {units} in {time.monotonic() - self.t0:.0f} s{now}",
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def library_prints(logger: str):
    """Libraries that print() their notices (torch-pruning's "Warning! No positional inputs found",
    ORT's "Collecting tensor data and making histogram ..."): the lines go to the logger (run.log
    during a run), not to the console."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            yield
    finally:
        for line in out.getvalue().splitlines():
            if line.strip():
                logging.getLogger(logger).info(line.strip())
