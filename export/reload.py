"""Loads an artifact in a fresh process and runs it on given batches: `python -m export.reload
FORMAT PATH BATCHES.npz OUT.npy`. Parity is measured on what a deployment would load, not on
objects still alive in the exporting process."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from runtime.infer import load_batches, reduce_outputs, save_batches


def outputs_in_fresh_process(fmt: str, path: Path, batches: list[dict], timeout_s: float = 600) -> np.ndarray:
    import json

    from core.formats import FORMATS
    from core.processes import child_env, locate

    where = json.dumps(locate(FORMATS[fmt]))  # the format's module, wherever it was registered
    with tempfile.TemporaryDirectory() as tmp:
        inputs, out = Path(tmp) / "batches.npz", Path(tmp) / "out.npy"
        save_batches(inputs, batches)
        proc = subprocess.run([sys.executable, "-m", "export.reload", fmt, str(path), str(inputs), str(out), where],
                              capture_output=True, text=True, timeout=timeout_s, env=child_env())
        if proc.returncode != 0 or not out.exists():
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            raise RuntimeError(f"reloading the {fmt} file in a fresh process failed: "
                               f"{lines[-1] if lines else f'exit code {proc.returncode}'}")
        return np.load(out)


def main() -> int:
    import json

    from core.formats import FORMATS
    from core.processes import die_with_parent, import_located

    die_with_parent()
    fmt, path, inputs, out, where = sys.argv[1:6]
    import_located(json.loads(where))
    run = FORMATS[fmt].load(path)
    np.save(out, np.concatenate([reduce_outputs(run(b), b) for b in load_batches(inputs)]).astype(np.float32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
