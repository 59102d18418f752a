"""The requests a load test sends: the task's evaluation inputs, one row each at its own length.

A server receives texts of whatever length its users write, not one fixed shape: the held-out
docstrings MiniLM is measured on have a median of 17 tokens (p90 41) under a 128-token cap, so a load
test that sent every request padded to 128 would charge each one several times its real work, and
would hide what batching does with short inputs. So the query sample library (LoadGen's QSL) holds the
task's evaluation rows, each cut to its own tokens (its attention mask), and a batch of them is padded
to its longest member, rounded up to `multiple` (as a server pads: a few shapes, not one per length; an
engine that compiles per shape compiles each once, at warm-up). Inputs without a sequence axis (images)
are rows as they are.

`rows` runs where the task is (the run's main process), which saves them with runtime.infer's
save_batches; `collate` runs in the serving process, on what load_batches reads back."""
from __future__ import annotations

import numpy as np

MASK = "attention_mask"


def seq_axes(io) -> dict[str, int]:
    """Each input's sequence axis, for the inputs that have one (a core.model.ModelIO)."""
    return {name: spec["shape"].index("seq") for name, spec in io.inputs.items() if "seq" in spec["shape"]}


def rows(batches: list[dict[str, np.ndarray]], io, limit: int) -> tuple[list[dict[str, np.ndarray]], dict]:
    """Up to `limit` evaluation rows, each a batch of one at its own length, and the value each sequence
    input is padded with (read from the evaluation batches' own padding, which the tokenizer wrote; 0 where
    no row was padded). `max_width(batches, io)` is the widest the task padded to."""
    axes = seq_axes(io)
    pad: dict[str, int] = {}
    out = []
    for b in batches:
        mask = b.get(MASK) if MASK in axes else None
        for i in range(len(next(iter(b.values())))):
            if len(out) == limit:
                break
            keep = None if mask is None else np.flatnonzero(mask[i])  # right- or left-padded alike
            row = {}
            for name, v in b.items():
                x = v[i:i + 1]
                if keep is not None and name in axes:
                    ax = axes[name]
                    if name not in pad and len(keep) < x.shape[ax]:
                        gone = np.setdiff1d(np.arange(x.shape[ax]), keep)
                        pad[name] = int(np.take(x, gone[:1], axis=ax).flat[0])
                    x = np.take(x, keep, axis=ax)
                row[name] = np.ascontiguousarray(x)
            out.append(row)
    return out, {name: pad.get(name, 0) for name in axes}


def max_width(batches: list[dict[str, np.ndarray]], io) -> int:
    axes = seq_axes(io)
    return max((v.shape[axes[k]] for b in batches for k, v in b.items() if k in axes), default=0)


def length(row: dict[str, np.ndarray], axes: dict[str, int]) -> int:
    """A row's tokens (0 for an input without a sequence axis)."""
    return max((row[name].shape[ax] for name, ax in axes.items() if name in row), default=0)


def padded_length(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if n else 0


def padded_width(n: int, multiple: int, cap: int = 0) -> int:
    """The width a batch whose longest row has `n` tokens is padded to: rounded up, at most `cap`."""
    return min(padded_length(n, multiple), cap) if cap else padded_length(n, multiple)


def widths(lengths, multiple: int, cap: int = 0) -> list[int]:
    """The padded widths batches of rows of these lengths take, sorted."""
    return sorted({padded_width(n, multiple, cap) for n in lengths})


def collate(picked: list[dict[str, np.ndarray]], axes: dict[str, int], pad: dict[str, int],
            multiple: int, width: int = 0, cap: int = 0) -> dict[str, np.ndarray]:
    """One batch of rows: each sequence input right-padded to the longest row rounded up to `multiple`,
    never past `cap` (the task's own padded width: rounding up must not outgrow what the model was
    given), the others stacked. `width`: exactly that many tokens instead, longer rows cut (warm-up,
    which must meet every shape a test can, whatever the rows it borrows for it)."""
    width = width or padded_width(max(length(r, axes) for r in picked), multiple, cap)
    out = {}
    for name in picked[0]:
        parts = [r[name] for r in picked]
        if name in axes:
            ax = axes[name]
            parts = [np.take(p, np.arange(min(width, p.shape[ax])), axis=ax) for p in parts]
            parts = [np.pad(p, [(0, width - p.shape[ax]) if d == ax else (0, 0) for d in range(p.ndim)],
                            constant_values=pad.get(name, 0)) for p in parts]
        out[name] = np.concatenate(parts, axis=0)
    return out


def pack(picked: list[dict[str, np.ndarray]], axes: dict[str, int], pad: dict[str, int], multiple: int,
         width: int = 0) -> dict[str, np.ndarray]:
    """One row holding the requests' tokens one after another (export.packing), padded to their total
    rounded up to `multiple`: each sequence input concatenated along its axis, the attention mask numbering
    each request's tokens 1, 2, ... and its padding 0. The model answers one row per request, in order.
    `width`: exactly that many tokens instead, the last requests cut (warm-up, for the shape)."""
    total = sum(length(r, axes) for r in picked)
    width = width or padded_length(total, multiple)
    out = {}
    for name, ax in axes.items():
        parts = [np.full_like(r[name], k + 1) if name == MASK else r[name] for k, r in enumerate(picked)]
        row = np.concatenate(parts, axis=ax)
        row = np.take(row, np.arange(min(width, row.shape[ax])), axis=ax)
        out[name] = np.pad(row, [(0, width - row.shape[ax]) if d == ax else (0, 0) for d in range(row.ndim)],
                           constant_values=0 if name == MASK else pad.get(name, 0))
    return out


def lengths_summary(picked: list[dict[str, np.ndarray]], axes: dict[str, int]) -> dict:
    """The requests' token counts as results.json keeps them."""
    n = np.asarray([length(r, axes) for r in picked])
    if not axes or not len(n):
        return {}
    p50, p90 = (round(float(np.percentile(n, q)), 1) for q in (50, 90))
    return {"p50": p50, "p90": p90, "max": int(n.max()), "mean": round(float(n.mean()), 2)}
