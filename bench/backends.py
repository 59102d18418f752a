"""The backends: one class each, registered by subclassing core.backends.Backend, and the runners
that time them. A runner is built inside the cell's own process; `unavailable` is asked in the
parent, so a backend that cannot run here becomes a skipped cell with its reason."""
from __future__ import annotations

from typing import ClassVar, Optional

import numpy as np

from core.backends import BACKENDS, Backend, Runner


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

    def __init__(self, path: str, backend: str, threads: int, io_binding: Optional[bool] = None,
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
        want = BACKENDS[backend].provider
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


class TorchGenerator:
    """A causal LM (core.lm.CausalLM) generating through transformers' `generate`."""

    def __init__(self, module, device: str):
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.module = module.to(self.device).eval()
        self.info = {"torch_threads": torch.get_num_threads(), "generation": "transformers generate, greedy",
                     "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}

    def generate(self, ids, mask, new_tokens: int):
        from runtime.decode import torch_generate

        return torch_generate(self.module.model, ids, mask, new_tokens, device=self.device.type)

    def logits(self, ids, mask):
        with self.torch.inference_mode():
            out = self.module(input_ids=self.torch.from_numpy(ids).to(self.device),
                              attention_mask=self.torch.from_numpy(mask).to(self.device))
        return out.float().cpu()


class OrtGenerator:
    """An ONNX graph with a KV cache, decoded in a loop whose cache stays on the device (IOBinding)."""

    def __init__(self, path: str, backend: str, threads: int):
        from runtime.decode import OrtLM

        want = BACKENDS[backend].provider
        self.lm = OrtLM(path, threads=threads,
                        providers=[want] + (["CPUExecutionProvider"] if want != "CPUExecutionProvider" else []))
        got = self.lm.session.get_providers()
        if got[0] != want:
            raise RuntimeError(f"ONNX Runtime did not start {want}; the session runs on {got}")
        self.info = {"providers": got, "intra_op_threads": threads, "io_binding": True,
                     "generation": "ORT decode loop, greedy, KV cache bound on the device"}

    def generate(self, ids, mask, new_tokens: int):
        return self.lm.generate(ids, mask, new_tokens)

    def logits(self, ids, mask):
        return self.lm.logits(ids, mask)


# ----------------------------------------------------------------------------- PyTorch
class TorchBackend(Backend):
    """Our own variant file (a pickled module, core.modelfile), eager."""

    format = "torch"
    uses_torch_allocator = True
    generates = True

    @classmethod
    def module(cls, path: str):
        from core.modelfile import load_module

        return load_module(path)

    @classmethod
    def load(cls, path: str, threads: int) -> Runner:
        return TorchRunner(cls.module(path), cls.device, threads)

    @classmethod
    def load_generator(cls, path: str, threads: int):
        return TorchGenerator(cls.module(path), cls.device)


class TorchCPU(TorchBackend):
    name, device, summary = "torch-cpu", "cpu", "PyTorch eager on CPU"


class TorchCUDA(TorchBackend):
    name, device, summary = "torch-cuda", "cuda", "PyTorch eager on CUDA (timed with CUDA events)"


class TorchCompileBackend(TorchBackend):
    compiles = True
    generates = False

    @classmethod
    def load(cls, path: str, threads: int) -> Runner:
        import torch

        runner = super().load(path, threads)
        if cls.device == "cpu":
            # Inductor's setting for CPU inference: weights become constants, pre-packed once for
            # oneDNN (and its AMX kernels) instead of at every call. Every variant gets it alike.
            import torch._inductor.config as inductor

            inductor.freezing = True
            runner.info["inductor_freezing"] = True
        runner.module = torch.compile(runner.module)
        return runner


class TorchCompileCPU(TorchCompileBackend):
    name, device, summary = "torch-compile-cpu", "cpu", "torch.compile (inductor) on CPU; compile time kept apart"


class TorchCompileCUDA(TorchCompileBackend):
    name, device, summary = "torch-compile-cuda", "cuda", "torch.compile (inductor) on CUDA"


class TorchScriptBackend(TorchBackend):
    format = "torchscript"
    generates = False

    @classmethod
    def module(cls, path: str):
        import torch

        return torch.jit.load(path, map_location=cls.device)


class TorchScriptCPU(TorchScriptBackend):
    name, device, summary = "torchscript-cpu", "cpu", "TorchScript module on CPU"


class TorchScriptCUDA(TorchScriptBackend):
    name, device, summary = "torchscript-cuda", "cuda", "TorchScript module on CUDA"


class TorchExportBackend(TorchBackend):
    format = "torch-export"
    generates = False

    @classmethod
    def load(cls, path: str, threads: int) -> Runner:
        import torch

        program = torch.export.load(path)
        if cls.device == "cuda":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, "cuda")
        return TorchRunner(program.module(), cls.device, threads, exported=True)


class TorchExportCPU(TorchExportBackend):
    name, device, summary = "torch-export-cpu", "cpu", "torch.export program (.pt2) on CPU, run through .module()"


class TorchExportCUDA(TorchExportBackend):
    name, device, summary = "torch-export-cuda", "cuda", "torch.export program (.pt2) moved to CUDA"


# ----------------------------------------------------------------------------- ONNX Runtime
class OrtBackend(Backend):
    format = "onnx"
    provider: ClassVar[str]
    # An ONNX Runtime deployment on CPU does not load torch, so neither does its cell. On CUDA it
    # does: torch's wheels are where the CUDA libraries ORT loads usually come from.
    imports = ("onnxruntime",)
    generates = True

    @classmethod
    def unavailable(cls) -> Optional[str]:
        why = super().unavailable()
        if why:
            return why
        import onnxruntime as ort

        if cls.provider not in ort.get_available_providers():
            hint = " (install the `gpu` extra: onnxruntime-gpu)" if cls.device == "cuda" else ""
            return f"ONNX Runtime here offers {ort.get_available_providers()}, not {cls.provider}{hint}"
        return None

    @classmethod
    def load(cls, path: str, threads: int) -> Runner:
        return OrtRunner(path, cls.name, threads)

    @classmethod
    def load_generator(cls, path: str, threads: int):
        return OrtGenerator(path, cls.name, threads)


class OrtCPU(OrtBackend):
    name, device, summary, provider = "ort-cpu", "cpu", "ONNX Runtime, CPUExecutionProvider", "CPUExecutionProvider"


class OrtCUDA(OrtBackend):
    name, device, provider = "ort-cuda", "cuda", "CUDAExecutionProvider"
    summary = "ONNX Runtime, CUDAExecutionProvider (onnxruntime-gpu), inputs and outputs bound on the device"
    imports = ("torch", "onnxruntime")


class OrtTensorRT(OrtBackend):
    name, device, provider = "ort-tensorrt", "cuda", "TensorrtExecutionProvider"
    generates = False  # a KV cache that grows every step would rebuild TensorRT engines: not measured
    summary = "ONNX Runtime, TensorrtExecutionProvider"
    imports = ("torch", "onnxruntime")

    @classmethod
    def unavailable(cls) -> Optional[str]:
        why = super().unavailable()
        if why is None and not _tensorrt_libraries():
            # onnxruntime-gpu lists the TensorRT provider whether or not TensorRT itself is installed.
            return ("onnxruntime-gpu has a TensorRT provider, but TensorRT's libraries (libnvinfer) are not "
                    "installed here (pip install tensorrt, matching the CUDA version)")
        return why


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


def unavailable(name: str) -> Optional[str]:
    """Why backend `name` cannot run on this machine, or None when it can."""
    return BACKENDS[name].unavailable()


def load_runner(backend: str, path: str, threads: int) -> Runner:
    return BACKENDS[backend].load(path, threads)
