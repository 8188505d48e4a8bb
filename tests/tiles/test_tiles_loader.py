"""Patch loading: worker processes return the same pixels, in scan order, as direct reads."""

from __future__ import annotations

import numpy as np
import pytest

from napari_gpfm.slide import open_slide
from napari_gpfm.tiles import PatchDataset, iter_batches
from napari_gpfm.tiles.loader import default_num_workers


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_in_order_match_direct_reads(sample_path, num_workers):
    slide = open_slide(sample_path)
    coords = np.array([[0, 0], [448, 224], [1000, 2000], [224, 0], [1500, 1500]], np.int64)
    ds = PatchDataset(sample_path, coords, size0=448, out_size=112)
    batches = list(iter_batches(ds, batch_size=2, num_workers=num_workers))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    idx = np.concatenate([b[1].numpy() for b in batches])
    np.testing.assert_array_equal(idx, np.arange(5))
    patches = np.concatenate([b[0].numpy() for b in batches])
    assert patches.dtype == np.uint8 and patches.shape == (5, 112, 112, 3)
    for i, (x, y) in enumerate(coords):
        np.testing.assert_array_equal(patches[i], slide.read_patch(int(x), int(y), 448, 112))


def test_dataset_pickles_without_open_slide(sample_path):
    import pickle

    ds = PatchDataset(sample_path, np.zeros((1, 2)), 224, 224, mpp=0.25)
    _ = ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._slide is None and clone.mpp == 0.25
    assert clone.slide.mpp == 0.25 and clone.slide.mpp_source == "user"


def test_default_workers_bounded():
    assert 1 <= default_num_workers() <= 2
