"""Device choice, CPU allocator tuning and CUDA out-of-memory retries."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

import torch

log = logging.getLogger(__name__)

# glibc mallopt parameter ids (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# name -> (mmap threshold, trim threshold, top pad) in bytes. glibc returns freed blocks to the
# OS and re-faults them on the next large tensor; on small VMs that made CPU inference 1.5-3.6x
# slower (ENVIRONMENT.md; benchmarks/bench_allocator.py here: LiteMedSAM encoder 3.4 s "off",
# 2.3 s "moderate", 0.8 s "aggressive"). "aggressive" is the default; "moderate" trades speed
# for a lower peak RSS in large training steps (SAM ViT-B LoRA: 8.6 vs 15 GB, ENVIRONMENT.md).
ALLOCATOR_MODES: dict[str, tuple[int, int, int] | None] = {
    "off": None,
    "moderate": (32 << 20, 256 << 20, 64 << 20),
    "aggressive": (1 << 30, 4 << 30, 1 << 30),
}
_allocator_mode = "off"


def tune_cpu_allocator(mode: str | None = None) -> str:
    """Apply glibc ``mallopt`` settings so large CPU tensors are not re-faulted every call.

    Args:
        mode: ``"off"``, ``"moderate"`` or ``"aggressive"``; ``None`` reads the environment
            variable ``NAPARI_MEDSEG_MALLOC`` (default ``"aggressive"``).

    Returns:
        The mode in effect afterwards (``"off"`` where glibc is not available).
    """
    global _allocator_mode
    mode = mode or os.environ.get("NAPARI_MEDSEG_MALLOC", "aggressive")
    if mode not in ALLOCATOR_MODES:
        raise ValueError(f"allocator mode must be one of {sorted(ALLOCATOR_MODES)}, got {mode!r}")
    values = ALLOCATOR_MODES[mode]
    if values is None or not sys.platform.startswith("linux"):
        return _allocator_mode
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return _allocator_mode
    mmap, trim, pad = values
    ok = all(
        mallopt(ctypes.c_int(param), ctypes.c_int(min(value, 2**31 - 1)))
        for param, value in ((_M_MMAP_THRESHOLD, mmap), (_M_TRIM_THRESHOLD, trim), (_M_TOP_PAD, pad))
    )
    if ok:
        _allocator_mode = mode
    return _allocator_mode


def allocator_mode() -> str:
    """The allocator mode applied so far in this process."""
    return _allocator_mode


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Pick a torch device.

    Args:
        device: ``"auto"``/``None`` (CUDA, then Apple MPS, then CPU), or an explicit
            ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.

    Raises:
        ValueError: If an explicit device is not available on this machine.
    """
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU here")
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ValueError("device 'mps' was asked for, but Apple MPS is not available here")
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), so bf16 autocast pays.

    Without it, PyTorch emulates bfloat16 on a CPU and autocast is slower than float32.
    """
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(cpu, name)()) for name in checks if hasattr(cpu, name))
    except RuntimeError:
        return False


def available_devices() -> list[str]:
    """Device names a user can choose on this machine, ``"auto"`` first."""
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


class OutOfMemory(RuntimeError):
    """Raised when a batch does not fit even at size 1; the message suggests what to do."""


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error from torch (CUDA, MPS or CPU)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_cuda_cache() -> None:
    """Return cached CUDA blocks after an out-of-memory error (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
