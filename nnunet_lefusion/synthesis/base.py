"""The small interface every synthesizer implements, on cases in their native (raw) grid."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

import numpy as np

from nnunet_lefusion.labels import LesionLabels


@dataclass
class RawCase:
    """A case as nnU-Net's reader returns it: image (C, Z, Y, X) float32, seg (1, Z, Y, X), reader properties."""

    identifier: str
    image: np.ndarray
    seg: np.ndarray
    properties: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel spacing in array axis order (z, y, x)."""
        return tuple(float(s) for s in self.properties["spacing"])

    def with_arrays(self, image: np.ndarray, seg: np.ndarray) -> "RawCase":
        return replace(self, image=image, seg=seg)


@dataclass
class Synthetic:
    """A synthesized case and where it came from (stored in the cache manifest and in its properties)."""

    case: RawCase
    provenance: dict


@dataclass
class Proposal:
    """A planned synthetic case: its label map (1, Z, Y, X), decided before the (possibly costly) rendering.

    ``rendered`` is set by synthesizers whose proposal already is the finished case (copy-paste)."""

    target: RawCase
    seg: np.ndarray
    provenance: dict
    rendered: RawCase | None = None


class Synthesizer(Protocol):
    """Turns a real training case into a synthetic one, in two steps so that a plan can choose among proposals.

    ``kind`` is one of :data:`nnunet_lefusion.synthesis.plan.KINDS`: ``retexture`` keeps the target's real lesion
    masks, ``newmask`` / ``normal`` give the (pathological / normal) target new lesions."""

    name: str
    labels: LesionLabels
    kinds: tuple[str, ...]

    def propose(self, target: RawCase, kind: str, rng: np.random.Generator,
                want_classes: Sequence[int] | None = None) -> Proposal:
        """Plan the lesions of a new case; raise ``SynthesisSkipped`` if the target cannot host one.
        ``want_classes``: lesion labels the new lesions should hold (a target share asks for its rare class)."""
        ...

    def propose_many(self, target: RawCase, kind: str, rng: np.random.Generator, count: int,
                     want_classes: Sequence[int] | None = None) -> list[Proposal]:
        """``count`` proposals on one target (the candidates a target share chooses from), in one batch where the
        method can batch; raise ``SynthesisSkipped`` if the target cannot host any."""
        ...

    def render_many(self, proposals: list[Proposal], rng: np.random.Generator) -> list[Synthetic]:
        """Produce the images for several proposals (in one batch where the method can batch)."""
        ...


class SynthesisSkipped(Exception):
    """This target cannot be used by this synthesizer (e.g. no organ to host a lesion)."""


def lesion_voxel_counts(seg: np.ndarray, labels: LesionLabels) -> dict[str, int]:
    """Number of voxels of each lesion label, keyed by the label as a string (JSON-friendly)."""
    return {str(lab): int(np.count_nonzero(seg == lab)) for lab in labels.lesions}
