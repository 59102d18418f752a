"""Data that ships offline: scikit-learn's digits, the docstrings of Python's standard library,
and users' own files (CSV / JSONL with text and label, NPZ with arrays x and y)."""
from __future__ import annotations

import ast
import csv
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

import numpy as np

from core import atomic
from core.cache import cache_dir


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): 8x8 images scaled to [0, 1], shape (N, 1, 8, 8).
    The split is fixed so that the built-in CNN never sees the evaluation images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_tr, y_tr, x_te, y_te


# Folders of the standard library whose docstrings are not English prose about the library.
_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip", "turtledemo",
         "__pycache__", "pydoc_data", "encodings"}


def stdlib_docstrings() -> tuple[list[str], list[str]]:
    """(train, heldout): paragraphs of the docstrings of the Python standard library, a real English
    corpus present on every machine. The held-out split is a fifth of the first paragraphs, chosen by
    a hash of the text, so it is stable. Training also gets the later paragraphs of every docstring
    whose first paragraph is not held out: more, varied text for distillation, and nothing from a
    held-out docstring."""
    path = cache_dir() / f"stdlib-docstrings-v2-py{sys.version_info[0]}{sys.version_info[1]}.json"
    if path.exists():
        d = json.loads(path.read_text())
        return d["train"], d["heldout"]
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[list[str]] = []
    files = sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")) + sorted(root.glob("*/*/*.py"))
    for f in files:
        if _SKIP.intersection(f.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append([" ".join(p.split()) for p in doc.split("\n\n")])

    def prose(p: str) -> bool:
        return 40 <= len(p) <= 600 and p.count(" ") >= 5

    def held_out(text: str) -> bool:
        return int(hashlib.sha1(text.encode()).hexdigest(), 16) % 5 == 0

    firsts = {d[0] for d in docs if prose(d[0])}
    heldout = {t for t in firsts if held_out(t)}
    train = firsts - heldout
    train |= {p for d in docs if d[0] not in heldout for p in d[1:] if prose(p)} - heldout
    order = lambda texts: sorted(texts, key=lambda t: hashlib.sha1(t.encode()).hexdigest())  # noqa: E731
    train_list, held_list = order(train), order(heldout)
    atomic.write_json(path, {"train": train_list, "heldout": held_list})
    return train_list, held_list


def read_text_file(path: Path, text_field: str, label_field: str | None) -> tuple[list[str], list]:
    """Rows of a .csv or .jsonl file: (texts, labels); labels empty when label_field is None. A .txt file
    (unlabelled text only) gives one row per document, documents separated by blank lines. A file the task
    cannot use (a missing column, a malformed line, rows without a text or a label) is a RecipeError that
    names the file, the field and the rows, raised before any work."""
    from core.errors import RecipeError, field_error

    fields = [("task.data.text_field", text_field)] + ([("task.data.label_field", label_field)] if label_field else [])
    rows: list[dict]
    if path.suffix == ".txt" and label_field is None:
        docs = [d.strip() for d in path.read_text(encoding="utf-8-sig", errors="replace").split("\n\n")]
        rows = [{text_field: d} for d in docs if d]
    elif path.suffix == ".csv":
        # utf-8-sig: a spreadsheet's byte-order mark would otherwise become part of the first column's name.
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = fh.readline()
            fh.seek(0)
            # The delimiter whose header holds the named columns (a European spreadsheet writes ';').
            wanted = [name for _, name in fields]
            delimiter = next((d for d in ",;\t|" if all(w in next(csv.reader([header], delimiter=d), [])
                                                           for w in wanted)), ",")
            rows = list(csv.DictReader(fh, delimiter=delimiter))
    elif path.suffix in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecipeError(f"{path}: line {n} is not JSON ({e.msg}): {line[:80]!r}") from None
            if not isinstance(row, dict):
                raise RecipeError(f"{path}: line {n} is a JSON {type(row).__name__}, not an object with "
                                  f"{' and '.join(repr(w) for _, w in fields)}")
            rows.append(row)
    else:
        accepted = ".csv or .jsonl" if label_field else ".txt, .csv or .jsonl"
        raise RecipeError(f"{path}: text data must be {accepted}, not '{path.suffix}'")
    if not rows:
        raise RecipeError(f"{path}: no rows")
    for field, name in fields:
        if name not in rows[0]:
            raise field_error(str(path), field, f"no column {name!r}; the columns are {sorted(rows[0])}")
        gaps = [i + 1 for i, r in enumerate(rows) if r.get(name) is None]
        if gaps:  # a jsonl row without the key or with null, a csv row cut short
            shown = ", ".join(map(str, gaps[:5])) + (f" and {len(gaps) - 5} more" if len(gaps) > 5 else "")
            raise field_error(str(path), field, f"{len(gaps)} row(s) have no {name!r} (rows {shown})")
    texts = [str(r[text_field]) for r in rows]
    labels = [r[label_field] for r in rows] if label_field else []
    return texts, labels
