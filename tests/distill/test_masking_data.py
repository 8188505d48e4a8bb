"""Block masks, collate tensors, multi-crop augmentation and the step-indexed data order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_gpfm.distill.augment import MultiCropAugmentation
from napari_gpfm.distill.data import DataLayout, MultiCropDataset, StepBatchSampler
from napari_gpfm.distill.masking import BlockMaskGenerator, MultiCropCollate
from napari_gpfm.distill.sources import TileFolderSource

PATCH = 14


def test_block_masks_stay_within_target_and_are_seeded():
    generator = BlockMaskGenerator((16, 16))
    for target in (26, 64, 128):
        mask = generator(target, np.random.default_rng(target))
        assert 0 < mask.sum() <= target
        assert np.array_equal(mask, generator(target, np.random.default_rng(target)))


def test_collate_masks_half_the_global_crops_with_weights(tiny_config):
    cfg = tiny_config(**{"crops.global_size": 224})
    collate = MultiCropCollate(cfg, PATCH)
    masks = collate.make_masks(8, np.random.default_rng(0))
    masked = masks.any(dim=1)
    assert masks.shape == (8, 256) and masked.sum() == 4
    assert (masks.sum(dim=1) <= 128).all()
    samples = [
        {"global": [torch.zeros(3, 224, 224)] * 2, "local": [], "label": -1, "seed": 5}
        for _ in range(4)
    ]
    batch = collate(samples)
    assert batch["global_crops"].shape == (8, 3, 224, 224)
    assert batch["local_crops"].shape[0] == 0
    assert torch.equal(batch["mask_indices"], batch["masks"].flatten().nonzero().flatten())
    n_masked_images = int(batch["masks"].any(dim=1).sum())
    assert batch["mask_weights"].sum().item() == pytest.approx(n_masked_images)


@pytest.fixture
def dataset(tiny_config):
    cfg = tiny_config()
    source = TileFolderSource(cfg["data"]["tiles"])
    return MultiCropDataset(source, MultiCropAugmentation(cfg, PATCH))


def test_multicrop_sample_is_a_function_of_its_seed(dataset):
    a, b, c = dataset[(3, 11)], dataset[(3, 11)], dataset[(3, 12)]
    assert [t.shape for t in a["global"]] == [(3, 56, 56)] * 2
    assert [t.shape for t in a["local"]] == [(3, 28, 28)] * 2
    crops_a, crops_b = a["global"] + a["local"], b["global"] + b["local"]
    assert all(torch.equal(x, y) for x, y in zip(crops_a, crops_b))
    assert not torch.equal(a["global"][0], c["global"][0])
    assert a["label"] == dataset.source.classes.index(dataset.source.paths[3].parent.name)


def test_crop_sizes_must_be_divisible_by_the_patch(tiny_config):
    with pytest.raises(ValueError, match="divisible"):
        MultiCropAugmentation(tiny_config(**{"crops.local_size": 30}), PATCH)


def test_ranks_shard_the_global_batch_and_resume_continues_the_stream():
    single = StepBatchSampler(10, DataLayout(4, 1, 1, 0), seed=1, start_step=0, total_steps=5)
    ranks = [StepBatchSampler(10, DataLayout(2, 1, 2, r), 1, 0, 5) for r in range(2)]
    for step in range(5):
        whole = [i for i, _ in single.micro_batch(step, 0)]
        assert whole == [i for r in ranks for i, _ in r.micro_batch(step, 0)]
    resumed = StepBatchSampler(10, DataLayout(4, 1, 1, 0), seed=1, start_step=3, total_steps=5)
    assert list(resumed) == list(single)[3:]
    epoch0 = [i for step in range(3) for i, _ in single.micro_batch(step, 0)][:10]
    assert sorted(epoch0) == list(range(10))  # each epoch is a permutation
