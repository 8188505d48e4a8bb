"""Per-patch tables and heatmap PNG overlays are written as a user would open them."""

import csv
import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from napari_gpfm.analyses.export import apply_colormap, colormap_lut, write_heatmap_png, write_table
from napari_gpfm.analyses.heatmap import heatmap_raster


def test_csv_has_coordinates_then_values(tmp_path):
    coords = np.array([[0, 0], [224, 0]])
    path = write_table(
        tmp_path / "t.csv", coords, {"score": np.array([0.25, 0.75]), "proba": np.eye(2)}
    )
    rows = list(csv.reader(open(path)))
    assert rows[0] == ["x", "y", "score", "proba_0", "proba_1"]
    assert rows[2] == ["224", "0", "0.75", "0.0", "1.0"]


def test_mismatched_column_is_named(tmp_path):
    with pytest.raises(ValueError, match="'score' has 3 rows for 2 patches"):
        write_table(tmp_path / "t.csv", np.zeros((2, 2)), {"score": np.zeros(3)})


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow installed")
def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    with pytest.raises(ImportError, match="pip install pyarrow"):
        write_table(tmp_path / "t.parquet", np.zeros((1, 2)), {})


def test_viridis_lut_runs_from_dark_purple_to_yellow():
    lut = colormap_lut("viridis")
    assert lut.shape == (256, 4) and lut.dtype == np.uint8
    np.testing.assert_array_equal(lut[0], [0x44, 0x01, 0x54, 255])
    np.testing.assert_array_equal(lut[-1], [0xFD, 0xE7, 0x25, 255])


def test_heatmap_png_is_transparent_where_there_is_no_tissue(tmp_path):
    coords = np.array([[0, 0], [100, 0], [0, 100]])
    r = heatmap_raster(np.array([0.0, 1.0, 0.5]), coords, 100, mpp=0.5)
    path = write_heatmap_png(tmp_path / "h.png", r, upscale=2)
    img = np.asarray(Image.open(path))
    assert img.shape == (4, 4, 4)
    assert img[3, 3, 3] == 0  # (100, 100) has no patch
    assert img[0, 0, 3] == 255
    np.testing.assert_array_equal(img[0, 0, :3], colormap_lut()[0, :3])
    np.testing.assert_array_equal(img[0, 2, :3], colormap_lut()[-1, :3])
    meta = json.load(open(str(path) + ".json"))
    assert meta["scale_yx"] == [25.0, 25.0]
    # half-size pixels: centre of pixel 0 sits a quarter patch in from the footprint edge
    assert meta["translate_yx"][1] == pytest.approx((0 + 25 - 0.5) * 0.5)


def test_colormap_respects_given_range():
    rgba = apply_colormap(np.array([[0.0, 5.0, 10.0]]), vmin=0, vmax=5)
    np.testing.assert_array_equal(rgba[0, 1], rgba[0, 2])  # clipped at vmax
