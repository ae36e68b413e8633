"""Rule-based lesion masks and the myocardial coordinates they are built on, on hand-built ring label maps."""
import numpy as np
import pytest
from scipy import ndimage

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.masks import (RuleBasedMaskGenerator, host_mask, lesion_slice_count, lesion_volume_fraction,
                                   myocardial_coordinates, place_lesions, transmurality)
from nnunet_lefusion.masks.rule_based import CONNECTIVITY
from tests.mask_fixtures import CAVITY, EMIDEC, MI, MVO, MYOCARDIUM, phantom_cases, ring_case

RING = ring_case()


def _generate(seed: int, generator: RuleBasedMaskGenerator | None = None, label_map: np.ndarray = RING.label_map,
              want_classes=(MVO,)) -> np.ndarray:
    return (generator or RuleBasedMaskGenerator()).generate(label_map, np.random.default_rng(seed), want_classes)


def _mean(statistic, generator: RuleBasedMaskGenerator, seeds=range(12)) -> float:
    return float(np.mean([statistic(place_lesions(RING.label_map, _generate(s, generator), EMIDEC), EMIDEC)
                          for s in seeds]))


def test_coordinates_follow_the_ring_geometry():
    coords = myocardial_coordinates(RING.label_map, EMIDEC)
    radius, angle = RING.polar()
    np.testing.assert_allclose(coords.centres, np.tile(RING.centre, (RING.label_map.shape[0], 1)))
    for z in coords.slices[:-1]:
        wall = coords.host[z]
        np.testing.assert_allclose(np.degrees(coords.angle[z][wall]), angle[wall], atol=1e-9)
        depth = (coords.inner[z][wall] + coords.outer[z][wall]) / 2
        fraction = (radius[wall] - RING.inner[z]) / (RING.outer[z] - RING.inner[z])
        assert np.corrcoef(depth, fraction)[0, 1] > 0.95
        touches_cavity = ndimage.binary_dilation(RING.label_map[z] == CAVITY)[wall]
        assert np.all(coords.inner[z][wall][touches_cavity] == 0)
        assert np.all(coords.outer[z][wall] > coords.inner[z][wall])
    assert np.isnan(coords.angle[~coords.host]).all()


def test_apex_slice_without_cavity_borrows_the_cavity_of_the_next_slice():
    coords = myocardial_coordinates(RING.label_map, EMIDEC)
    radius, _ = RING.polar()
    apex = RING.label_map.shape[0] - 1
    under_cavity = RING.label_map[apex - 1] == CAVITY
    disk = coords.host[apex]
    np.testing.assert_allclose(coords.centres[apex], RING.centre)
    assert np.all(coords.inner[apex][disk & under_cavity] == 0)
    rim = disk & ~under_cavity
    depth = (coords.inner[apex][rim] + coords.outer[apex][rim]) / 2
    assert np.corrcoef(depth, radius[rim])[0, 1] > 0.95


def test_lesions_stay_inside_the_organ_with_mvo_inside_mi_over_many_seeds():
    for seed in range(40):
        lesion_map = _generate(seed, want_classes=None)
        assert set(np.unique(lesion_map)) <= {0, MI, MVO}
        assert lesion_map.any()
        assert not (lesion_map > 0)[~host_mask(RING.label_map, EMIDEC)].any()
        if (lesion_map == MVO).any():
            grown = ndimage.binary_dilation(lesion_map == MVO, structure=np.ones((3, 3, 3)))
            assert (lesion_map[grown & (lesion_map != MVO)] == MI).any()


def test_phantom_cases_get_valid_single_piece_lesions():
    generator = RuleBasedMaskGenerator()
    for index, case in enumerate(phantom_cases()):
        for seed in range(4):
            lesion_map = generator.generate(case.label, np.random.default_rng([index, seed]), (MVO,), case.spacing)
            placed = place_lesions(case.label, lesion_map, EMIDEC)
            np.testing.assert_array_equal(placed >= MI, lesion_map > 0)
            assert np.isin(case.label[lesion_map > 0], EMIDEC.host).all()
            for region in (lesion_map > 0, lesion_map == MVO):
                assert ndimage.label(region, structure=CONNECTIVITY)[1] == 1


def test_each_lesion_is_one_3d_connected_piece():
    for seed in range(20):
        lesion_map = _generate(seed)
        for region in (lesion_map > 0, lesion_map == MVO):
            assert ndimage.label(region, structure=CONNECTIVITY)[1] == 1


