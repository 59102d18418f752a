"""What to ship, ready to pick up: RUN_DIR/recommended/ holds a copy of the recommended cell's model file, its
input description (`<file>.io.json`), `load_and_call.py` (loads the file the way the cell's backend did and calls
it once on inputs built from the .io.json) and a README saying what it is. Rewritten with every report."""
from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path
from string import Template
from typing import Optional

from reporting.analysis import MB, Recommendation, fmt_num as _fmt
from core import atomic

FOLDER = "recommended"

# load_and_call.py = _HEAD + the loader of the file's format + _TAIL. string.Template, since the code has braces.
_HEAD = '''"""Loads $file (variant `$variant`, recommended by model-workbench for `$backend`) the way the benchmark
ran it and calls it once on random inputs built from $file.io.json, then prints the output's shape.

    python load_and_call.py [BATCH] [SEQ_LEN]    (default: batch $batch as measured; SEQ_LEN $seq, for `seq` dims)
"""
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODEL = HERE / "$file"
BATCH = int(sys.argv[1]) if len(sys.argv) > 1 else $batch
SEQ = int(sys.argv[2]) if len(sys.argv) > 2 else $seq

# The inputs as the benchmark made them: dims "batch" and "seq" filled in, integers drawn from [low, high).
io = json.loads((HERE / "$file.io.json").read_text())
rng = np.random.default_rng(0)
inputs = {}
for name, spec in io["inputs"].items():
    shape = [BATCH if d == "batch" else SEQ if d == "seq" else int(d) for d in spec["shape"]]
    if spec["dtype"].startswith("int"):
        inputs[name] = rng.integers(spec.get("low", 0), spec.get("high", 2), size=shape, dtype=spec["dtype"])
    else:
        inputs[name] = rng.standard_normal(shape).astype(spec["dtype"])

# Load as `$backend` did, and call once.
'''

_TAIL = '''print(f"output {io['output']!r}: shape {tuple(output.shape)}, dtype {output.dtype}")
'''


def ship_plan(results: dict, rec: Recommendation) -> Optional[dict]:
    """The artifact the recommended cell ran (from results.json alone), or None: no recommendation, or a
    run without artifacts (`workbench bench` measures a file of its own)."""
    w = rec.winner
    if w is None:
        return None
    return next((a for a in results.get("artifacts") or []
                 if a["variant"] == w.variant and a["format"] == w.cell.get("format") and a.get("path")), None)


def snippet(backend: str, file: str, variant: str, batch: int, seq: int) -> Optional[str]:
    """load_and_call.py for a file of `backend`'s format: the backend says how its file loads and is
    called (`Backend.snippet`); None for a backend not registered here or without a snippet."""
    from core.backends import BACKENDS

    cls = BACKENDS.get(backend)
    body = cls.snippet() if cls is not None else None
    if body is None:
        return None
    return Template(_HEAD).substitute(file=file, variant=variant, backend=backend, batch=batch, seq=seq) \
        + body + _TAIL


def _readme(results: dict, rec: Recommendation, sp: dict, file: Path, files: list[str], has_snippet: bool) -> str:
    w, c = rec.winner, rec.winner.cell
    lat = c["latency_ms"]
    v = next((v for v in results["variants"] if v["name"] == w.variant), {})
    steps = ", ".join(s["name"] for s in v.get("steps") or [])
    parent = f"`{v['parent']}`" if v.get("parent") else "the source model"
    made = f"{steps} applied to {parent}" if steps else "the source model, unchanged"
    rows = [("variant", f"`{w.variant}` ({made})"),
            ("backend", f"`{w.backend}`"),
            ("file", f"`{file.name}` (format {c.get('format')}, {file.stat().st_size / MB:.2f} MiB)"),
            (f"p50 latency, batch {c['batch_size']}",
             f"{lat['p50']:.3f} ms (95% CI {lat['ci95'][0]:.3f}–{lat['ci95'][1]:.3f})")]
    if w.cell_index in sp:
        s = sp[w.cell_index]
        rows.append(("speedup vs baseline", f"{s[0]:.2f}x on the same backend (95% CI {s[1]:.2f}–{s[2]:.2f})"))
    if rec.metric and w.score is not None:
        base = f" (baseline {_fmt(rec.base_score, 4)})" if rec.base_score is not None else ""
        rows.append((rec.metric, f"{_fmt(w.score, 4)}{base}"))
    lines = [_title(rec), "",
             f"The cell the model-workbench report recommends for recipe `{results['recipe']['name']}` "
             "(`../report.md` says why; `../results.json` has every number).", "",
             "| | |", "|---|---|"] + [f"| {k} | {val} |" for k, val in rows]
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in files) + "."]
    if has_snippet:
        lines += ["", "```bash", "python load_and_call.py [BATCH] [SEQ_LEN]", "```", "",
                  f"loads `{file.name}` the way `{w.backend}` ran it, calls it once on random inputs built from "
                  f"`{file.name}.io.json` (input names, shapes with the symbolic dims `batch` and `seq`, dtypes, "
                  "integer ranges) and prints the output's shape. It needs numpy and "
                  + ", ".join(_needs(w.backend)) + "." + _pickle_needs(results, c.get("format"))]
    else:
        lines += ["", f"No snippet: this module does not know how `{w.backend}` loads its file."]
    return "\n".join(lines) + "\n"


