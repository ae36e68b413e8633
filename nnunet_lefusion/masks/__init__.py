"""Lesion-mask generators (rule-based now, learned later), their placement on cases, and mask measurements."""
from nnunet_lefusion.masks.geometry import (MyocardialCoordinates, host_mask, lesion_region, lv_centre,
                                            myocardial_coordinates, slice_centres)
from nnunet_lefusion.masks.metrics import (aligned_lesion_voxels, inner_lesion_exposure, ks_statistic,
                                           lesion_slice_count, lesion_volume_fraction, nearest_iou, transmurality,
                                           voxel_iou)
from nnunet_lefusion.masks.placement import MaskGenerator, check_lesion_map, fold_lesions, place_lesions
from nnunet_lefusion.masks.rule_based import TERRITORIES, RuleBasedMaskGenerator, largest_component

__all__ = [
    "MaskGenerator", "MyocardialCoordinates", "RuleBasedMaskGenerator", "TERRITORIES", "aligned_lesion_voxels",
    "check_lesion_map", "fold_lesions", "host_mask", "inner_lesion_exposure", "ks_statistic", "largest_component",
    "lesion_region", "lesion_slice_count", "lesion_volume_fraction", "lv_centre", "myocardial_coordinates",
    "nearest_iou", "place_lesions", "slice_centres", "transmurality", "voxel_iou",
]
