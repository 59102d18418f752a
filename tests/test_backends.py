"""Backend runners on real exported files: the IOBinding path that ort-cuda takes gives the same
outputs as a plain Session.run (checked here on the CPU provider, where binding works the same)."""
import numpy as np

from runtime.ort_runner import OrtRunner
from export.onnx import export_onnx
from workbench.sources.models import DIGITS_IO, DigitsCNN


def test_io_binding_runner_gives_the_plain_session_outputs(tmp_path):
    path = tmp_path / "cnn.onnx"
    export_onnx(DigitsCNN().eval(), DIGITS_IO, path, exporter="torchscript")
    inputs = DIGITS_IO.make(8, 0, seed=3)
    plain = OrtRunner(str(path), "CPUExecutionProvider", "cpu", threads=1)
    bound = OrtRunner(str(path), "CPUExecutionProvider", "cpu", threads=1, io_binding=True)
    assert bound.info["io_binding"] and not plain.info["io_binding"]
    want = plain.outputs(plain.prepare(inputs))
    prepared = bound.prepare(inputs)
    assert bound.timed_call(prepared) > 0
    np.testing.assert_allclose(bound.outputs(prepared), want, rtol=1e-6, atol=1e-6)
    assert want.shape == (8, 10)
