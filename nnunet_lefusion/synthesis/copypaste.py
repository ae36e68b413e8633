"""Lesion copy-paste baseline (TumorCP / CarveMix style, anatomy-aware).

A real lesion, with its labels and intensities, is carried from a donor training case into the host organ of the
target case: the donor's organ centre is mapped onto the target's in millimetres (slices by their spacing, in-plane
with a rotation about the centre), and intensities are matched by the robust intensity range of the two
hearts/organs. The pasted lesion lands only on healthy organ: voxels that would fall outside the organ or on a lesion
of the target are dropped. An inner lesion stays inside the one around it, as no-reflow inside infarct: a pasted
inner-lesion voxel next to healthy organ in its slice becomes the lesion around it, with that lesion's nearest
intensity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.masks.geometry import IN_PLANE, lesion_region
from nnunet_lefusion.synthesis.base import Proposal, RawCase, Synthetic, SynthesisSkipped, lesion_voxel_counts


@dataclass
class _Donor:
    """What copy-paste keeps of a donor: its lesion region (cropped) and where it sits relative to the organ."""

    identifier: str
    image: np.ndarray  # (C, z, y, x) crop around the lesion
    seg: np.ndarray  # (z, y, x) lesion labels in the crop, 0 elsewhere
    offset: np.ndarray  # crop origin minus organ centre, voxels (z, y, x)
    spacing: np.ndarray  # (z, y, x) mm
    intensity_range: np.ndarray  # (C, 2) robust low/high of the organ region


def _organ_region(seg: np.ndarray, labels: LesionLabels) -> np.ndarray:
    region = np.isin(seg, labels.host)
    if labels.cavity is not None:
        region |= seg == labels.cavity
    return region


def _intensity_range(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    return np.stack([np.percentile(ch[region], (1, 99)) for ch in image]).astype(np.float64)


class CopyPasteSynthesizer:
    """Moves a real lesion of another training case into the target's organ."""

    name = "copypaste"
    kinds = ("newmask", "normal")

    def __init__(self, donors: list[RawCase], labels: LesionLabels, max_rotation_deg: float = 30.0,
                 min_kept_fraction: float = 0.3, attempts: int = 8):
        self.labels = labels
        self.max_rotation = np.deg2rad(max_rotation_deg)
        self.min_kept_fraction = min_kept_fraction
        self.attempts = attempts
        self.donors = [d for d in (self._make_donor(c) for c in donors) if d is not None]
        if not self.donors:
            raise SynthesisSkipped("no training case has lesion voxels to copy")

    def _make_donor(self, case: RawCase) -> _Donor | None:
        seg = case.seg[0]
        lesion = np.isin(seg, self.labels.lesions)
        if not lesion.any():
            return None
        organ = _organ_region(seg, self.labels)
        box = ndimage.find_objects(lesion.astype(np.uint8))[0]
        centre = np.array(ndimage.center_of_mass(organ))
        return _Donor(case.identifier, case.image[(slice(None), *box)].copy(), np.where(lesion[box], seg[box], 0),
                      np.array([s.start for s in box]) - centre, np.array(case.spacing),
                      _intensity_range(case.image, organ))

    def propose(self, target: RawCase, kind: str, rng: np.random.Generator,
                want_classes: Sequence[int] | None = None) -> Proposal:
        """Paste a random donor's lesion (``kind`` only says whether the target is pathological or normal), one
        holding every label of ``want_classes`` where a donor has them."""
        seg = target.seg[0]
        organ = _organ_region(seg, self.labels)
        host = np.isin(seg, self.labels.host)
        if not host.any():
            raise SynthesisSkipped(f"{target.identifier} has no organ (labels {self.labels.host})")
        centre = np.array(ndimage.center_of_mass(organ))
        target_range = _intensity_range(target.image, organ)
        candidates = [d for d in self.donors if d.identifier != target.identifier] or self.donors
        if want_classes:
            candidates = [d for d in candidates if np.isin(want_classes, d.seg).all()] or candidates
        for _ in range(self.attempts):
            donor = candidates[rng.integers(len(candidates))]
            angle = rng.uniform(-self.max_rotation, self.max_rotation)
            pasted = self._paste(donor, target, centre, angle, host, target_range)
            if pasted is not None:
                image, new_seg, kept = pasted
                return Proposal(target, new_seg[None], {
                    "method": self.name, "kind": kind, "donor": donor.identifier,
                    "rotation_deg": round(float(np.rad2deg(angle)), 2), "kept_fraction": round(kept, 3)},
                    rendered=target.with_arrays(image, new_seg[None]))
        raise SynthesisSkipped(f"no donor lesion fits into the organ of {target.identifier}")

    def propose_many(self, target: RawCase, kind: str, rng: np.random.Generator, count: int,
                     want_classes: Sequence[int] | None = None) -> list[Proposal]:
        return [self.propose(target, kind, rng, want_classes) for _ in range(count)]

    def render_many(self, proposals: list[Proposal], rng: np.random.Generator) -> list[Synthetic]:
        """Copy-paste proposals are finished cases already."""
        return [Synthetic(p.rendered, {**p.provenance, "lesion_voxels": lesion_voxel_counts(p.seg, self.labels)})
                for p in proposals]

    def _paste(self, donor: _Donor, target: RawCase, centre: np.ndarray, angle: float, host: np.ndarray,
               target_range: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
        """Map the donor lesion into the target grid; None if too little of it lands on healthy organ."""
        shape = host.shape
        scale = donor.spacing / np.array(target.spacing)  # donor voxels -> target voxels, per axis
        cos, sin = np.cos(angle), np.sin(angle)
        # Target in-plane grid around the organ centre, mapped back into donor crop coordinates.
        ys, xs = np.mgrid[0:shape[1], 0:shape[2]].astype(np.float64)
        dy, dx = ys - centre[1], xs - centre[2]
        src_y = (cos * dy + sin * dx) / scale[1] - donor.offset[1]
        src_x = (-sin * dy + cos * dx) / scale[2] - donor.offset[2]
        new_seg = target.seg[0].copy()
        healthy = np.isin(new_seg, self.labels.organ)
        pasted = np.zeros(shape, dtype=bool)
        image = target.image.copy()
        for z in range(shape[0]):
            dz = int(np.floor((z - centre[0]) / scale[0] - donor.offset[0] + 0.5))  # the donor slice nearest in mm
            if not 0 <= dz < donor.seg.shape[0]:
                continue
            labels = ndimage.map_coordinates(donor.seg[dz], [src_y, src_x], order=0, cval=0).astype(new_seg.dtype)
            pasted[z] = (labels > 0) & healthy[z]
            if not pasted[z].any():
                continue
            new_seg[z][pasted[z]] = labels[pasted[z]]
            for c in range(image.shape[0]):
                values = ndimage.map_coordinates(donor.image[c, dz], [src_y, src_x], order=1, mode="nearest")
                lo, hi = donor.intensity_range[c]
                tlo, thi = target_range[c]
                image[c, z][pasted[z]] = ((values[pasted[z]] - lo) / max(hi - lo, 1e-6) * (thi - tlo) + tlo)
        kept_fraction = pasted.sum() / scale.prod() / max(int(np.count_nonzero(donor.seg)), 1)  # in donor voxels
        if kept_fraction < self.min_kept_fraction:
            return None
        _enclose_inner_lesions(new_seg, image, pasted, host, self.labels, target.spacing)
        return image.astype(target.image.dtype, copy=False), new_seg, float(kept_fraction)


def _enclose_inner_lesions(seg: np.ndarray, image: np.ndarray, pasted: np.ndarray, host: np.ndarray,
                           labels: LesionLabels, spacing: tuple[float, ...]) -> None:
    """In place: each pasted voxel of an inner lesion with an in-plane neighbour in the organ outside the lesion
    around it (healthy organ, for no-reflow in infarct) becomes that lesion, with the intensities of its nearest
    voxel, so that the outer lesion encloses the inner one within the organ, as on real cases."""
    for outer, inner in zip(labels.lesions, labels.lesions[1:]):
        outside = host & ~lesion_region(seg, labels, outer)
        exposed = pasted & (seg == inner) & ndimage.binary_dilation(outside, structure=IN_PLANE)
        if not exposed.any():
            continue
        sources = seg == outer
        seg[exposed] = outer
        if sources.any():
            nearest = ndimage.distance_transform_edt(~sources, sampling=spacing, return_distances=False,
                                                     return_indices=True)
            image[:, exposed] = image[(slice(None), *nearest[:, exposed])]
