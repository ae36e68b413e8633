"""Placing lesion maps on normal and pathological label maps, and the checks that guard it."""
import numpy as np
import pytest

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.masks import MaskGenerator, RuleBasedMaskGenerator, fold_lesions, place_lesions
from tests.mask_fixtures import CAVITY, EMIDEC, MI, MVO, MYOCARDIUM, ring_case

RING = ring_case()
PATHOLOGICAL = RING.with_lesion(MVO, (215, 245), (0.0, 0.4), range(1, 3), base=RING.with_lesion(MI, (200, 260)))


def _lesion_map(label: int, degrees, depth=(0.0, 1.0), slices=None, base=None) -> np.ndarray:
    drawn = RING.with_lesion(label, degrees, depth, slices, base)
    return np.where(drawn >= MI, drawn, 0).astype(np.uint8)


def test_fold_lesions_gives_lesions_back_to_the_organ():
    folded = fold_lesions(PATHOLOGICAL, EMIDEC)
    np.testing.assert_array_equal(folded, RING.label_map)
    assert (PATHOLOGICAL == MVO).any()


def test_lesions_placed_on_a_normal_case():
    lesion_map = _lesion_map(MI, (60, 150), slices=range(0, 3))
    placed = place_lesions(RING.label_map, lesion_map, EMIDEC)
    np.testing.assert_array_equal(placed[lesion_map > 0], MI)
    np.testing.assert_array_equal(placed[lesion_map == 0], RING.label_map[lesion_map == 0])


def test_new_lesions_replace_the_old_ones_on_a_pathological_case():
    lesion_map = _lesion_map(MI, (60, 150))
    placed = place_lesions(PATHOLOGICAL, lesion_map, EMIDEC)
    np.testing.assert_array_equal(placed, RING.with_lesion(MI, (60, 150)))
    assert not (placed == MVO).any()


def test_generated_lesions_place_on_both_kinds_of_case():
    generator = RuleBasedMaskGenerator()
    assert isinstance(generator, MaskGenerator)
    for seed, case in enumerate((RING.label_map, PATHOLOGICAL) * 3):
        lesion_map = generator.generate(case, np.random.default_rng(seed), want_classes=(MVO,))
        placed = place_lesions(case, lesion_map, EMIDEC)
        np.testing.assert_array_equal(placed >= MI, lesion_map > 0)
        np.testing.assert_array_equal(placed == CAVITY, case == CAVITY)


def test_lesion_outside_the_organ_is_refused():
    lesion_map = np.zeros_like(RING.label_map)
    lesion_map[RING.label_map == CAVITY] = MI
    with pytest.raises(LeFusionError, match="outside the host organ"):
        place_lesions(RING.label_map, lesion_map, EMIDEC)


def test_inner_lesion_away_from_the_outer_lesion_is_refused():
    lesion_map = _lesion_map(MI, (60, 150), slices=range(0, 2))
    lesion_map = np.maximum(lesion_map, _lesion_map(MVO, (250, 280), (0.0, 0.3), range(0, 2)))
    with pytest.raises(LeFusionError, match="do not touch"):
        place_lesions(RING.label_map, lesion_map, EMIDEC)


def test_inner_lesion_without_outer_lesion_is_refused():
    with pytest.raises(LeFusionError, match="do not touch"):
        place_lesions(RING.label_map, _lesion_map(MVO, (60, 90), (0.0, 0.3)), EMIDEC)


def test_wrong_shape_or_non_lesion_labels_are_refused():
    with pytest.raises(LeFusionError, match="shape"):
        place_lesions(RING.label_map, np.zeros((2, 4, 4), dtype=np.uint8), EMIDEC)
    with pytest.raises(LeFusionError, match="not lesion labels"):
        place_lesions(RING.label_map, np.where(RING.label_map == MYOCARDIUM, MYOCARDIUM, 0), EMIDEC)
