"""DICOM whole-slide images: the file's own series, extensionless instances, broken metadata.

References: wsidicom opening the series' files alone, and pydicom's decoded frames.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_gpfm.slide import (
    DamagedSlideError,
    EmptySlideError,
    SlideMetadataWarning,
    SlideOpenError,
    UnsupportedSlideError,
    open_slide,
    slide_fingerprint,
    slide_kind,
)


def _wsidicom_region(files, x, y, w, h) -> np.ndarray:
    from wsidicom import WsiDicom

    with WsiDicom.open([str(f) for f in files]) as wsi:
        return np.asarray(wsi.read_region((x, y), 0, (w, h)).convert("RGB"))


def _wsidicom_size(files) -> tuple[int, int]:
    from wsidicom import WsiDicom

    with WsiDicom.open([str(f) for f in files]) as wsi:
        return int(wsi.size.width), int(wsi.size.height)


@pytest.fixture
def two_slides(tmp_path, dicom_dir, third_party) -> dict[str, list[Path]]:
    """One folder holding two DICOM slides: the project's (wsidicomizer output of the sample SVS,
    4 instances) and OpenSlide's boxes (volume + thumbnail). Values: the original files."""
    folder = tmp_path / "two-slides"
    folder.mkdir()
    ours = sorted(dicom_dir.glob("*.dcm"))
    boxes = [third_party / "openslide-python" / f"boxes_{i}.dcm" for i in (0, 1)]
    for f in ours + boxes:
        shutil.copy(f, folder / f.name)
    return {"folder": [folder], "ours": ours, "boxes": boxes}


def test_a_file_opens_its_own_series_never_the_other_slide(two_slides):
    folder = two_slides["folder"][0]
    for key in ("ours", "boxes"):
        originals = two_slides[key]
        w, h = _wsidicom_size(originals)
        for original in originals:
            slide = open_slide(folder / original.name)
            assert slide.dimensions == (w, h), f"{original.name} opened another slide"
            assert sorted(f.name for f in slide.backend.files) == sorted(f.name for f in originals)
            region = (0, 0, w, h) if w * h <= 256 * 256 else (300, 500, 700, 600)
            np.testing.assert_array_equal(slide.read_region(region[0], region[1], 0, *region[2:]),
                                          _wsidicom_region(originals, *region))  # fmt: skip
            # several slides in the folder: each is named after its file, not the folder
            assert slide.name == original.stem
    boxes = open_slide(folder / "boxes_0.dcm")
    ours = open_slide(folder / two_slides["ours"][0].name)
    assert slide_fingerprint(boxes) != slide_fingerprint(ours)


def test_a_folder_of_two_slides_asks_for_a_file(two_slides):
    folder = two_slides["folder"][0]
    with pytest.raises(SlideOpenError) as info:
        open_slide(folder)
    message = str(info.value)
    assert str(folder) in message and "2 DICOM slides" in message and "boxes_0.dcm" in message


def test_extensionless_instances_are_found_by_the_dicm_magic(tmp_path, dicom_dir):
    folder = tmp_path / "WG26-like"
    folder.mkdir()
    originals = sorted(dicom_dir.glob("*.dcm"))
    for i, f in enumerate(originals):
        shutil.copy(f, folder / f"IMG{i:04d}")
    (folder / "README").write_text("not DICOM")
    assert slide_kind(folder) == "dicom" and slide_kind(folder / "IMG0000") == "dicom"
    assert slide_kind(folder / "README") is None
    reference = open_slide(dicom_dir)
    for path in (folder, folder / "IMG0002"):
        slide = open_slide(path)
        assert slide.dimensions == reference.dimensions == _wsidicom_size(originals)
        assert len(slide.backend.files) == len(originals)
        assert slide.name == "WG26-like"
        np.testing.assert_array_equal(slide.read_region(100, 200, 0, 300, 250),
                                      reference.read_region(100, 200, 0, 300, 250))  # fmt: skip


def test_broken_optional_metadata_warns_and_keeps_the_pixels(third_party):
    path = third_party / "highdicom" / "sm_image.dcm"
    with pytest.warns(SlideMetadataWarning) as caught:
        slide = open_slide(path)
    messages = [str(w.message) for w in caught]
    assert any(str(path) in m and "UniversalIssuerType" in m for m in messages)
    assert slide.dimensions == (50, 50) and slide.mpp == pytest.approx(0.499)
    pixels = slide.read_region(0, 0, 0, 50, 50)
    np.testing.assert_array_equal(pixels, _wsidicom_region([path], 0, 0, 50, 50))
    # pydicom's own decoding: 25 frames of 10×10, TILED_FULL row by row
    frames = pydicom.pixels.pixel_array(str(path)).reshape(5, 5, 10, 10, 3)
    np.testing.assert_array_equal(pixels, frames.transpose(0, 2, 1, 3, 4).reshape(50, 50, 3))


def test_dicom_errors_name_the_file_and_the_problem(tmp_path, third_party):
    # DICOM magic, then garbage: damaged
    broken = tmp_path / "broken"
    broken.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 2)
    with pytest.raises(DamagedSlideError, match="not a readable DICOM file") as info:
        open_slide(broken)
    assert str(broken) in str(info.value)
    # a WSI instance cut short: damaged, naming the file
    cut = tmp_path / "cut.dcm"
    cut.write_bytes((third_party / "openslide-python" / "boxes_0.dcm").read_bytes()[:600])
    with pytest.raises(DamagedSlideError, match="damaged or truncated") as info:
        open_slide(cut)
    assert str(cut) in str(info.value)
    # a DICOM file that is not a whole-slide image: unsupported, saying what it is
    other = tmp_path / "ct.dcm"
    _write_ct(other)
    with pytest.raises(UnsupportedSlideError, match="CT Image Storage") as info:
        open_slide(other)
    assert str(other) in str(info.value) and "Whole Slide Microscopy" in str(info.value)
    # a folder with DICOM files but no slide instance: empty
    with pytest.raises(EmptySlideError, match="no whole-slide") as info:
        open_slide(_folder_with(tmp_path / "only-ct", other))
    assert str(tmp_path / "only-ct") in str(info.value)


def _write_ct(path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)


def _folder_with(folder: Path, *files: Path) -> Path:
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder
