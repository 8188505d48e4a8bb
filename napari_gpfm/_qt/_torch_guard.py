"""Import torch's stack safely inside a running napari.

Mesa's OpenGL drivers (llvmpipe, radeonsi) load the system ``libLLVM`` into the process when
napari creates its canvas. Triton, which ``torch._dynamo`` imports (timm → torchvision.ops does),
bundles another LLVM; loading it after Mesa's crashes the whole process (segmentation fault).
napari-gpfm never uses Triton (no ``torch.compile``), so when a GL driver has already mapped
LLVM and Triton is not loaded yet, Triton is marked unavailable before torch is imported, and
a log line says so. torch.compile's GPU backend is then unavailable in this napari session only;
the command-line tools are not affected.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def _gl_llvm_loaded() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return any("/libLLVM" in line for line in maps)
    except OSError:  # not Linux: Mesa's LLVM clash is a Linux issue
        return False


def import_torch_stack() -> None:
    """Import torch and timm on the calling (main) thread, guarding against the LLVM clash."""
    if "triton" not in sys.modules and _gl_llvm_loaded():
        sys.modules["triton"] = None  # makes `import triton` raise ImportError: torch copes
        log.info(
            "napari-gpfm: the OpenGL driver has loaded LLVM, which clashes with Triton's; "
            "Triton (torch.compile GPU kernels) is disabled in this napari session."
        )
    # Native extensions are also safer loaded on the main thread than in a worker.
    import timm  # noqa: F401
    import torch  # noqa: F401
