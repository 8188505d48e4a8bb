"""Heatmap rasters land exactly on the patches they summarise, in napari world coordinates."""

import numpy as np
import pytest

from napari_gpfm.analyses.heatmap import heatmap_raster, labels_raster, patch_grid


def _napari_cell_span(raster, axis: int, j: int) -> tuple[float, float]:
    """World span of data cell j as napari draws it: centre translate + j·scale, ± scale/2."""
    centre = raster.translate[axis] + j * raster.scale[axis]
    return centre - raster.scale[axis] / 2, centre + raster.scale[axis] / 2


def _footprint(x: int, P: int, mpp: float) -> tuple[float, float]:
    """World span of level-0 pixels x … x+P-1 when pixel k is centred at world k·mpp."""
    return (x - 0.5) * mpp, (x + P - 0.5) * mpp


def test_cells_coincide_with_patch_footprints_and_gaps_are_nan():
    P, mpp = 224, 0.2527
    xs, ys = [1000, 1224, 1448], [500, 724]
    coords = np.array([(x, y) for y in ys for x in xs], dtype=np.int64)
    coords = coords[[0, 1, 2, 3, 5]]  # patch (1224, 724) is missing: no tissue there
    values = np.arange(5, dtype=np.float32) + 1
    r = heatmap_raster(values, coords, P, mpp)

    assert r.data.shape == (2, 3) and r.data.dtype == np.float32
    assert r.unit == "µm"
    assert r.scale == pytest.approx((P * mpp, P * mpp), abs=0)
    assert r.translate == (
        pytest.approx((500 + P / 2 - 0.5) * mpp),
        pytest.approx((1000 + P / 2 - 0.5) * mpp),
    )
    for v, (x, y) in zip(values, coords):
        row, col = (y - 500) // P, (x - 1000) // P
        assert r.data[row, col] == v
        np.testing.assert_allclose(
            _napari_cell_span(r, 1, col), _footprint(x, P, mpp), rtol=0, atol=1e-9
        )
        np.testing.assert_allclose(
            _napari_cell_span(r, 0, row), _footprint(y, P, mpp), rtol=0, atol=1e-9
        )
    assert np.isnan(r.data[1, 1])


def test_overlapping_grid_averages_values_on_stride_cells():
    P, mpp = 224, 0.5
    coords = np.array([[0, 0], [112, 0], [224, 0]], dtype=np.int64)  # stride 112 = P/2
    r = heatmap_raster(np.array([1.0, 2.0, 3.0]), coords, P, mpp)
    assert r.grid.cell == 112 and r.grid.k == 2
    assert r.data.shape == (2, 4)
    np.testing.assert_allclose(r.data[0], [1.0, 1.5, 2.5, 3.0])
    np.testing.assert_allclose(r.data[1], r.data[0])
    # the first patch's 2×2 cells span exactly its footprint
    lo, _ = _napari_cell_span(r, 1, 0)
    _, hi = _napari_cell_span(r, 1, 1)
    np.testing.assert_allclose((lo, hi), _footprint(0, P, mpp), rtol=0, atol=1e-12)


def test_patch_size_not_multiple_of_stride_uses_gcd_cells():
    coords = np.array([[10, 20], [160, 20], [310, 20]], dtype=np.int64)  # stride 150, P 200
    r = heatmap_raster(np.array([0.0, 3.0, 6.0]), coords, 200)
    assert r.grid.cell == 50 and r.grid.k == 4 and r.unit == "px"
    assert r.translate == (20 + 25 - 0.5, 10 + 25 - 0.5)
    # 50-px cells from x=10: patch 0 covers cells 0-3, patch 1 cells 3-6, patch 2 cells 6-9
    np.testing.assert_allclose(r.data[0], [0, 0, 0, 1.5, 3, 3, 4.5, 6, 6, 6])


def test_nan_values_count_as_missing():
    coords = np.array([[0, 0], [100, 0]])
    r = heatmap_raster(np.array([np.nan, 5.0]), coords, 100)
    assert np.isnan(r.data[0, 0]) and r.data[0, 1] == 5.0


def test_patch_index_at_follows_the_half_pixel_convention():
    P, mpp = 100, 0.5
    coords = np.array([[0, 0], [100, 0], [0, 100]], dtype=np.int64)
    g = patch_grid(coords, P, mpp)
    # world (y, x): the first patch spans x in [-0.25, 49.75) µm
    assert g.patch_index_at(((10 - 0.5) * mpp, (0 - 0.5) * mpp)) == 0
    assert g.patch_index_at((0.0, (100 - 0.5) * mpp - 1e-6)) == 0
    assert g.patch_index_at((0.0, (100 - 0.5) * mpp)) == 1
    assert g.patch_index_at((60.0, 10.0)) == 2
    assert g.patch_index_at((60.0, 60.0)) == -1  # the (100, 100) patch is not in the grid
    assert g.patch_index_at((-1.0, 10.0)) == -1
    many = g.patch_index_at(np.array([[1.0, 1.0], [1.0, 60.0], [60.0, 60.0]]))
    np.testing.assert_array_equal(many, [0, 1, -1])


def test_patch_index_at_with_overlap_picks_the_nearest_centre():
    coords = np.array([[0, 0], [50, 0], [100, 0]], dtype=np.int64)  # P 100, stride 50
    g = patch_grid(coords, 100)
    assert g.patch_index_at((49.5, 10.0)) == 0  # only patch 0 covers x=10
    # x=60 and x=80 lie in patches 0 and 1 (centres 49.5 and 99.5): the nearest centre wins
    assert g.patch_index_at((49.5, 60.0)) == 0
    assert g.patch_index_at((49.5, 80.0)) == 1
    assert g.patch_index_at((49.5, 140.0)) == 2


def test_labels_raster_shifts_labels_and_takes_the_majority_on_overlap():
    coords = np.array([[0, 0], [100, 0], [200, 0]], dtype=np.int64)
    r = labels_raster(np.array([0, 2, -1]), coords, 100)
    assert r.data.dtype == np.int32
    np.testing.assert_array_equal(r.data, [[1, 3, 0]])  # -1 = unlabelled stays background

    # stride 50: each 50-px cell is covered by up to two patches
    coords = np.array([[0, 0], [50, 0], [100, 0], [150, 0]], dtype=np.int64)
    r = labels_raster(np.array([4, 4, 7, 7]), coords, 100)
    # cells: 0:{p0} 1:{p0,p1} 2:{p1,p2} 3:{p2,p3} 4:{p3}; tie in cell 2 -> smallest label
    np.testing.assert_array_equal(r.data[0], [5, 5, 5, 8, 8])


def test_irregular_coordinates_are_refused_with_a_clear_message():
    coords = np.array([[0, 0], [1_000_003, 7]])
    with pytest.raises(ValueError, match="not on a regular grid"):
        patch_grid(coords, 224, max_cells=10_000)
