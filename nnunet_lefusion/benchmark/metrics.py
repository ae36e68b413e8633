"""Per-case segmentation figures: Dice (nnU-Net's own counting), 95th-percentile Hausdorff distance and lesion-wise
detection, for each lesion label, the lesions together (Emidec's "infarction") and the organ with its lesions."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn
from scipy import ndimage

from nnunet_lefusion.labels import LesionLabels

_CONNECTIVITY = np.ones((3, 3, 3), bool)


@dataclass(frozen=True)
class Structure:
    """A set of labels scored together, e.g. ``lesions`` = infarct with no-reflow."""

    key: str
    labels: tuple[int, ...]


def structures(roles: LesionLabels, names: dict[int, str]) -> list[Structure]:
    """Each lesion label by its name, all lesions together, and the organ including its lesions."""
    found = [Structure(names.get(v, f"label_{v}"), (v,)) for v in roles.lesions]
    if len(roles.lesions) > 1:
        found.append(Structure("lesions", tuple(roles.lesions)))
    return found + [Structure("organ", tuple(sorted({*roles.organ, *roles.lesions})))]


def dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice of two masks by nnU-Net's counting; NaN when both are empty."""
    tp, fp, fn, _ = compute_tp_fp_fn_tn(reference, prediction)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, _CONNECTIVITY, border_value=0)


def hd95(reference: np.ndarray, prediction: np.ndarray, spacing: tuple[float, ...]) -> float:
    """95th percentile of the symmetric surface distances (mm); NaN unless both masks have voxels."""
    if not reference.any() or not prediction.any():
        return math.nan
    ref_surface, pred_surface = _surface(reference), _surface(prediction)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]
    return float(np.percentile(np.concatenate([to_ref, to_pred]), 95))


def detection(reference: np.ndarray, prediction: np.ndarray) -> tuple[int, int, int]:
    """(reference lesions, of them touched by the prediction, predicted lesions touching no reference lesion)."""
    ref_parts, n_ref = ndimage.label(reference, _CONNECTIVITY)
    pred_parts, n_pred = ndimage.label(prediction, _CONNECTIVITY)
    found = len(np.unique(ref_parts[prediction & reference]))
    false = n_pred - len(np.unique(pred_parts[prediction & reference]))
    return n_ref, found, false


def case_figures(reference: np.ndarray, prediction: np.ndarray, spacing: tuple[float, ...],
                 scored: list[Structure], detected: list[Structure]) -> dict[str, float]:
    """Every figure of one test case.

    ``dice_<s>`` and ``hd95_<s>`` are NaN where the reference lacks the structure (they describe pathological
    cases); ``dice_<s>_nnunet`` is nnU-Net's convention, which counts false alarms: no structure but a prediction
    is Dice 0, neither is NaN (left out of means); ``dice_<s>_emidec`` follows the Emidec convention: no structure
    and no prediction is Dice 1.
    ``lesions_<s>``/``found_<s>``/``false_<s>`` count lesions (connected components) for detection.
    """
    row: dict[str, float] = {}
    for structure in scored:
        ref, pred = np.isin(reference, structure.labels), np.isin(prediction, structure.labels)
        value = dice(ref, pred)
        row[f"dice_{structure.key}"] = value if ref.any() else math.nan
        row[f"dice_{structure.key}_nnunet"] = value
        row[f"dice_{structure.key}_emidec"] = 1.0 if math.isnan(value) else value
        row[f"hd95_{structure.key}"] = hd95(ref, pred, spacing)
    for structure in detected:
        ref, pred = np.isin(reference, structure.labels), np.isin(prediction, structure.labels)
        row[f"lesions_{structure.key}"], row[f"found_{structure.key}"], row[f"false_{structure.key}"] = \
            detection(ref, pred)
    return row
