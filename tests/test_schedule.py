"""Cosine schedule: buffers against the official reference, and the closed-form operations."""

import pytest
import torch

from nnunet_lefusion.diffusion.schedule import BUFFER_NAMES, CosineSchedule
from nnunet_lefusion.errors import LeFusionError
from tests.reference import reference_numbers

REFERENCE = reference_numbers()


@pytest.fixture(scope="module")
def schedule():
    return CosineSchedule(300)


def test_buffers_equal_official_reference(schedule):
    buffers = schedule.official_buffers()
    assert tuple(buffers) == BUFFER_NAMES
    for name, buf in buffers.items():
        assert buf.dtype == torch.float32 and buf.shape == (300,), name
        assert torch.isfinite(buf).all(), name
    compared = [k[len("schedule_300_"):] for k in REFERENCE if k.startswith("schedule_300_")]
    assert len(compared) >= 6
    for name in compared:
        torch.testing.assert_close(buffers[name], torch.tensor(REFERENCE["schedule_300_" + name]),
                                   rtol=1e-5, atol=0)


def test_derived_buffers_are_consistent(schedule):
    b = schedule.official_buffers()
    assert b["betas"].max().item() == pytest.approx(0.9999, rel=1e-6)
    torch.testing.assert_close(b["sqrt_alphas_cumprod"] ** 2, b["alphas_cumprod"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b["alphas_cumprod_prev"][1:], b["alphas_cumprod"][:-1])
    torch.testing.assert_close(b["sqrt_recip_alphas_cumprod"] * b["sqrt_alphas_cumprod"], torch.ones(300))


def test_official_buffers_are_copies(schedule):
    schedule.official_buffers()["betas"].zero_()
    assert schedule.official_buffers()["betas"][0] > 0


def test_x0_round_trip_and_posterior_at_zero(schedule):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 2, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 150, 299])
    x_t = schedule.q_sample(x0, t, noise)
    torch.testing.assert_close(schedule.predict_x0_from_eps(x_t[:2], t[:2], noise[:2]), x0[:2],
                               rtol=1e-4, atol=1e-4)
    mean, var, _ = schedule.posterior(x0, x_t, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert (var == 0).all()


def test_undo_matches_beta_and_renoise(schedule):
    x = torch.full((2, 1, 1, 2, 2), 0.5)
    noise = torch.ones_like(x)
    t = torch.tensor([10, 298])
    out = schedule.undo(x, t, noise)
    beta = schedule.official_buffers()["betas"][t + 1].reshape(2, 1, 1, 1, 1)
    torch.testing.assert_close(out, (torch.sqrt(1 - beta) * 0.5 + torch.sqrt(beta)).expand_as(x))
    torch.testing.assert_close(schedule.renoise(x[:1], 10, 11, noise[:1]), out[:1])
    with pytest.raises(ValueError):
        schedule.undo(x, torch.tensor([299, 0]), noise)


def test_renoise_from_clean_equals_q_sample(schedule):
    x0 = torch.linspace(-1, 1, 16).reshape(1, 1, 1, 4, 4)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(schedule.renoise(x0, -1, 120, noise), schedule.q_sample(x0, torch.tensor([120]), noise))


def test_short_schedule_and_invalid_length():
    short = CosineSchedule(20).official_buffers()
    assert short["betas"].shape == (20,) and short["alphas_cumprod"][-1] < 1e-3
    with pytest.raises(LeFusionError):
        CosineSchedule(1)
