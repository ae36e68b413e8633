"""Lesion-focused loss: official formula, masking, gradients, empty classes."""
import pytest
import torch

from nnunet_lefusion.diffusion.loss import lesion_channel_masks, lesion_l1_loss, lesion_mean_loss, training_loss
from nnunet_lefusion.diffusion.schedule import CosineSchedule
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.model import ModelConfig


def _batch():
    gen = torch.Generator().manual_seed(0)
    label = torch.zeros(2, 3, 6, 6, dtype=torch.long)
    label[0, 1, 1:4, 1:4] = 3
    label[0, 1, 2, 2] = 4
    label[1, 0:2, 3:5, 3:5] = 3  # case 1 has no class 4
    eps = torch.randn(2, 2, 3, 6, 6, generator=gen)
    eps_hat = torch.randn(2, 2, 3, 6, 6, generator=gen)
    return label, eps, eps_hat


def test_channel_masks_follow_lesion_label_order():
    label, _, _ = _batch()
    masks = lesion_channel_masks(label, [3, 4])
    assert masks.shape == (2, 2, 3, 6, 6)
    assert masks[:, 0].sum() == 8 + 8 and masks[:, 1].sum() == 1
    assert torch.equal(lesion_channel_masks(label, [4, 3])[:, 0], masks[:, 1])
    with pytest.raises(LeFusionError):
        lesion_channel_masks(label[:, 0], [3])


def test_official_volume_normalisation_and_lesion_variant():
    label, eps, eps_hat = _batch()
    masks = lesion_channel_masks(label, [3, 4])
    expected = sum((masks[:, k] * (eps[:, k] - eps_hat[:, k])).abs().mean() for k in range(2))
    torch.testing.assert_close(lesion_l1_loss(eps_hat, eps, masks), expected)
    per_lesion = sum((masks[:, k] * (eps[:, k] - eps_hat[:, k])).abs().sum() / masks[:, k].sum() for k in range(2))
    torch.testing.assert_close(lesion_l1_loss(eps_hat, eps, masks, "lesion"), per_lesion)
    with pytest.raises(LeFusionError):
        lesion_l1_loss(eps_hat, eps, masks, "bogus")


def test_loss_ignores_background_and_gradient_vanishes_there():
    label, eps, eps_hat = _batch()
    masks = lesion_channel_masks(label, [3, 4])
    for norm in ("volume", "lesion"):
        changed = torch.where(masks.bool(), eps_hat, eps_hat + 100.0)
        torch.testing.assert_close(lesion_l1_loss(changed, eps, masks, norm), lesion_l1_loss(eps_hat, eps, masks, norm))
        leaf = eps_hat.clone().requires_grad_(True)
        lesion_l1_loss(leaf, eps, masks, norm).backward()
        assert (leaf.grad[~masks.bool()] == 0).all()
        assert (leaf.grad[masks.bool()] != 0).all()
    assert lesion_l1_loss(eps, eps, masks) == 0


def test_absent_class_adds_nothing_and_no_nan():
    label, eps, eps_hat = _batch()
    only_mi = torch.where(label == 4, torch.full_like(label, 3), label)
    for norm in ("volume", "lesion"):
        masks = lesion_channel_masks(only_mi, [3, 4])
        leaf = eps_hat.clone().requires_grad_(True)
        loss = lesion_l1_loss(leaf, eps, masks, norm)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()
        torch.testing.assert_close(loss, lesion_l1_loss(eps_hat[:, :1], eps[:, :1], masks[:, :1], norm))
        empty = lesion_channel_masks(torch.zeros_like(label), [3, 4])
        assert lesion_l1_loss(eps_hat, eps, empty, norm) == 0


def test_training_loss_with_tiny_network_is_finite_and_seeded():
    torch.manual_seed(0)
    net = ModelConfig.from_yaml("tiny").build()
    label, _, _ = _batch()
    label = torch.nn.functional.pad(label, (5, 5, 5, 5))[..., :16, :16]  # (2, 3, 16, 16)
    x0 = (torch.rand(2, 1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1).expand(2, 2, 3, 16, 16)
    masks = lesion_channel_masks(label, [3, 4])
    cond = torch.rand(2, 32)
    losses = [training_loss(net, CosineSchedule(300), x0, masks, cond, torch.Generator().manual_seed(7))
              for _ in range(2)]
    assert losses[0] > 0 and torch.equal(losses[0], losses[1])
    losses[0].backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    empty = lesion_channel_masks(torch.zeros_like(label), [3, 4])
    assert training_loss(net, CosineSchedule(300), x0, empty, cond) == 0


def test_lesion_mean_term_measures_the_lesion_wide_offset_in_x0_units():
    label, eps, _ = _batch()
    masks = lesion_channel_masks(label, [3, 4])
    scale = torch.tensor([2.0, 0.5])
    offset = torch.tensor([0.3, -0.2])[:, None, None, None, None]  # a lesion-wide offset per case, texture exact
    shifted = eps + offset * masks + 5.0 * (1 - masks)  # the background is not looked at
    # case 0 has both classes (2 x 0.3 x 2), case 1 only class 3 (0.2 x 0.5): mean over the batch
    torch.testing.assert_close(lesion_mean_loss(shifted, eps, masks, scale), torch.tensor((1.2 + 0.1) / 2))
    # zero-mean errors inside the lesion (texture) cost nothing: the term only sees the level
    error = torch.randn(eps.shape, generator=torch.Generator().manual_seed(3)) * masks
    lesion_means = error.sum(dim=(2, 3, 4), keepdim=True) / masks.sum(dim=(2, 3, 4), keepdim=True).clamp(min=1)
    texture = eps + error - lesion_means * masks
    assert (texture != eps).any() and lesion_mean_loss(texture, eps, masks, scale) < 1e-5
    assert lesion_mean_loss(shifted, eps, lesion_channel_masks(torch.zeros_like(label), [3, 4]), scale) == 0


def test_training_loss_adds_the_weighted_mean_term():
    torch.manual_seed(0)
    net = ModelConfig.from_yaml("tiny").build()
    label, _, _ = _batch()
    label = torch.nn.functional.pad(label, (5, 5, 5, 5))[..., :16, :16]
    x0 = (torch.rand(2, 1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1).expand(2, 2, 3, 16, 16)
    masks, cond, schedule = lesion_channel_masks(label, [3, 4]), torch.rand(2, 32), CosineSchedule(300)
    plain, with_mean, twice = (training_loss(net, schedule, x0, masks, cond, torch.Generator().manual_seed(7),
                                             mean_weight=w) for w in (0.0, 0.5, 1.0))
    assert with_mean > plain
    torch.testing.assert_close(twice - plain, 2 * (with_mean - plain))
