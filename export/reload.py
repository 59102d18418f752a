"""Loads an artifact in a fresh process and runs it on given batches: `python -m export.reload
FORMAT PATH BATCHES.npz OUT.npy`. Parity is measured on what a deployment would load, not on
objects still alive in the exporting process."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from workbench.infer import load_batches, save_batches


def load(fmt: str, path: str):
    """A callable: dict of numpy inputs -> numpy output."""
    if fmt == "onnx":
        from workbench.infer import onnx_session

        sess = onnx_session(path)
        names = {i.name for i in sess.get_inputs()}
        return lambda b: sess.run(None, {k: v for k, v in b.items() if k in names})[0]
    import torch

    module = torch.jit.load(path) if fmt == "torchscript" else torch.export.load(path).module()

    def run(b):
        with torch.no_grad():
            return module(**{k: torch.from_numpy(v) for k, v in b.items()}).float().numpy()

    return run


def outputs_in_fresh_process(fmt: str, path: Path, batches: list[dict], timeout_s: float = 600) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        inputs, out = Path(tmp) / "batches.npz", Path(tmp) / "out.npy"
        save_batches(inputs, batches)
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run([sys.executable, "-m", "export.reload", fmt, str(path), str(inputs), str(out)],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
        if proc.returncode != 0 or not out.exists():
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            raise RuntimeError(f"reloading the {fmt} file in a fresh process failed: "
                               f"{lines[-1] if lines else f'exit code {proc.returncode}'}")
        return np.load(out)


def main() -> int:
    fmt, path, inputs, out = sys.argv[1:5]
    run = load(fmt, path)
    np.save(out, np.concatenate([run(b) for b in load_batches(inputs)]).astype(np.float32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
