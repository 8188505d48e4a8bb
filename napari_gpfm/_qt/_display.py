"""A display for headless runs: napari renders with OpenGL, which Qt's 'offscreen' platform
lacks, so on a machine without a screen we start a private Xvfb server (Debian: xvfb)."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys

SCREEN = "1600x1000x24"
_PDEATHSIG = sys.platform.startswith("linux")


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent process ends (Linux)."""
    if _PDEATHSIG:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def ensure_display() -> str:
    """Return how the viewer will render: 'display' (existing), 'xvfb' (started here)."""
    if os.environ.get("DISPLAY"):
        return "display"
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise RuntimeError(
            "no display and no Xvfb: napari needs OpenGL to render. Install Xvfb "
            "(Debian/Ubuntu: apt-get install xvfb) or run on a machine with a screen."
        )
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [xvfb, "-displayfd", str(write_fd), "-screen", "0", SCREEN, "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        number = pipe.readline().strip()
    if not number:
        proc.kill()
        raise RuntimeError("Xvfb did not start; cannot render headless")
    # Xvfb must outlive every X connection of this process: stopping it at ``atexit`` (before
    # Qt and GLX let go of the display at interpreter teardown) makes Xlib's fatal-IO handler
    # exit the process with status 1 after everything passed. The kernel stops it instead
    # when this process ends (PR_SET_PDEATHSIG); elsewhere it is stopped at exit as before.
    if not _PDEATHSIG:
        atexit.register(proc.terminate)
    os.environ["DISPLAY"] = f":{number}"
    return "xvfb"
