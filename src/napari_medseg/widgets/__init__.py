"""napari dock widgets (the only package that imports napari, Qt and magicgui)."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def _avoid_llvm_clash() -> None:
    """Keep torch from loading Triton into a process whose OpenGL driver loaded Mesa's LLVM.

    With software OpenGL (Mesa llvmpipe: virtual machines, remote desktops, Xvfb) napari's
    canvas loads ``libLLVM``; Triton's own LLVM then crashes the process when torch imports it
    (seen with torch 2.14 when ``torchvision.ops`` is first imported after the viewer opened).
    Loaded the other way round (Triton first, then the OpenGL driver) both work. So Triton is
    loaded now when no LLVM is in the process yet, and hidden (it only serves ``torch.compile``
    on CUDA, which napari-medseg does not use) when Mesa's LLVM is already there.
    """
    if "triton" in sys.modules or not sys.platform.startswith("linux"):
        return
    try:
        with open("/proc/self/maps") as maps:
            clash = any("libLLVM" in line for line in maps)
    except OSError:
        return
    if clash:
        sys.modules["triton"] = None  # type: ignore[assignment]
        log.info("software OpenGL (Mesa LLVM) detected: Triton disabled for this process")
        return
    try:
        import triton  # noqa: F401  (preload before any OpenGL context exists)
    except Exception:  # not installed (CPU builds of torch) or broken: torch copes without it
        pass


_avoid_llvm_clash()
