"""The environment fingerprint recorded with every run: what produced these numbers."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
import sys
from pathlib import Path

from core.processes import default_threads

LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "torch-pruning", "bitsandbytes",
             "transformers", "optimum", "optimum-onnx", "numpy", "pandas", "scikit-learn", "model-workbench")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD features that decide int8 kernel choice (VNNI, AVX-512, AMX...)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")) or "vnni" in f)
    except OSError:
        pass
    return []


def cpu_caches() -> dict[str, int]:
    """Bytes of each data / unified cache level one core sees (L1, L2, L3), from sysfs: whether a
    model's weights stay in cache decides what weight-only quantization can save."""
    out = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip()
            scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(size[-1:], 1)
            out[f"L{(index / 'level').read_text().strip()}"] = int(size.rstrip("KMG")) * scale
        except (OSError, ValueError):
            continue
    return out


def versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
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
        "cpu_cache_bytes": cpu_caches(),
        "cores_logical": os.cpu_count(),
        "cores_available": default_threads(),
        "threads_requested": threads,
        "libraries": versions(),
        **gpu_info(),
    }
