"""Running an ONNX graph in a measuring process: a Runner on one ONNX Runtime execution provider
(IOBinding on a device) and a generator for causal LMs (the decode loop of runtime.decode). Both
refuse a session that fell back to another provider: a silent CPU fallback is a failed cell."""
from __future__ import annotations

from typing import Optional

import numpy as np

from core.backends import Runner


def with_cpu_fallback(provider: str) -> list[str]:
    """The provider list ORT is given: the wanted one, with the CPU provider for the ops it lacks."""
    return [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])


class OrtRunner(Runner):
    """ONNX Runtime session. On a GPU provider (or with io_binding=True) inputs are bound once to
    device memory and outputs stay there (IOBinding), so a timed call is the graph's run, not the
    host-device copies around it; the copy back happens only when outputs are asked for."""

    def __init__(self, path: str, provider: str, device: str, threads: int, io_binding: Optional[bool] = None,
                 profile_prefix: Optional[str] = None):
        import onnxruntime as ort

        self.ort = ort
        so = ort.SessionOptions()
        if profile_prefix:  # bench.profile: ORT's op-level profiler, never in a timed cell
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        want = provider
        providers = with_cpu_fallback(provider)
        self.session = ort.InferenceSession(path, so, providers=providers)
        got = self.session.get_providers()
        # ORT falls back to CPU silently when a provider fails to load: that is a failed cell, not a fast one.
        if got[0] != want:
            raise RuntimeError(f"ONNX Runtime did not start {want}; the session runs on {got}")
        self.device = device
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        opts = self.session.get_session_options()
        self.names = {i.name for i in self.session.get_inputs()}
        self.info = {"providers": got, "intra_op_threads": opts.intra_op_num_threads,
                     "inter_op_threads": opts.inter_op_num_threads, "io_binding": self.io_binding}

    def prepare(self, inputs):
        feed = {k: v for k, v in inputs.items() if k in self.names}
        if not self.io_binding:
            return feed
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(value, self.device, 0))
        for out in self.session.get_outputs():
            binding.bind_output(out.name, self.device)
        return binding

    def call(self, prepared):
        if self.io_binding:
            # Run() returns once the provider's stream is synchronised (ORT's default run options),
            # so host time covers the device work; outputs stay on the device.
            self.session.run_with_iobinding(prepared)
            return None
        # Session.run copies outputs to host before returning, so host timing covers the device work.
        return self.session.run(None, prepared)[0]

    def outputs(self, prepared) -> np.ndarray:
        if not self.io_binding:
            return super().outputs(prepared)
        self.call(prepared)
        return prepared.copy_outputs_to_cpu()[0]


class OrtGenerator:
    """An ONNX graph with a KV cache, decoded in a loop whose cache stays on the device (IOBinding)."""

    def __init__(self, path: str, provider: str, threads: int):
        from runtime.decode import OrtLM

        want = provider
        self.lm = OrtLM(path, threads=threads, providers=with_cpu_fallback(provider))
        got = self.lm.session.get_providers()
        if got[0] != want:
            raise RuntimeError(f"ONNX Runtime did not start {want}; the session runs on {got}")
        self.info = {"providers": got, "intra_op_threads": threads, "io_binding": True,
                     "generation": "ORT decode loop, greedy, KV cache bound on the device"}

    def generate(self, ids, mask, new_tokens: int, on_token=None):
        return self.lm.generate(ids, mask, new_tokens, on_token=on_token)

    def logits(self, ids, mask):
        return self.lm.logits(ids, mask)
