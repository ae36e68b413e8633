"""Which labels are lesions and which organ hosts them, read from an nnU-Net ``dataset.json``."""
from __future__ import annotations

import re
from dataclasses import dataclass

from nnunet_lefusion.errors import LeFusionError

# Label names that mark lesions / host organs in common datasets (Emidec, LiTS, KiTS, LIDC, MSD, ...).
_LESION_NAME = re.compile(r"infarct|no.?reflow|mvo|lesion|tumou?r|nodule|scar|cancer|metasta|edema|oedema", re.I)
_CAVITY_NAME = re.compile(r"cavity|blood.?pool|lumen", re.I)


@dataclass(frozen=True)
class LesionLabels:
    """Label roles: ``lesions`` ordered outer -> inner (Emidec: MI 3 contains MVO 4), ``organ`` hosts them."""

    lesions: tuple[int, ...]
    organ: tuple[int, ...]
    cavity: int | None = None

    @classmethod
    def emidec(cls) -> "LesionLabels":
        """Emidec: 1 LV cavity, 2 myocardium, 3 infarct, 4 no-reflow."""
        return cls(lesions=(3, 4), organ=(2,), cavity=1)

    @property
    def host(self) -> tuple[int, ...]:
        """Labels of the region a lesion may occupy: the organ plus the lesions themselves."""
        return tuple(sorted(set(self.organ) | set(self.lesions)))

    def to_dict(self) -> dict:
        return {"lesions": list(self.lesions), "organ": list(self.organ), "cavity": self.cavity}

    @classmethod
    def from_dict(cls, d: dict) -> "LesionLabels":
        return cls(tuple(d["lesions"]), tuple(d["organ"]), d.get("cavity"))


def _int_labels(dataset_json: dict) -> dict[str, int]:
    labels = {}
    for name, value in dataset_json.get("labels", {}).items():
        if isinstance(value, int) and name != "ignore" and value != 0:
            labels[name] = value
    return labels


def resolve_lesion_labels(dataset_json: dict, lesions: list[int] | None = None,
                          organ: list[int] | None = None, cavity: int | None = None) -> LesionLabels:
    """Lesion/organ labels from explicit values, else guessed from the label names of ``dataset.json``.

    Raises ``LeFusionError`` if the dataset has no lesion label or a given label does not exist.
    """
    labels = _int_labels(dataset_json)
    values = dataset_json.get("labels", {}).values()
    known = {int(v) for value in values for v in (value if isinstance(value, (list, tuple)) else [value])} - {0}
    if any(isinstance(value, (list, tuple)) for value in values) and (lesions is None or organ is None):
        raise LeFusionError("dataset.json defines regions (lists of labels): name the lesion and organ values of "
                            f"the label files with --lesion-labels and --organ-labels (values: {sorted(known)})")
    if lesions is None:
        lesions = [v for n, v in sorted(labels.items(), key=lambda kv: kv[1]) if _LESION_NAME.search(n)]
        if not lesions:
            raise LeFusionError(
                f"dataset.json has no lesion label (labels: {labels}); name them like 'lesion'/'tumor'/'infarct' "
                "or pass the lesion labels explicitly (--lesion-labels)")
    if cavity is None:
        cavity = next((v for n, v in labels.items() if _CAVITY_NAME.search(n) and v not in lesions), None)
    if organ is None:
        organ = [v for v in sorted(known) if v not in lesions and v != cavity]
        if not organ:
            organ = [v for v in sorted(known) if v not in lesions]
    if not organ:
        raise LeFusionError(f"no label is left for the organ that hosts the lesions (labels: {labels}); lesions are "
                            "synthesized inside an organ: name it with --organ-labels")
    for lab in [*lesions, *organ, *([cavity] if cavity is not None else [])]:
        if lab not in known:
            raise LeFusionError(f"label {lab} is not defined in dataset.json (labels: {labels})")
    if set(lesions) & set(organ):
        raise LeFusionError(f"lesion labels {lesions} and organ labels {organ} overlap")
    return LesionLabels(tuple(int(v) for v in lesions), tuple(int(v) for v in organ),
                        None if cavity is None else int(cavity))
