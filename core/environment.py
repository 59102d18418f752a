"""The environment fingerprint recorded with every run: what produced these numbers."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
import sys

from core import cpu
from core.processes import default_threads

# What every run uses; the steps and backends add their own (Step.libraries, Backend.libraries).
LIBRARIES = ("torch", "onnx", "onnxscript", "transformers", "optimum", "optimum-onnx", "numpy", "pandas",
             "scikit-learn", "model-workbench")


def libraries() -> list[str]:
    from core.backends import BACKENDS
    from core.steps import STEPS

    return sorted({*LIBRARIES, *(lib for c in [*STEPS.values(), *BACKENDS.values()] for lib in c.libraries)})


def cpu_model() -> str:
    return cpu.model_name()


def cpu_flags() -> list[str]:
    """The SIMD features that decide int8 kernel choice (VNNI, AVX-512, AMX, ARM dot product...)."""
    return cpu.relevant_features()


def versions(names=None) -> dict[str, str]:
    """Installed versions of `names` (default: every library the registered steps and backends name)."""
    out = {}
    for lib in (libraries() if names is None else names):
        try:
            out[lib] = md.version(lib)
        except md.PackageNotFoundError:
            pass
    return out


def gpu_info() -> dict:
    try:
        import torch

        if not torch.cuda.is_available():
            return {}
        props = torch.cuda.get_device_properties(0)
        info = {"gpu": props.name, "gpu_memory_bytes": int(props.total_memory), "cuda": torch.version.cuda,
                "gpu_count": torch.cuda.device_count()}
    except Exception:  # noqa: BLE001 - a broken CUDA install is "no GPU" for the fingerprint
        return {}
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        pass
    return info


def fingerprint(threads: int | None = None) -> dict:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_cache_bytes": cpu.caches(),
        "cores_logical": os.cpu_count(),
        "cores_available": default_threads(),
        "threads_requested": threads,
        "libraries": versions(),
        **gpu_info(),
    }
