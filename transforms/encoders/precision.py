"""The arithmetic a network runs in (what `precision: auto` picks per kind and device), and the device."""

from __future__ import annotations

# What `precision: auto` picks per encoder kind and device, where the vectors were measured to keep a mean
# cosine to fp32 of at least 0.999 (text) or 0.998 (images); unlisted pairs stay fp32 (docs/encoders.md,
# "Precision"). ConSE in bf16 agrees at 0.9979 only (its top classes reorder), so on CPUs it stays fp32.
AUTO_PRECISION = {
    "sentence-transformers": {"cpu": "bf16", "cuda": "fp16"},
    "cnn": {"cpu": "bf16", "cuda": "fp16"},
    "conse": {"cuda": "fp16"},
}
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def cpu_runs_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX-512 BF16 or AMX); elsewhere bf16 is emulated
    and slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(kind: str, device_type: str, cpu_bf16: bool) -> str:
    """What `precision: auto` means for an encoder kind on a device type ("cpu" or "cuda"): bf16 on a CPU
    only where it does bf16 in hardware."""
    chosen = AUTO_PRECISION.get(kind, {}).get(device_type, "fp32")
    return "fp32" if chosen == "bf16" and device_type == "cpu" and not cpu_bf16 else chosen


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_type_of(device: str, auto: str) -> str:
    """An encoder's `device` setting as a device type, with `auto` meaning `auto` here."""
    return auto if device == "auto" else device.split(":")[0]
