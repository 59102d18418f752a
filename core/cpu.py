"""The one reader of this machine's CPU: model name, feature flags (x86 `flags`, ARM `Features`),
cache sizes and clock. Presets, the roofline's paper peaks, the diagnosis and the environment
fingerprint all read it here, so an ARM machine is understood everywhere or nowhere."""
from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Optional

CPUINFO = "/proc/cpuinfo"


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> tuple[str, ...]:
    try:
        with open(CPUINFO) as fh:
            return tuple(fh.read().splitlines())
    except OSError:
        return ()


def _field(prefixes: tuple[str, ...]) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in _cpuinfo()
            if ":" in line and line.split(":", 1)[0].strip() in prefixes]


def model_name() -> str:
    # x86: "model name"; ARM kernels give no name line on many boards, only implementer / part ids.
    names = _field(("model name", "Model", "Hardware"))
    return names[0] if names else (platform.processor() or platform.machine())


def features() -> set[str]:
    """Every feature flag the kernel reports: x86 `flags` (avx2, avx512_vnni, amx_int8, ...) and
    ARM `Features` (asimd, asimddp, sve, i8mm, bf16, ...)."""
    out: set[str] = set()
    for value in _field(("flags", "Features")):
        out |= set(value.split())
    return out


# The families of flags that decide kernel choice, kept in the environment fingerprint (the full list
# is long and mostly irrelevant to inference speed).
_RELEVANT = ("avx", "amx", "fma", "sse4", "asimd", "sve", "i8mm", "bf16", "fphp", "dotprod")


def relevant_features() -> list[str]:
    """The SIMD features that decide int8 / bf16 kernel choice, sorted (for results.json)."""
    return sorted(f for f in features() if f.startswith(_RELEVANT) or "vnni" in f)


def caches() -> dict[str, int]:
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


def max_clock_ghz() -> Optional[float]:
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6
    except (OSError, ValueError):
        pass
    mhz = []
    for value in _field(("cpu MHz",)):
        try:
            mhz.append(float(value))
        except ValueError:
            continue
    return max(mhz) / 1e3 if mhz else None


# What the flags mean for inference, in one place (flag names differ between x86 and ARM kernels).
INT8_DOT = {"avx512_vnni", "avx_vnni", "avx512vnni", "amx_int8", "asimddp", "i8mm"}
BF16_NATIVE = {"amx_bf16", "avx512_bf16", "bf16"}


def has_int8_dot(flags) -> bool:
    """Whether int8 matrix products have a dot-product instruction (VNNI, AMX, ARM sdot / i8mm)."""
    return bool(INT8_DOT & set(flags))


def has_native_bf16(flags) -> bool:
    """Whether bfloat16 arithmetic runs in hardware (AMX, AVX-512 BF16, ARM bf16) rather than emulated."""
    return bool(BF16_NATIVE & set(flags))
