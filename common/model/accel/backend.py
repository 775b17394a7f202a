"""OpenVINO, imported only where the accelerated path is used, and what this CPU can run in it."""

from __future__ import annotations

from types import ModuleType


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
