"""The imbalance-aware synthesis plan: kind allocation, parsing, and reaching a target lesion-class share."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.masks import RuleBasedMaskGenerator, place_lesions
from nnunet_lefusion.phantom import generate_case
from nnunet_lefusion.synthesis.plan import ShareTracker, SynthesisPlan


def test_allocation_follows_the_mix():
    kinds = SynthesisPlan.parse("retexture=0.5,newmask=0.3,normal=0.2", None).allocate(20)
    assert (kinds.count("retexture"), kinds.count("newmask"), kinds.count("normal")) == (10, 6, 4)
    assert kinds[:3] != ["retexture"] * 3, "kinds are interleaved, not blocked"
    assert SynthesisPlan.parse("normal=1", None).allocate(3) == ["normal"] * 3


@pytest.mark.parametrize("mix, share", [("paste=1", None), ("normal", None), ("normal=-1", None),
                                        (None, "4=1.5"), (None, "x=0.2")])
def test_bad_plans_are_refused(mix, share):
    with pytest.raises(LeFusionError):
        SynthesisPlan.parse(mix, share)


@pytest.mark.parametrize("target", [0.05, 0.25])
def test_choosing_among_proposals_reaches_the_target_share(target):
    labels = LesionLabels.emidec()
    generator = RuleBasedMaskGenerator()
    tracker = ShareTracker(labels, {4: target})
    rng = np.random.default_rng(0)
    for i in range(24):
        case = generate_case(np.random.default_rng(i), pathological=bool(i % 2), fov="heart")
        proposals = [place_lesions(case.label, generator.generate(case.label, rng, spacing=case.spacing), labels)
                     for _ in range(8)]
        chosen = proposals[tracker.pick(proposals)]
        tracker.add(chosen)
    assert abs(tracker.shares()[4] - target) <= 0.1 * target, tracker.shares()
    assert tracker.totals[3] > 0


def test_the_tracker_asks_for_labels_below_their_target_share():
    tracker = ShareTracker(LesionLabels.emidec(), {4: 0.2})
    assert tracker.below_target() == (4,)
    tracker.totals.update({3: 70, 4: 30})
    assert tracker.below_target() is None
    tracker.totals.update({3: 90, 4: 10})
    assert tracker.below_target() == (4,)


def test_a_plan_without_mix_takes_the_kinds_the_method_makes():
    """``--target-share`` alone: copy-paste (newmask, normal) spreads over its targets, LeFusion re-textures."""
    plan = SynthesisPlan.parse(None, "4=0.3")
    assert plan.mix is None and not plan.new_masks
    pools = {"retexture": 6, "newmask": 6, "normal": 2}
    copypaste = plan.with_method_mix(("newmask", "normal"), pools)
    assert copypaste.mix == {"newmask": 6.0, "normal": 2.0} and copypaste.target_share == {4: 0.3}
    assert copypaste.allocate(4).count("normal") == 1
    assert plan.with_method_mix(("retexture", "newmask", "normal"), pools).mix == {"retexture": 1.0}
    assert plan.with_method_mix(("newmask", "normal"), {**pools, "normal": 0}).mix == {"newmask": 6.0}
    given = SynthesisPlan.parse("normal=1", "4=0.3")
    assert given.with_method_mix(("newmask", "normal"), pools) is given