def _needs(backend: str) -> list[str]:
    from core.backends import BACKENDS

    cls = BACKENDS.get(backend)
    return list(cls.imports) if cls is not None else ["the backend's library"]


def _pickle_needs(results: dict, fmt: Optional[str]) -> str:
    """What a whole pickled module (format `torch`) needs beyond its backend's libraries: unpickling imports the
    classes it names, which live in model-workbench and, for a recipe's own model, in the user's files."""
    if fmt != "torch":
        return ""
    model = ((results.get("recipe") or {}).get("parsed") or {}).get("model") or {}
    text = (" The file is a whole pickled module, so unpickling it imports the classes it names: model-workbench "
            "must be importable too (`pip install -e` of its clone; the script loads through "
            "`core.modelfile.load_module`, which checks the file's sha256 first, since unpickling runs code)")
    if model.get("source") == "python":
        module = str(model.get("ref", "")).split(":")[0]
        path = (results.get("recipe") or {}).get("path")
        where = Path(path).parent if path else None  # as the run recorded it (relative to where it ran, if so)
        text += (f", and so must your model's own code, `{module}` (the recipe's `model.ref`): put its folder"
                 f"{f' ({where} where the recipe ran)' if where else ''} on PYTHONPATH")
    elif model.get("source") in ("hf", "torchvision"):
        text += f", and {'transformers' if model['source'] == 'hf' else 'torchvision'}, whose classes the module uses"
    return text + ". For a file that needs none of that, ship the variant's TorchScript or ONNX artifact."


def _title(rec: Recommendation) -> str:
    """The README's first line: also how a later report knows what a folder it cannot refresh holds."""
    w = rec.winner
    return f"# Recommended: `{w.variant}` on `{w.backend}`, batch {w.cell['batch_size']}"


def _copy(src: Path, dst: Path) -> None:
    if dst.exists() and filecmp.cmp(src, dst, shallow=True):  # copy2 keeps size and mtime: unchanged
        return
    atomic.write_with(dst, lambda tmp: shutil.copy2(src, tmp))


def write_recommended(run_dir: Path, results: dict, rec: Recommendation, sp: dict) -> Optional[Path]:
    """Fill RUN_DIR/recommended/ for the recommendation; remove it when there is none. When the run's files are
    gone (a report rebuilt from results.json alone), a folder that already holds this recommendation stays and
    one that holds another is removed. Returns the folder, or None when nothing is there."""
    run_dir = Path(run_dir)
    folder = run_dir / FOLDER
    plan = ship_plan(results, rec)
    src = run_dir / plan["path"] if plan else None
    if src is None or not src.is_file():
        readme = folder / "README.md"
        if plan and readme.is_file() and readme.read_text().splitlines()[:1] == [_title(rec)]:
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        return None
    from core.formats import artifact_files

    sources = [p for p in artifact_files(plan["format"], src) if p.is_file()]
    beside = src.with_name(src.name + ".io.json")
    # Exports have their .io.json beside them; a torch module or an ONNX variant made by steps does not, and
    # takes the source model's, which is the same description (every variant keeps the source's inputs).
    io = json.loads(beside.read_text()) if beside.is_file() else (results.get("model") or {}).get("io")
    cell = rec.winner.cell
    seq = (cell.get("shape") or {}).get("seq_len") or results["recipe"]["parsed"]["bench"].get("seq_len") or 128
    code = snippet(rec.winner.backend, src.name, rec.winner.variant, cell["batch_size"], seq) if io else None
    written = []
    for p in sources:
        _copy(p, folder / p.name)
        written.append(p.name)
    if io:
        atomic.write_json(folder / f"{src.name}.io.json", io)
        written.append(f"{src.name}.io.json")
    if code:
        atomic.write_text(folder / "load_and_call.py", code)
        written.append("load_and_call.py")
    atomic.write_text(folder / "README.md", _readme(results, rec, sp, src, list(written), code is not None))
    written.append("README.md")
    # What an earlier recommendation left (another file name, a snippet this one has not) goes.
    for old in folder.iterdir():
        if old.name not in written:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    return folder
