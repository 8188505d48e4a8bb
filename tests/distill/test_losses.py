"""Each loss pinned against values derived by hand on 2-4 element tensors."""

from __future__ import annotations

import math

import torch

from napari_gpfm.distill.losses import (
    DINOClsLoss,
    ExpertClsLoss,
    ExpertPatchLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    SupervisedLoss,
    resize_patch_grid,
)

T_S = 0.1
LN2, LN43 = math.log(2.0), math.log(4.0 / 3.0)
# student logits whose softmax at T_S is [3/4, 1/4]: (0.1·ln 3, 0) / 0.1 = (ln 3, 0)
THREE_QUARTERS = [T_S * math.log(3.0), 0.0]


def test_dino_pairs_each_global_with_the_other_view_and_locals_with_both():
    loss = DINOClsLoss(n_prototypes=2, student_temp=T_S, center_momentum=0.9)
    student_global = torch.tensor([[0.0, 0.0], THREE_QUARTERS])  # views 1, 2 (B = 1)
    teacher = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # teacher views 1, 2
    # s1 vs t2: -(0.5 ln 0.5 + 0.5 ln 0.5) = ln 2;  s2 vs t1: -ln(3/4) = ln(4/3)
    got = loss(student_global, None, teacher, n_global=2)
    # no local crops: DINOv2 divides the two global pairs by 2 + max(0, 1) = 3 (its
    # n_local_crops_loss_terms is at least 1), not by 2
    assert torch.isclose(got, torch.tensor((LN2 + LN43) / 3))
    # one local crop [0, 0] adds ln 2 against each teacher view
    got = loss(student_global, torch.zeros(1, 2), teacher, n_global=2)
    assert torch.isclose(got, torch.tensor((LN2 + LN43 + 2 * LN2) / 4))


def test_dino_centre_momentum_and_centred_sharpening():
    loss = DINOClsLoss(n_prototypes=2, student_temp=T_S, center_momentum=0.9)
    loss.update_center(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # batch mean (0.5, 0)
    assert torch.allclose(loss.center, torch.tensor([[0.05, 0.0]]))
    # ((1.05, 0) - (0.05, 0)) / 0.5 = (2, 0) -> softmax = (e², 1) / (e² + 1)
    probs = loss.teacher_probs(torch.tensor([[1.05, 0.0]]), teacher_temp=0.5)
    e2 = math.exp(2.0)
    assert torch.allclose(probs, torch.tensor([[e2 / (e2 + 1), 1 / (e2 + 1)]]))


def test_ibot_weights_tokens_per_image_and_divides_by_all_images():
    loss = IBOTPatchLoss(n_prototypes=2, student_temp=T_S, center_momentum=0.9)
    student = torch.tensor([[0.0, 0.0], THREE_QUARTERS, [0.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    weights = torch.tensor([1.0, 0.5, 0.5])  # image 0: 1 masked token, image 1: 2 tokens
    # (1·ln 2 + 0.5·ln(4/3) + 0.5·ln 2) / 4 images (2 of them unmasked)
    expected = (LN2 + 0.5 * LN43 + 0.5 * LN2) / 4
    assert torch.isclose(loss(student, teacher, weights, n_images=4), torch.tensor(expected))


def test_ibot_centre_uses_masked_tokens_and_ignores_empty_batches():
    loss = IBOTPatchLoss(n_prototypes=2, student_temp=T_S, center_momentum=0.9)
    loss.update_center(torch.tensor([[2.0, 0.0], [0.0, 4.0]]))  # mean (1, 2)
    assert torch.allclose(loss.center, torch.tensor([[0.1, 0.2]]))
    loss.update_center(torch.zeros(0, 2))
    assert torch.allclose(loss.center, torch.tensor([[0.1, 0.2]]))


def test_koleo_uses_nearest_neighbour_distance_of_normalised_features():
    x = torch.tensor([[2.0, 0.0], [0.6, 0.8], [-3.0, 0.0]])
    # normalised: a=(1,0), b=(.6,.8), c=(-1,0); nn(a)=b, nn(b)=a at √0.8; nn(c)=b at √3.2
    expected = -(math.log(0.8) + 0.5 * math.log(3.2)) / 3
    assert torch.isclose(KoLeoLoss()(x), torch.tensor(expected), atol=1e-6)


def test_expert_cls_is_one_minus_mean_cosine():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    expert = torch.tensor([[1.0, 1.0], [0.0, -1.0]])  # cosines 1/√2 and -1
    expected = 1 - (1 / math.sqrt(2) - 1) / 2
    assert torch.isclose(ExpertClsLoss()(student, expert), torch.tensor(expected))


def test_expert_patch_mixes_cosine_and_smooth_l1():
    loss = ExpertPatchLoss(cos_weight=0.9, smooth_l1_weight=0.1, beta=1.0)
    student = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])  # 2×2 grid
    expert = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 0.0], [1.0, 0.0]]])
    # cosines 1, 1/√2, 1, 1; SmoothL1: two |d| = 1 elements give 0.5 each, mean over 8 = 1/8
    expected = 0.9 * (1 - 1 / math.sqrt(2)) / 4 + 0.1 / 8
    assert torch.isclose(loss(student, expert), torch.tensor(expected))


def test_expert_patch_resizes_the_expert_grid_to_the_students():
    loss = ExpertPatchLoss(cos_weight=0.9, smooth_l1_weight=0.1, beta=1.0)
    expert = torch.tensor([[[3.0, 4.0]]])  # 1×1 grid -> bicubic to 2×2 stays (3, 4)
    student = torch.tensor([[[4.0, 3.0]] * 4])
    # cos = 24/25 per token; SmoothL1 of |d| = 1 elements = 0.5
    assert torch.isclose(loss(student, expert), torch.tensor(0.9 / 25 + 0.1 * 0.5))
    grid = torch.arange(4.0).view(1, 4, 1).expand(2, 4, 3)
    assert resize_patch_grid(grid, 3).shape == (2, 9, 3)


def test_supervised_cross_entropy_ignores_unlabelled_crops():
    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, 5.0]])
    got = SupervisedLoss()(logits, torch.tensor([1, -1]))  # -log(3/4)
    assert torch.isclose(got, torch.tensor(LN43))
    assert SupervisedLoss()(logits, torch.tensor([-1, -1])) == 0
