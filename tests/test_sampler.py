"""RePaint sampler with the real tiny denoiser: jump lists, evaluation counts, background, determinism."""

import numpy as np
import pytest
import torch

from nnunet_lefusion.diffusion.histograms import class_histogram
from nnunet_lefusion.diffusion.jump import (
    count_evaluations, expected_evaluations, jump_schedule, strided_jump_schedule, strided_timesteps)
from nnunet_lefusion.diffusion.lesion_maps import histogram_levels
from nnunet_lefusion.diffusion.sampler import RePaintSampler, SamplerConfig
from nnunet_lefusion.diffusion.schedule import CosineSchedule
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.model import ModelConfig
from nnunet_lefusion.roi import crop, crop_image, locate_roi, paste_image
from tests.reference import reference_numbers

REFERENCE = reference_numbers()
SHORT = CosineSchedule(10)
SHORT_CONFIG = SamplerConfig.official(jump_length=2, jump_n_sample=2)  # 18 evaluations on 10 steps


@pytest.mark.parametrize("T,jl,jn,length,evals", [(300, 5, 5, 2661, 1480), (300, 2, 2, 897, 598),
                                                   (300, 10, 10, 5521, 2910), (20, 3, 2, 57, 38)])
def test_jump_lists_equal_official(T, jl, jn, length, evals):
    times = jump_schedule(T, jl, jn)
    assert times == REFERENCE[f"jump_schedule_{T}_1_{jl}_{jn}"]
    assert len(times) == length
    assert count_evaluations(times) == evals == expected_evaluations(T, jl, jn)
    assert SamplerConfig.official(jl, jn).evaluations(T) == evals


def test_fast_mode_schedule():
    fast = SamplerConfig.fast()
    times = fast.time_list(300)
    assert count_evaluations(times) == fast.evaluations(300) <= 150
    assert strided_timesteps(300, 50) == [round(i * 299 / 49) for i in range(50)]  # power 1: evenly spread
    taus = strided_timesteps(300, fast.strided_steps, fast.spacing_power)
    assert taus[0] == 0 and taus[-1] == 299 and taus == sorted(set(taus))
    gaps = np.diff(taus)
    assert gaps[0] <= 1 and gaps[-1] > 10 * gaps[0]  # dense at low noise, sparse at high noise
    assert times[0] == 299 and times[-1] == -1 and set(times) <= set(taus) | {-1}
    ups = [(a, b) for a, b in zip(times[:-1], times[1:]) if b > a]
    assert len(ups) == count_evaluations(times) - len(taus)
    assert all(b == taus[taus.index(a) + 1] for a, b in ups)  # each jump goes up one stride ...
    assert max(a for a, _ in ups) < taus[round(fast.jump_below * (len(taus) - 1))]  # ... in the low-noise end
    assert strided_jump_schedule(300, 300, 5, 5) == jump_schedule(300, 5, 5)
    assert jump_schedule(300, 5, 5, jump_below=1.0) == REFERENCE["jump_schedule_300_1_5_5"]
    with pytest.raises(LeFusionError):
        strided_timesteps(10, 11)
    for bad in ({"precision": "fp8"}, {"jump_below": 0.0}, {"eta": 2.0}):
        with pytest.raises(LeFusionError):
            SamplerConfig(**bad).validate()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return ModelConfig.from_yaml("tiny").build().eval()


@pytest.fixture(scope="module")
def case():
    """A small native volume (6 slices, padded to the 8-slice ROI) with infarct (3) and no-reflow (4)."""
    rng = np.random.default_rng(0)
    label = np.zeros((6, 30, 34), dtype=np.uint8)
    label[1:5, 8:22, 10:26] = 2
    label[2:4, 9:15, 12:20] = 3
    label[3, 10:12, 14:17] = 4
    image = (rng.normal(200, 40, size=label.shape) + 300 * (label >= 3)).clip(0, None).astype(np.int16)
    spec = locate_roi(image, label, host_labels=(2, 3, 4), size=(8, 16, 16))
    return image, label, spec


UNIFORM = torch.full((32,), 1 / 16)


def _sample(net, spec, image, label, config=SHORT_CONFIG, schedule=SHORT, seed=0, batch=2, cond=UNIFORM,
            histogram_matching=False):
    roi = torch.from_numpy(crop_image(image, spec))[None].repeat(batch, 1, 1, 1)
    roi_label = torch.from_numpy(crop(label, spec).astype(np.int64))[None].repeat(batch, 1, 1, 1)
    result = RePaintSampler(net, schedule, config).sample(roi, roi_label, [3, 4], cond,
                                                          torch.Generator().manual_seed(seed), histogram_matching)
    return roi, roi_label, result


