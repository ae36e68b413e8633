"""The data-loading hook: a training dataset whose ``load_case`` swaps in cached synthetic variants.

It runs inside nnU-Net's data-augmentation workers, before cropping, foreground oversampling and augmentation, so
a synthetic case takes exactly the path a real one takes. The counters are shared-memory values created in the main
process; forked (or spawned, via the process arguments) workers update them.
"""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset, nnUNetDatasetBlosc2


class LoadCounters:
    """How many training cases were loaded, and how many of them were synthetic (process-shared)."""

    def __init__(self) -> None:
        self.loads = mp.Value("q", 0)
        self.synthetic = mp.Value("q", 0)

    def count(self, synthetic: bool) -> None:
        with self.loads.get_lock():
            self.loads.value += 1
        if synthetic:
            with self.synthetic.get_lock():
                self.synthetic.value += 1

    def snapshot(self) -> tuple[int, int]:
        """(loads, synthetic loads) so far."""
        return int(self.loads.value), int(self.synthetic.value)


class SyntheticMixDataset(nnUNetBaseDataset):
    """Training cases of ``real``; with probability ``rate`` a load returns one of the case's synthetic variants."""

    save_case = staticmethod(nnUNetDatasetBlosc2.save_case)
    get_identifiers = staticmethod(nnUNetDatasetBlosc2.get_identifiers)

    def __init__(self, real: nnUNetBaseDataset, cache_folder: Path | None, variants: dict[str, list[str]],
                 rate: float, counters: LoadCounters):
        super().__init__(real.source_folder, list(real.identifiers), real.folder_with_segs_from_previous_stage)
        self.real = real
        self.rate = rate
        self.variants = {k: v for k, v in variants.items() if k in set(real.identifiers) and v}
        self.synthetic = (nnUNetDatasetBlosc2(str(cache_folder), sorted(i for v in self.variants.values() for i in v))
                          if cache_folder is not None and self.variants else None)
        self.counters = counters

    def load_case(self, identifier: str):
        options = self.variants.get(identifier)
        use_synthetic = bool(options) and self.rate > 0 and np.random.uniform() < self.rate
        self.counters.count(use_synthetic)
        if not use_synthetic:
            return self.real.load_case(identifier)
        data, seg, _, properties = self.synthetic.load_case(options[np.random.randint(len(options))])
        seg_prev = self.real.load_case(identifier)[2] if self.folder_with_segs_from_previous_stage else None
        return data, seg, seg_prev, properties
