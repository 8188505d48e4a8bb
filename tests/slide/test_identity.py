"""Slide identity: TRIDENT's naming rule and the cheap file fingerprint."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from napari_gpfm.slide import SlideFingerprint, open_slide, slide_fingerprint


def copy_as(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst


@pytest.mark.parametrize(
    ("file_name", "slide_name"),
    [
        ("case1.HE.svs", "case1.HE"),
        ("case1.CD3.svs", "case1.CD3"),
        ("CMU-1-Small-Region.svs", "CMU-1-Small-Region"),
        ("X.svs", "X"),
    ],
)
def test_name_is_the_file_name_without_its_last_extension(tmp_path, sample_svs, file_name,
                                                          slide_name):
    link = tmp_path / file_name
    link.symlink_to(sample_svs)
    slide = open_slide(link)
    assert slide.name == slide_name
    assert slide.metadata()["name"] == slide_name


def test_names_of_tiffs_keep_inner_dots(tmp_path, pyramid_tif, ome_tiff):
    assert open_slide(copy_as(pyramid_tif, tmp_path / "X.mirrored.tif")).name == "X.mirrored"
    assert open_slide(ome_tiff).name == "slide.ome"  # TRIDENT's rule: only the last extension
    assert open_slide(pyramid_tif).name == "pyramid"


def test_dicom_slide_is_named_after_its_folder(dicom_dir):
    assert open_slide(dicom_dir).name == "CMU-1-Small-Region"
    one_file = next(dicom_dir.glob("*.dcm"))
    assert open_slide(one_file).name == "CMU-1-Small-Region"


def test_fingerprint_describes_the_file(sample_svs):
    slide = open_slide(sample_svs)
    fp = slide_fingerprint(slide)
    assert isinstance(fp, SlideFingerprint)
    assert fp.size == os.path.getsize(sample_svs) and (fp.width, fp.height) == (2220, 2967)
    assert fp.mpp == pytest.approx(0.499) and fp.path == str(sample_svs.resolve())
    assert len(fp.digest) == 64 and int(fp.digest, 16) >= 0
    text = fp.describe()
    assert text.startswith(str(sample_svs.resolve()))
    assert f"{fp.size:,} bytes" in text and "2220×2967 px" in text and "0.499 µm/px" in text


def test_fingerprint_is_cached_cheap_and_decodes_no_tile(sample_svs):
    slide = open_slide(sample_svs)
    calls = []
    original = slide.backend.read_tile
    slide.backend.read_tile = lambda *a: calls.append(a) or original(*a)
    fp = slide_fingerprint(slide)
    assert calls == []
    assert slide_fingerprint(slide) is fp
    # a user mpp override is the same file: same fingerprint, the file's mpp kept for messages
    other = slide.with_mpp(0.3)
    assert slide_fingerprint(other) is fp and fp.mpp == pytest.approx(0.499)


def test_fingerprint_json_round_trip(sample_svs, nompp_tif):
    for path in (sample_svs, nompp_tif):
        fp = slide_fingerprint(open_slide(path))
        text = fp.to_json()
        assert json.loads(text)["digest"] == fp.digest
        back = SlideFingerprint.from_json(text)
        assert back == fp and back.path == fp.path and back.mpp == fp.mpp
    assert SlideFingerprint.from_json(fp.to_json()).mpp is None  # nompp: no mpp recorded
    assert "no mpp recorded" in fp.describe()
    with pytest.raises(ValueError, match="fingerprint"):
        SlideFingerprint.from_json('{"size": 3}')


def test_same_file_elsewhere_matches_and_other_files_do_not(tmp_path, sample_svs, pyramid_tif):
    ref = slide_fingerprint(open_slide(sample_svs))
    copy = slide_fingerprint(open_slide(copy_as(sample_svs, tmp_path / "a" / "moved.svs")))
    assert copy.matches(ref) and copy == ref and copy.path != ref.path
    assert not slide_fingerprint(open_slide(pyramid_tif)).matches(ref)
    # one changed byte near the end (same size, same dimensions) is another file
    changed = copy_as(sample_svs, tmp_path / "b" / "CMU-1-Small-Region.svs")
    data = bytearray(changed.read_bytes())
    data[-10] ^= 0xFF
    changed.write_bytes(bytes(data))
    other = slide_fingerprint(open_slide(changed))
    assert (other.size, other.width, other.height) == (ref.size, ref.width, ref.height)
    assert not other.matches(ref) and other != ref


def test_dicom_fingerprint_covers_the_folder(dicom_dir):
    files = sorted(dicom_dir.glob("*.dcm"))
    fp = slide_fingerprint(open_slide(dicom_dir))
    assert fp.size == sum(f.stat().st_size for f in files) and fp.n_files == len(files)
    assert fp.path == str(dicom_dir.resolve()) and (fp.width, fp.height) == (2220, 2967)
    # one instance opened alone is the same slide
    assert slide_fingerprint(open_slide(files[0])) == fp
