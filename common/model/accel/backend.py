"""OpenVINO, imported only where the accelerated path is used, and what this CPU can run in it."""

from __future__ import annotations

from types import ModuleType

# The CPU features that decide which kernels run (OpenVINO picks by them; bf16 needs the last ones).
KERNEL_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


class AccelUnavailable(RuntimeError):
    """The accelerated path cannot be built here (e.g. OpenVINO missing)."""


def openvino_module() -> ModuleType:
    try:
        import openvino
    except ImportError as exc:
        raise AccelUnavailable(
            f"OpenVINO is not installed ({exc}); pip install -r requirements.txt or set DETECT_MODE=eager"
        ) from None
    return openvino


def bf16_supported(core) -> bool:
    """True where OpenVINO's CPU plugin can run bf16 natively (AVX-512 BF16 or AMX)."""
    try:
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - an old plugin without the property: assume not
        return False


def cpu_features() -> list[str]:
    """Which of ``KERNEL_FEATURES`` this CPU has, from /proc/cpuinfo (empty where it is unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [feature for feature in KERNEL_FEATURES if feature in flags]
    except OSError:
        pass
    return []
