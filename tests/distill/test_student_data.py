"""Stain (HED) augmentation and multi-scale, random-position slide reads (the bundled student's
data): seeded, shape/dtype preserving, measurably changing the stain, reading what they say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_gpfm.distill.augment import (
    MultiCropAugmentation,
    hed_jitter,
    hed_to_rgb,
    random_hed_jitter,
    rgb_to_hed,
)
from napari_gpfm.distill.data import (
    MultiCropDataset,
    SlideSampling,
    read_slide_window,
    slide_part,
)
from napari_gpfm.distill.sources import ConcatSource, SlidePatchSource, TileFolderSource

PATCH = 14
REPO = Path(__file__).resolve().parents[2]
SLIDE = REPO / "sample_data" / "CMU-1-Small-Region.svs"
TILES = REPO.parent / "shared" / "data" / "tiles" / "crc-he" / "CRC-VAL-HE-7K"  # as conftest.py


@pytest.fixture(scope="module")
def tile() -> torch.Tensor:
    """One real H&E tile, uint8 (3, 224, 224)."""
    if not TILES.is_dir():
        pytest.skip(f"real H&E tiles not found at {TILES}")
    source = TileFolderSource([TILES])
    return torch.from_numpy(source.read(5)).permute(2, 0, 1).contiguous()


def test_rgb_to_hed_matches_scikit_image(tile):
    from skimage.color import hed2rgb, rgb2hed

    hwc = tile.permute(1, 2, 0).numpy()
    ours = rgb_to_hed(tile).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, rgb2hed(hwc), atol=1e-5)
    back = hed_to_rgb(rgb_to_hed(tile)).permute(1, 2, 0).numpy()
    expected = np.round(hed2rgb(rgb2hed(hwc)) * 255)
    assert np.abs(back.astype(float) - expected).max() <= 1


def test_hed_jitter_identity_and_stain_change(tile):
    assert torch.equal(hed_jitter(tile, [1, 1, 1], [0, 0, 0]), tile)
    more_haematoxylin = hed_jitter(tile, [1.3, 1, 1], [0, 0, 0])
    assert more_haematoxylin.shape == tile.shape and more_haematoxylin.dtype == torch.uint8
    h_before = rgb_to_hed(tile)[0].mean()
    h_after = rgb_to_hed(more_haematoxylin)[0].mean()
    assert h_after > 1.2 * h_before  # the H density really went up by ~30 %
    e_before, e_after = rgb_to_hed(tile)[1].mean(), rgb_to_hed(more_haematoxylin)[1].mean()
    assert abs(e_after - e_before) < 0.05 * e_before  # eosin left (almost) alone


def test_random_hed_jitter_is_seeded_and_changes_stain(tile):
    def jitter(seed: int) -> torch.Tensor:
        return random_hed_jitter(tile, torch.Generator().manual_seed(seed), 0.3, 0.02)

    a, b, c = jitter(0), jitter(0), jitter(1)
    assert a.shape == tile.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    mean_shift = (a.float() - tile.float()).abs().mean()
    assert mean_shift > 3  # grey levels: a visible change of stain, not rounding noise


def test_multicrop_hed_off_by_default_and_on_with_p1(tiny_config):
    cfg = tiny_config()
    source = TileFolderSource(cfg["data"]["tiles"])
    plain = MultiCropDataset(source, MultiCropAugmentation(cfg, PATCH))
    off = dict(cfg, crops={**cfg["crops"], "hed": {"p": 0.0, "alpha": 0.3, "beta": 0.02}})
    on = dict(cfg, crops={**cfg["crops"], "hed": {"p": 1.0, "alpha": 0.3, "beta": 0.02}})
    a = plain[(3, 11)]
    b = MultiCropDataset(source, MultiCropAugmentation(off, PATCH))[(3, 11)]
    c = MultiCropDataset(source, MultiCropAugmentation(on, PATCH))[(3, 11)]
    # p = 0 draws no extra random numbers: the same crops as a config without the section
    crops_a, crops_b = a["global"] + a["local"], b["global"] + b["local"]
    assert all(torch.equal(x, y) for x, y in zip(crops_a, crops_b))
    assert [t.shape for t in c["global"]] == [t.shape for t in a["global"]]
    assert not torch.equal(a["global"][0], c["global"][0])
    again = MultiCropDataset(source, MultiCropAugmentation(on, PATCH))[(3, 11)]
    assert all(torch.equal(x, y) for x, y in zip(c["global"], again["global"]))


def test_slide_sampling_from_config(tiny_config):
    cfg = tiny_config()
    assert SlideSampling.from_config(cfg) == SlideSampling((1.0,), False)
    assert not SlideSampling.from_config(cfg).active
    data = {**cfg["data"], "target_mpp": 0.5, "multi_mpp": [0.5, 1.0, 2.0],
            "random_position": True}
    sampling = SlideSampling.from_config({**cfg, "data": data})
    assert sampling == SlideSampling((1.0, 2.0, 4.0), True) and sampling.active
    with pytest.raises(ValueError, match="multi_mpp"):
        SlideSampling.from_config({**cfg, "data": {**data, "multi_mpp": [0.5, -1]}})


@pytest.fixture(scope="module")
def slide_source(tmp_path_factory):
    if not SLIDE.is_file():
        pytest.skip(f"sample slide not found at {SLIDE}")
    from napari_gpfm.distill.config import load_config

    cfg = load_config(None, {"data": {"slides": [str(SLIDE)], "patch_size": 112}})
    return SlidePatchSource(cfg["data"]["slides"], cfg)


def test_slide_window_at_zoom_1_is_the_grid_patch(slide_source):
    g = torch.Generator().manual_seed(0)
    window = read_slide_window(slide_source, 3, SlideSampling((1.0,), False), g)
    assert window.dtype == np.uint8 and window.shape == (112, 112, 3)
    assert np.array_equal(window, slide_source.read(3))


def test_slide_window_zoom_reads_a_wider_field_inside_the_slide(slide_source):
    from napari_gpfm.slide import open_slide

    slide = open_slide(SLIDE)
    width, height = slide.dimensions
    slide_id, x, y = (int(v) for v in slide_source.index[3])
    size0 = slide_source.size0[slide_id]
    window = read_slide_window(slide_source, 3, SlideSampling((2.0,), False),
                               torch.Generator().manual_seed(0))
    side0 = 2 * size0  # centred on the cell, moved inside the slide
    left = min(max(round(x + size0 / 2 - side0 / 2), 0), width - side0)
    top = min(max(round(y + size0 / 2 - side0 / 2), 0), height - side0)
    assert np.array_equal(window, slide.read_patch(left, top, side0, 112))
    assert not np.array_equal(window, slide_source.read(3))


def test_random_positions_are_seeded_and_differ(slide_source):
    sampling = SlideSampling((1.0, 2.0, 4.0), True)

    def read(seed: int) -> np.ndarray:
        return read_slide_window(slide_source, 7, sampling, torch.Generator().manual_seed(seed))

    windows = [read(s) for s in range(6)]
    assert all(w.shape == (112, 112, 3) and w.dtype == np.uint8 for w in windows)
    assert np.array_equal(read(2), windows[2])
    assert len({w.tobytes() for w in windows}) == 6


def test_dataset_reads_tiles_as_they_are_and_slides_through_the_sampling(slide_source):
    if not TILES.is_dir():
        pytest.skip(f"real H&E tiles not found at {TILES}")
    tiles = TileFolderSource([TILES])
    both = ConcatSource([tiles, slide_source])
    assert slide_part(both, 0) is None
    assert slide_part(both, len(tiles) + 4) == (slide_source, 4)

    class NoAugment:
        def __call__(self, image, g):
            return {"global": [image], "local": []}

    sampling = SlideSampling((1.0, 2.0), True)
    data = MultiCropDataset(both, NoAugment(), sampling)  # type: ignore[arg-type]
    assert np.array_equal(data.read(2, 99), tiles.read(2))
    first = data.read(len(tiles) + 4, 99)
    assert np.array_equal(first, data.read(len(tiles) + 4, 99))
    assert not all(np.array_equal(first, data.read(len(tiles) + 4, s)) for s in range(100, 104))
    assert not np.array_equal(first, slide_source.read(4))