def test_lesions_grow_from_the_subendocardium_and_mvo_is_the_deeper_core():
    coords = myocardial_coordinates(RING.label_map, EMIDEC)
    for seed in range(10):
        lesion_map = _generate(seed)
        for z in np.flatnonzero((lesion_map > 0).any(axis=(1, 2))):
            assert coords.inner[z][lesion_map[z] > 0].min() == 0
        assert coords.inner[lesion_map == MVO].mean() < coords.inner[lesion_map == MI].mean()


def test_requested_classes_and_core_probability():
    assert set(np.unique(_generate(1, want_classes=(MVO,)))) == {0, MI, MVO}
    assert set(np.unique(_generate(1, want_classes=(MI,)))) == {0, MI}
    never = RuleBasedMaskGenerator(core_probability=0.0)
    always = RuleBasedMaskGenerator(core_probability=1.0)
    assert all(not (_generate(s, never, want_classes=None) == MVO).any() for s in range(5))
    assert all((_generate(s, always, want_classes=None) == MVO).any() for s in range(5))
    with pytest.raises(LeFusionError):
        _generate(1, want_classes=(MYOCARDIUM,))


def test_same_seed_same_mask_other_seed_other_mask():
    np.testing.assert_array_equal(_generate(7), _generate(7))
    assert not np.array_equal(_generate(7), _generate(8))


def test_size_control_moves_the_volume_fraction_and_roughly_hits_it():
    small = _mean(lesion_volume_fraction, RuleBasedMaskGenerator(size=(0.05, 0.06)))
    large = _mean(lesion_volume_fraction, RuleBasedMaskGenerator(size=(0.2, 0.21), slices=(4, 4)))
    assert small < large
    assert small == pytest.approx(0.055, abs=0.015)
    assert large == pytest.approx(0.205, abs=0.03)


def test_transmurality_control_moves_the_measured_transmurality():
    shallow = _mean(transmurality, RuleBasedMaskGenerator(transmurality=(0.2, 0.3)))
    deep = _mean(transmurality, RuleBasedMaskGenerator(transmurality=(0.95, 1.0)))
    assert shallow + 0.3 < deep


def test_slice_control_sets_the_number_of_slices():
    for count in (1, 3, 5):
        generator = RuleBasedMaskGenerator(slices=(count, count), size=(0.03, 0.05))
        assert _mean(lesion_slice_count, generator, seeds=range(5)) == count


def test_territory_places_the_lesion_at_its_angle():
    radius, angle = RING.polar()
    for territory, (start, stop) in (("LAD", (60, 180)), ("RCA", (180, 300))):
        generator = RuleBasedMaskGenerator(territories=(territory,), rotation_jitter=0.0, size=(0.03, 0.04))
        for seed in range(5):
            lesion = (_generate(seed, generator) > 0).any(axis=0)
            mean_angle = np.degrees(np.angle(np.exp(1j * np.radians(angle[lesion])).mean())) % 360
            assert start - 15 <= mean_angle <= stop + 15


def test_pathological_case_gets_new_lesions_and_loses_its_old_ones():
    old = RING.with_lesion(MI, (200, 280))
    lesion_map = _generate(3, RuleBasedMaskGenerator(territories=("LAD",), rotation_jitter=0.0), label_map=old)
    placed = place_lesions(old, lesion_map, EMIDEC)
    np.testing.assert_array_equal(placed > MYOCARDIUM, lesion_map > 0)
    assert not (placed[old == MI] == MI).all()


def test_works_with_other_labels_and_without_cavity_label():
    labels = LesionLabels(lesions=(7,), organ=(5,), cavity=None)
    label_map = np.where(RING.label_map == MYOCARDIUM, 5, 0).astype(np.uint8)
    lesion_map = RuleBasedMaskGenerator(labels=labels).generate(label_map, np.random.default_rng(0))
    assert set(np.unique(lesion_map)) == {0, 7}
    assert np.all(label_map[lesion_map > 0] == 5)


@pytest.mark.parametrize("kwargs", [dict(size=(0.3, 0.1)), dict(transmurality=(0.0, 0.5)), dict(slices=(0, 2)),
                                    dict(slices=(1.5, 2)), dict(core_size=(0.5, 1.0)), dict(core_probability=1.5),
                                    dict(territories=("LM",)), dict(territories=())])
def test_bad_settings_raise(kwargs):
    with pytest.raises(LeFusionError):
        RuleBasedMaskGenerator(**kwargs)


def test_label_map_without_organ_raises():
    with pytest.raises(LeFusionError):
        _generate(0, label_map=np.zeros((3, 8, 8), dtype=np.uint8))
