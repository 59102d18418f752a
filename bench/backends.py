"""Backends: one small runner each, with one interface. A runner is built inside the cell's own
process; `unavailable` is asked in the parent to turn a backend that cannot run here into a
skipped cell with its reason."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class BackendInfo:
    name: str
    format: str  # the artifact format it runs: torch / torchscript / torch-export / onnx
    device: str  # cpu / cuda
    summary: str


BACKENDS = {b.name: b for b in [
    BackendInfo("torch-cpu", "torch", "cpu", "PyTorch eager on CPU"),
    BackendInfo("torch-cuda", "torch", "cuda", "PyTorch eager on CUDA (timed with CUDA events)"),
    BackendInfo("torch-compile-cpu", "torch", "cpu", "torch.compile (inductor) on CPU; compile time kept apart"),
    BackendInfo("torch-compile-cuda", "torch", "cuda", "torch.compile (inductor) on CUDA"),
    BackendInfo("torchscript-cpu", "torchscript", "cpu", "TorchScript module on CPU"),
    BackendInfo("torchscript-cuda", "torchscript", "cuda", "TorchScript module on CUDA"),
    BackendInfo("torch-export-cpu", "torch-export", "cpu", "torch.export program (.pt2) on CPU, run through .module()"),
    BackendInfo("torch-export-cuda", "torch-export", "cuda", "torch.export program (.pt2) moved to CUDA"),
    BackendInfo("ort-cpu", "onnx", "cpu", "ONNX Runtime, CPUExecutionProvider"),
    BackendInfo("ort-cuda", "onnx", "cuda", "ONNX Runtime, CUDAExecutionProvider (onnxruntime-gpu)"),
    BackendInfo("ort-tensorrt", "onnx", "cuda", "ONNX Runtime, TensorrtExecutionProvider"),
]}

ORT_PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                 "ort-tensorrt": "TensorrtExecutionProvider"}


def unavailable(name: str) -> Optional[str]:
    """Why backend `name` cannot run on this machine, or None when it can."""
    info = BACKENDS[name]
    if info.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch on this machine"
    if name in ORT_PROVIDERS:
        import onnxruntime as ort

        provider = ORT_PROVIDERS[name]
        if provider not in ort.get_available_providers():
            hint = " (install the `gpu` extra: onnxruntime-gpu)" if info.device == "cuda" else ""
            return f"ONNX Runtime here offers {ort.get_available_providers()}, not {provider}{hint}"
        if provider == "TensorrtExecutionProvider" and not _tensorrt_libraries():
            # onnxruntime-gpu lists the TensorRT provider whether or not TensorRT itself is installed.
            return ("onnxruntime-gpu has a TensorRT provider, but TensorRT's libraries (libnvinfer) are not "
                    "installed here (pip install tensorrt, matching the CUDA version)")
    return None


def _tensorrt_libraries() -> bool:
    import ctypes
    import ctypes.util

    if ctypes.util.find_library("nvinfer"):
        return True
    for soname in ("libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so"):
        try:
            ctypes.CDLL(soname)
            return True
        except OSError:
            continue
    try:  # the tensorrt pip wheels keep the libraries in their own package folder
        import tensorrt_libs  # noqa: F401

        return True
    except ImportError:
        return False


class Runner:
    """Built from an artifact; `prepare` moves inputs where the backend wants them (outside the
    timed region), `timed_call` runs once and returns milliseconds of completed work."""

    info: dict

    def prepare(self, inputs: dict[str, np.ndarray]):
        raise NotImplementedError

    def call(self, prepared):
        raise NotImplementedError

    def timed_call(self, prepared) -> float:
        t0 = time.perf_counter()
        self.call(prepared)
        return (time.perf_counter() - t0) * 1e3

    def outputs(self, prepared) -> np.ndarray:
        out = self.call(prepared)
        return out if isinstance(out, np.ndarray) else out.float().cpu().numpy()


class TorchRunner(Runner):
    def __init__(self, module, device: str, threads: int, exported: bool = False):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        # A module unlifted from a torch.export program refuses .eval() (it was traced in eval mode)
        # and is already on its device (moved as a program, see load_runner).
        self.module = module if exported else module.to(self.device).eval()
        self.info = {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
                     "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}

    def prepare(self, inputs):
        return {k: self.torch.from_numpy(v).to(self.device) for k, v in inputs.items()}

    def call(self, prepared):
        with self.torch.inference_mode():
            return self.module(**prepared)

    def timed_call(self, prepared) -> float:
        if self.device.type != "cuda":
            return super().timed_call(prepared)
        # Host time of an asynchronous launch says nothing: CUDA events bracket the GPU work.
        start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
        start.record()
        self.call(prepared)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


class OrtRunner(Runner):
    """ONNX Runtime session. On a GPU provider (or with io_binding=True) inputs are bound once to
    device memory and outputs stay there (IOBinding), so a timed call is the graph's run, not the
    host-device copies around it; the copy back happens only when outputs are asked for."""

    def __init__(self, path: str, backend: str, threads: int, io_binding: Optional[bool] = None):
        import onnxruntime as ort

        self.ort = ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        want = ORT_PROVIDERS[backend]
        providers = [want] + (["CPUExecutionProvider"] if want != "CPUExecutionProvider" else [])
        self.session = ort.InferenceSession(path, so, providers=providers)
        got = self.session.get_providers()
        # ORT falls back to CPU silently when a provider fails to load: that is a failed cell, not a fast one.
        if got[0] != want:
            raise RuntimeError(f"ONNX Runtime did not start {want}; the session runs on {got}")
        self.device = BACKENDS[backend].device
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


def load_runner(backend: str, path: str, threads: int) -> Runner:
    info = BACKENDS[backend]
    if info.format == "onnx":
        return OrtRunner(path, backend, threads)
    import torch

    if info.format == "torchscript":
        module = torch.jit.load(path, map_location=info.device)
    elif info.format == "torch-export":
        program = torch.export.load(path)
        if info.device == "cuda":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, "cuda")
        module = program.module()
    else:
        # Our own variant file, written by this run's pipeline (see workbench.variants.save_module).
        from workbench.variants import load_module

        module = load_module(path)
    runner = TorchRunner(module, info.device, threads, exported=info.format == "torch-export")
    if backend.startswith("torch-compile"):
        runner.module = torch.compile(runner.module)
    return runner