def test_background_bit_identical_after_sampling_and_paste(net, case):
    image, label, spec = case
    assert spec.padding_mask().any()
    calls = []
    hook = net.register_forward_pre_hook(lambda m, args: calls.append((args[0].clone(), args[1].clone())))
    try:
        roi, roi_label, result = _sample(net, spec, image, label)
    finally:
        hook.remove()
    assert result.evaluations == len(calls) == 18
    assert [int(t[0]) for _, t in calls][:2] == [9, 8] and int(calls[-1][1][0]) == 0
    lesion = roi_label >= 3
    assert torch.equal(result.image[~lesion], roi[~lesion])
    assert not torch.equal(result.image[lesion], roi[lesion])
    assert result.image.abs().max() <= 1
    for k, cls in enumerate((3, 4)):  # channel k on class k
        sel = roi_label == cls
        assert torch.equal(result.image[sel], result.channels[:, k][sel])
    x_last = calls[-1][0]  # at t=0 the known region is q(x_0 | real image): standard noise after rescaling
    known = (~lesion)[:, None].expand_as(x_last)
    ab0 = SHORT.alpha_bar(0)
    z = ((x_last - ab0 ** 0.5 * roi[:, None]) / (1 - ab0) ** 0.5)[known]
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1
    pasted = paste_image(image, result.image[0].numpy(), lesion[0].numpy(), spec)
    native_lesion = (label == 3) | (label == 4)
    assert pasted.dtype == image.dtype
    np.testing.assert_array_equal(pasted[~native_lesion], image[~native_lesion])
    assert (pasted[native_lesion] != image[native_lesion]).any()


def test_seeded_sampling_is_deterministic(net, case):
    image, label, spec = case
    _, _, a = _sample(net, spec, image, label, seed=3, batch=1)
    _, _, b = _sample(net, spec, image, label, seed=3, batch=1)
    _, _, c = _sample(net, spec, image, label, seed=4, batch=1)
    assert torch.equal(a.image, b.image) and torch.equal(a.channels, b.channels)
    assert not torch.equal(a.image, c.image)


def test_strided_walk_of_every_step_matches_official(net, case):
    """DDIM with eta=1 over all timesteps is the DDPM posterior step: same path, same random draws."""
    image, label, spec = case
    _, _, official = _sample(net, spec, image, label, seed=1, batch=1)
    strided = SamplerConfig(jump_length=2, jump_n_sample=2, strided_steps=10, eta=1.0)
    _, _, ddim = _sample(net, spec, image, label, config=strided, seed=1, batch=1)
    assert ddim.evaluations == official.evaluations
    torch.testing.assert_close(ddim.channels, official.channels, atol=1e-4, rtol=0)


def test_histogram_matching_gives_each_class_its_condition(net, case):
    image, label, spec = case
    cond = torch.zeros(32)
    cond[[12, 13]] = torch.tensor([0.25, 0.75])  # infarct: bright; no-reflow: empty block (keeps the network's values)
    roi, roi_label, result = _sample(net, spec, image, label, cond=cond * 16.0, batch=1,  # the scale does not matter
                                     histogram_matching=True)
    infarct, no_reflow = roi_label == 3, roi_label == 4
    np.testing.assert_allclose(class_histogram(result.matched[infarct].numpy()), cond[:16].numpy(),
                               atol=1 / int(infarct.sum()))
    assert torch.equal(result.matched[no_reflow], result.image[no_reflow])
    assert torch.equal(result.matched[roi_label < 3], roi[roi_label < 3])
    ranks = torch.argsort(result.image[infarct], stable=True)  # the network's spatial pattern is kept: same voxel order
    assert (torch.diff(result.matched[infarct][ranks]) >= 0).all()
    assert _sample(net, spec, image, label, batch=1)[2].matched is None
    with pytest.raises(LeFusionError, match="histogram matching"):
        RePaintSampler(net, SHORT, SHORT_CONFIG).sample(roi, roi_label, [3, 4], histogram_matching=True)


@pytest.mark.slow
def test_fast_mode_end_to_end_at_300_steps(net, case):
    image, label, spec = case
    roi, roi_label, result = _sample(net, spec, image, label, config=SamplerConfig.fast(precision="bf16"),
                                     schedule=CosineSchedule(300), batch=1)
    assert result.evaluations == SamplerConfig.fast().evaluations(300) <= 150
    lesion = roi_label >= 3
    assert torch.equal(result.image[~lesion], roi[~lesion])
    assert torch.isfinite(result.image).all()


