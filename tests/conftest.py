"""Shared fixtures: real slides (the bundled sample and files derived from it) and bad inputs.

Qt runs with the 'offscreen' platform; napari's canvas still needs an OpenGL context, which
comes from a private Xvfb display when the machine has no screen.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
if not os.environ.get("DISPLAY"):
    from napari_gpfm._qt._display import ensure_display

    ensure_display()

import numpy as np
import pytest
import tifffile
import torch.utils.data._utils.signal_handling as _torch_sigchld

# torch installs a process-wide SIGCHLD handler the first time a DataLoader with workers is
# iterated on the main thread (here: test helpers that embed directly). In napari the docks' jobs
# build their loaders on worker threads, where torch installs none. Left installed, the handler
# raises inside Qt's event loop of whatever later test is running when any loader worker of any
# earlier test exits non-zero during its shutdown. Tests therefore run as the product does; a
# worker that dies while a job reads from it is still an error in that job (torch's loader
# checks its workers when it waits for a batch).
_torch_sigchld._SIGCHLD_handler_set = True

from napari_gpfm._resources import sample_slide_path

SAMPLE_MPP = 0.499


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Weights digests and other caches go to a temporary folder, never the user's."""
    monkeypatch.setenv("NAPARI_GPFM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def sample_svs() -> Path:
    return sample_slide_path()


@pytest.fixture(scope="session")
def sample_path(sample_svs) -> Path:
    """The sample slide under the name the tiles, embeddings and jobs tests use."""
    assert sample_svs.exists(), f"sample slide missing: {sample_svs}"
    return sample_svs


@pytest.fixture
def white_tiff(tmp_path: Path) -> Path:
    """A blank white 1536x1024 slide at 0.5 µm/px (no tissue at all)."""
    from synthetic_slides import write_tiff

    return write_tiff(tmp_path / "blank.tif", np.full((1024, 1536, 3), 255, np.uint8))


@pytest.fixture(scope="session")
def sample_rgb(sample_svs) -> np.ndarray:
    import tiffslide

    with tiffslide.TiffSlide(str(sample_svs)) as ts:
        return np.asarray(ts.read_region((0, 0), 0, ts.dimensions))[..., :3].copy()


def _write_pyramid(path: Path, image: np.ndarray, levels: int, mpp: float | None, ome: bool = False):
    """A tiled JPEG pyramid of real pixels: reduced levels as NewSubfileType=1 pages or OME SubIFDs."""
    res = {}
    if mpp is not None:
        res = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    pyramid = [image]
    for _ in range(levels - 1):
        prev = pyramid[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        pyramid.append(prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)).astype(np.uint8))
    opts = dict(tile=(256, 256), compression="jpeg", photometric="rgb")
    with tifffile.TiffWriter(path, bigtiff=False, ome=ome) as tif:
        if ome:
            meta = {"axes": "YXS"}
            if mpp is not None:
                meta.update(PhysicalSizeX=mpp, PhysicalSizeY=mpp, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
            tif.write(pyramid[0], subifds=levels - 1, metadata=meta, **opts)
            for i, lvl in enumerate(pyramid[1:], 1):
                tif.write(lvl, subfiletype=1, metadata=None, **opts)
        else:
            tif.write(pyramid[0], metadata=None, **res, **opts)
            for i, lvl in enumerate(pyramid[1:], 1):
                r = {}
                if mpp is not None:
                    r = dict(resolution=(1e4 / (mpp * 2**i),) * 2, resolutionunit="CENTIMETER")
                tif.write(lvl, subfiletype=1, metadata=None, **r, **opts)
    return path


@pytest.fixture(scope="session")
def pyramid_tif(tmp_path_factory, sample_rgb) -> Path:
    return _write_pyramid(tmp_path_factory.mktemp("pyr") / "pyramid.tif", sample_rgb, 3, SAMPLE_MPP)


@pytest.fixture(scope="session")
def ome_tiff(tmp_path_factory, sample_rgb) -> Path:
    return _write_pyramid(tmp_path_factory.mktemp("ome") / "slide.ome.tif", sample_rgb, 3, SAMPLE_MPP, ome=True)


@pytest.fixture(scope="session")
def nompp_tif(tmp_path_factory, sample_rgb) -> Path:
    return _write_pyramid(tmp_path_factory.mktemp("nompp") / "nompp.tif", sample_rgb, 2, None)


@pytest.fixture(scope="session")
def dicom_dir(tmp_path_factory, sample_svs) -> Path:
    from wsidicomizer import WsiDicomizer

    out = tmp_path_factory.mktemp("dicom") / "CMU-1-Small-Region"
    WsiDicomizer.convert(str(sample_svs), str(out))
    return out


@pytest.fixture(scope="session")
def large_pyramid(tmp_path_factory) -> Path:
    from synthetic_slides import make_large_pyramid

    return make_large_pyramid(tmp_path_factory.mktemp("large") / "large.tif", 100_000, 100_000)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (Linux, root); unmounted afterwards."""
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs Linux and root")
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield d
    finally:
        gc.collect()
        if subprocess.run(["umount", str(d)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


# ---------------------------------------------------------------- bad inputs
@pytest.fixture
def bad_inputs(tmp_path, sample_svs, pyramid_tif) -> dict[str, Path]:
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(sample_svs.read_bytes()[:100_000])
    random_bytes = tmp_path / "random.svs"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 500_000, np.uint8).tobytes())
    return {"empty": empty, "truncated": truncated, "random": random_bytes}


@pytest.fixture
def corrupt_tile_tif(tmp_path, pyramid_tif) -> tuple[Path, int, int]:
    """A copy of the pyramid whose level-0 tile (column 2, row 1) holds zeros instead of JPEG."""
    path = tmp_path / "corrupt.tif"
    shutil.copy(pyramid_tif, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tiles_x = -(-page.imagewidth // page.tilewidth)
        index = 1 * tiles_x + 2
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * count)
    return path, 2, 1
