"""Keep torch from loading Triton into a process whose OpenGL driver loaded Mesa's LLVM.

With software OpenGL (Mesa llvmpipe: virtual machines, remote desktops, Xvfb) napari's canvas
loads ``libLLVM``; Triton's own LLVM then crashes the process when torch imports it (seen with
torch 2.14: segment_anything → torchvision.ops → torch._dynamo → triton, after the viewer
opened). Loaded the other way round (Triton first, then the OpenGL driver) both work. So
Triton is preloaded where no LLVM is in the process yet (the widgets ask for that), and hidden
where Mesa's LLVM is already there. Triton only serves ``torch.compile`` on CUDA, which
napari-medseg does not use. ``MEDSEG_ALLOW_TRITON=1`` turns the guard off.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def avoid_llvm_clash(preload: bool) -> None:
    """Hide Triton if Mesa's LLVM is loaded; otherwise optionally import it now.

    Args:
        preload: Import Triton when it is safe (costs about half a second once).
    """
    if "triton" in sys.modules or not sys.platform.startswith("linux"):
        return
    if os.environ.get("MEDSEG_ALLOW_TRITON") == "1":
        return
    try:
        with open("/proc/self/maps") as maps:
            clash = any("libLLVM" in line for line in maps)
    except OSError:
        return
    if clash:
        sys.modules["triton"] = None  # type: ignore[assignment]  # import triton → ImportError
        log.info("software OpenGL (Mesa LLVM) detected: Triton disabled for this process")
        return
    if preload:
        try:
            import triton  # noqa: F401
        except Exception:  # not installed (CPU builds of torch) or broken: torch copes
            pass
