"""The PyTorch backends: eager (`torch-cpu`, `torch-cuda`), torch.compile (`torch-compile-*`),
TorchScript (`torchscript-*`) and torch.export programs (`torch-export-*`). Each loads its artifact
into a runtime.torch_runner.Runner, profiles with torch.profiler, and says in `snippet` how the
recommended file is loaded."""
from __future__ import annotations

from typing import Optional

from core.backends import Backend, Runner


def _by_op(prof, cuda: bool, per: int) -> dict[str, float]:
    """Self time per op type from a torch.profiler run, in ms per call (or per token)."""
    out = {}
    for ev in prof.key_averages():
        us = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        if us > 0:
            out[ev.key] = us / 1e3 / per
    return out


_CALL = '''with torch.inference_mode():
    output = module(**{k: torch.from_numpy(v).to("$device") for k, v in inputs.items()})
'''


class TorchBackend(Backend):
    """Our own variant file (a pickled module, core.modelfile), eager."""

    format = "torch"
    uses_torch_allocator = True
    generates = True
    libraries = ("torch",)

    @classmethod
    def module(cls, path: str):
        from core.modelfile import load_module

        return load_module(path)

    @classmethod
    def load(cls, path: str, threads: int) -> Runner:
        from runtime.torch_runner import TorchRunner

        return TorchRunner(cls.module(path), cls.device, threads)

    @classmethod
    def load_generator(cls, path: str, threads: int):
        from runtime.torch_runner import TorchGenerator

        return TorchGenerator(cls.module(path), cls.device)

    @classmethod
    def profile(cls, path: str, inputs: dict, threads: int, calls: int, warmup: int) -> dict:
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.set_num_threads(threads)
        runner = cls.load(path, threads)
        prepared = runner.prepare(inputs)
        for _ in range(warmup):
            runner.call(prepared)
        cuda = cls.device == "cuda"
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(calls):
                runner.call(prepared)
            if cuda:
                torch.cuda.synchronize()
        return {"tool": "torch.profiler", "by_op_ms": _by_op(prof, cuda, calls)}

    @classmethod
    def profile_generation(cls, path: str, prompts, new_tokens: int, threads: int, generations: int) -> dict:
        import numpy as np
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.set_num_threads(threads)
        gen = cls.load_generator(path, threads)
        mask = np.ones_like(prompts)
        gen.generate(prompts, mask, new_tokens)
        cuda = cls.device == "cuda"
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(generations):
                gen.generate(prompts, mask, new_tokens)
        return {"tool": "torch.profiler", "by_op_ms": _by_op(prof, cuda, generations * new_tokens)}

    @classmethod
    def snippet(cls) -> Optional[str]:
        load = ('''import torch
# A whole pickled module: model-workbench must be importable (the pickle names its classes; a recipe's
# `python` model also needs the recipe's folder on PYTHONPATH). load_module checks module.sha256 first,
# since unpickling runs code.
from core.modelfile import load_module

module = load_module(MODEL).to("$device").eval()
''')
        return (load + cls._compiled() + _CALL).replace("$device", cls.device)

    @classmethod
    def _compiled(cls) -> str:
        return "module = torch.compile(module)  # as the benchmark ran it; the first call compiles\n" \
            if cls.compiles else ""


class TorchCPU(TorchBackend):
    name, device, summary = "torch-cpu", "cpu", "PyTorch eager on CPU"
    default = True


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

    @classmethod
    def profile(cls, path: str, inputs: dict, threads: int, calls: int, warmup: int) -> dict:
        # A profile of the first calls would be one of compilation; the cells are not profiled.
        raise NotImplementedError(f"{cls.name} is not profiled: its profile would be of compilation")


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

    @classmethod
    def snippet(cls) -> Optional[str]:
        return ('''import torch

module = torch.jit.load(str(MODEL), map_location="$device")
''' + _CALL).replace("$device", cls.device)


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

        from runtime.torch_runner import TorchRunner

        program = torch.export.load(path)
        if cls.device == "cuda":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, "cuda")
        return TorchRunner(program.module(), cls.device, threads, exported=True)

    @classmethod
    def snippet(cls) -> Optional[str]:
        to_cuda = ('''# Moved to the GPU as a program, as the benchmark did (an unlifted module cannot be moved).
from torch.export.passes import move_to_device_pass

program = move_to_device_pass(program, "cuda")
''' if cls.device == "cuda" else "")
        return ('''import torch

program = torch.export.load(str(MODEL))
''' + to_cuda + "module = program.module()\n" + _CALL).replace("$device", cls.device)


class TorchExportCPU(TorchExportBackend):
    name, device, summary = "torch-export-cpu", "cpu", "torch.export program (.pt2) on CPU, run through .module()"


class TorchExportCUDA(TorchExportBackend):
    name, device, summary = "torch-export-cuda", "cuda", "torch.export program (.pt2) moved to CUDA"
