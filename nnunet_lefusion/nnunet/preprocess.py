"""Read raw training cases and run nnU-Net's own preprocessor for a configuration on (synthetic) raw cases."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.nnunet.context import DatasetContext
from nnunet_lefusion.synthesis.base import RawCase



def planning_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for ``nnUNetv2_plan_and_preprocess``: its planner sets torch's threads to ``nnUNet_n_proc_DA``, which
    fails on 0 (no augmentation worker, a setting for training), so planning gets at least 1."""
    workers = env.get("nnUNet_n_proc_DA")
    return {**env, "nnUNet_n_proc_DA": str(max(1, int(workers)))} if workers is not None else dict(env)

def load_raw_case(ctx: DatasetContext, identifier: str) -> RawCase:
    """Read a raw training case with the plans' image reader (the same reader nnU-Net preprocessing used)."""
    files = ctx.raw_cases.get(identifier)
    if files is None:
        raise LeFusionError(f"case {identifier} is not in the raw dataset {ctx.raw_folder}")
    reader = ctx.plans_manager.image_reader_writer_class()
    try:
        image, properties = reader.read_images(files["images"])
        seg, _ = reader.read_seg(files["label"])
    except Exception as exc:  # readers raise anything from RuntimeError to ITK errors on corrupt files
        raise LeFusionError(f"cannot read case {identifier} ({files['label']}): {str(exc).splitlines()[0]}") from None
    return RawCase(identifier, image.astype(np.float32, copy=False), seg, properties)


def mapped_raw_case(ctx: DatasetContext, identifier: str, folder: Path) -> RawCase:
    """:func:`load_raw_case`, its arrays written to ``folder`` and memory-mapped read-only from there: a process that
    keeps every training case (online synthesis) holds them in the page cache, not in its own memory."""
    case = load_raw_case(ctx, identifier)
    arrays = {}
    for name, array in (("image", case.image), ("seg", case.seg)):
        path = Path(folder) / f"{identifier}_{name}.npy"
        np.save(path, array)
        arrays[name] = np.load(path, mmap_mode="r")
    return case.with_arrays(arrays["image"], arrays["seg"])


def preprocess_case(ctx: DatasetContext, case: RawCase) -> tuple[np.ndarray, np.ndarray, dict]:
    """(data, seg, properties) as ``nnUNetv2_plan_and_preprocess`` would store them for this configuration,
    including ``class_locations`` recomputed from the (synthetic) segmentation."""
    preprocessor = ctx.configuration_manager.preprocessor_class(verbose=False)
    data, seg, properties = preprocessor.run_case_npy(
        case.image, case.seg, copy.deepcopy(case.properties), ctx.plans_manager, ctx.configuration_manager,
        ctx.dataset_json)
    return data.astype(np.float32, copy=False), seg.astype(np.int16, copy=False), properties