def test_guidance_extrapolates_from_the_null_condition(net, case):
    """w = 1 is the conditional network alone (one pass per evaluation); w > 1 runs the network with the condition
    and with its learned null condition at the same inputs and moves eps beyond the conditional one."""
    image, label, spec = case
    calls = []
    hook = net.register_forward_hook(lambda m, args, out: calls.append((args[2], out.clone())))
    try:
        plain = _sample(net, spec, image, label, config=SamplerConfig.official(2, 2, guidance=1.0))[2]
        assert len(calls) == plain.evaluations == 18 and all(c is not None for c, _ in calls)
        calls.clear()
        guided = _sample(net, spec, image, label, config=SamplerConfig.official(2, 2, guidance=3.0))[2]
    finally:
        hook.remove()
    assert len(calls) == 2 * guided.evaluations
    conditional, null = calls[0][1], calls[1][1]
    assert calls[0][0] is not None and calls[1][0] is None
    assert not torch.allclose(conditional, null)
    assert guided.evaluations == plain.evaluations and not torch.equal(guided.image, plain.image)
    with pytest.raises(LeFusionError):
        SamplerConfig(guidance=-1.0).validate()


def test_histogram_levels_are_the_block_means():
    cond = torch.zeros(2, 32)
    cond[0, 15], cond[0, 16 + 0] = 1.0, 16.0          # class 1: top bin; class 2: bottom bin, any scale
    cond[1, 4:6] = 0.5                                   # class 1: two bins, class 2: empty
    torch.testing.assert_close(histogram_levels(cond, 2), torch.tensor([[0.9375, -0.9375], [-0.375, 0.0]]))


def test_a_lesion_aware_sampler_gives_the_network_the_masks_and_levels(case):
    """An exact denoiser that predicts x0 = the level maps of its input: lesion class k ends on its histogram's mean,
    so the sampler hands each class its own mask and level, in the network's channel order."""
    image, label, spec = case

    def level_denoiser(x_in, t, cond):
        x, masks, levels = x_in[:, :2], x_in[:, 2:4], x_in[:, 4:]
        assert set(masks.unique().tolist()) <= {0.0, 1.0} and torch.equal(levels, levels * masks)
        ab = SHORT.buffers["alphas_cumprod"][t][:, None, None, None, None]
        return (x - ab.sqrt() * levels) / (1 - ab).sqrt()

    cond = torch.zeros(32)
    cond[12], cond[16 + 3] = 1.0, 1.0                    # infarct level 0.5625, no-reflow -0.5625
    roi = torch.from_numpy(crop_image(image, spec))[None]
    roi_label = torch.from_numpy(crop(label, spec).astype(np.int64))[None]
    result = RePaintSampler(level_denoiser, SHORT, SHORT_CONFIG, lesion_aware=True).sample(
        roi, roi_label, [3, 4], cond * 16, torch.Generator().manual_seed(0))
    for value, level in ((3, 0.5625), (4, -0.5625)):
        torch.testing.assert_close(result.image[roi_label == value], torch.full(((roi_label == value).sum(),), level))
    assert torch.equal(result.image[roi_label < 3], roi[roi_label < 3])


def test_a_level_offset_sampler_centres_each_class_on_its_conditions_level_and_keeps_the_texture(case):
    """An exact denoiser whose lesions drift to 0.3 plus a texture: each class ends on its histogram's mean level
    exactly, with the network's texture around it."""
    image, label, spec = case
    roi = torch.from_numpy(crop_image(image, spec))[None]
    roi_label = torch.from_numpy(crop(label, spec).astype(np.int64))[None]
    texture = 0.3 + 0.1 * torch.randn((1, 2, *roi.shape[1:]), generator=torch.Generator().manual_seed(1))

    def drifting_denoiser(x, t, cond):
        ab = SHORT.buffers["alphas_cumprod"][t][:, None, None, None, None]
        return (x - ab.sqrt() * texture) / (1 - ab).sqrt()

    cond = torch.zeros(32)
    cond[10], cond[16 + 6] = 1.0, 1.0                    # infarct level 0.3125, no-reflow -0.1875
    result = RePaintSampler(drifting_denoiser, SHORT, SHORT_CONFIG).sample(
        roi, roi_label, [3, 4], cond, torch.Generator().manual_seed(0), level_offset=True)
    for channel, (value, level) in enumerate(((3, 0.3125), (4, -0.1875))):
        lesion = roi_label == value
        drawn, made = result.image[lesion].float(), texture[:, channel][lesion]
        assert abs(float(drawn.mean()) - level) < 1e-5
        torch.testing.assert_close(drawn - level, made - made.mean(), atol=1e-5, rtol=0)
    assert torch.equal(result.image[roi_label < 3], roi[roi_label < 3])
