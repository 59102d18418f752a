"""ONNX Runtime sessions as the workbench opens them outside timed cells (evaluation, parity,
calibration, decoding): threads set when asked, inter-op 1, warnings off. Timed cells build their own
(bench.backends.OrtRunner), with the provider checks a measurement needs."""
from __future__ import annotations

from pathlib import Path


def onnx_session(path: Path, threads: int | None = None, providers=("CPUExecutionProvider",)):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=list(providers))
