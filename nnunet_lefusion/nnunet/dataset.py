"""The data-loading hook: a training dataset whose ``load_case`` swaps in cached synthetic variants.

It runs inside nnU-Net's data-augmentation workers, before cropping, foreground oversampling and augmentation, so
a synthetic case takes exactly the path a real one takes. The counters are shared-memory values created in the main
process; forked (or spawned, via the process arguments) workers update them.

With ``watch`` (online mode) every ``load_case`` looks at the manifest's ``stat`` (cheap) and re-reads it when it
changed (or every ``RELOAD_S`` seconds), so each worker picks up cases that the trainer's main process added during
training. A case retired meanwhile (its files deleted) is served as the real case instead.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_pickle
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset, nnUNetDatasetBlosc2

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.nnunet.cache_store import CacheStore
from nnunet_lefusion.synthesis.base import lesion_voxel_counts

RELOAD_S = 30.0  # re-read the manifest at least this often even if its stat looks unchanged
ID_SLOTS, ID_WIDTH = 4096, 128  # ring of the synthetic identifiers loaded lately (bytes per identifier)


@contextmanager
def _reading(lock, timeout: float = 5.0):
    """Hold ``lock`` for a read in the main process, but go on without it if a killed worker left it held."""
    held = lock.acquire(timeout=timeout)
    try:
        yield
    finally:
        if held:
            lock.release()


class LoadCounters:
    """Process-shared counts of the training-case loads: how many, how many synthetic, lesion voxels per lesion
    label of the loaded segmentations (real and synthetic), and a ring of the synthetic identifiers loaded (read
    by the main process with :meth:`new_ids`; entries overwritten before it read them are counted as lost)."""

    def __init__(self, lesion_labels: tuple[int, ...] = ()) -> None:
        self.labels = tuple(str(lab) for lab in lesion_labels)
        self.loads = mp.Value("q", 0)
        self.synthetic = mp.Value("q", 0)
        self.voxels = mp.Array("q", 2 * len(self.labels))  # real per label, then synthetic per label
        self.ids = mp.Array("c", ID_SLOTS * ID_WIDTH, lock=False)
        self.ids_written = mp.Value("q", 0)
        self._ids_read = 0

    def count(self, synthetic: bool, voxels: dict[str, int] | None = None, identifier: str | None = None) -> None:
        with self.loads.get_lock():
            self.loads.value += 1
        if synthetic:
            with self.synthetic.get_lock():
                self.synthetic.value += 1
        if voxels and self.labels:
            offset = len(self.labels) if synthetic else 0
            with self.voxels.get_lock():
                for k, label in enumerate(self.labels):
                    self.voxels[offset + k] += int(voxels.get(label, 0))
        if synthetic and identifier is not None:
            raw = identifier.encode()[:ID_WIDTH].ljust(ID_WIDTH, b"\0")
            with self.ids_written.get_lock():
                slot = self.ids_written.value % ID_SLOTS
                self.ids[slot * ID_WIDTH:(slot + 1) * ID_WIDTH] = raw
                self.ids_written.value += 1

    def snapshot(self) -> tuple[int, int]:
        """(loads, synthetic loads) so far."""
        return int(self.loads.value), int(self.synthetic.value)

    def voxel_snapshot(self) -> dict[str, dict[str, int]]:
        """Lesion voxels loaded so far: ``{"real": {label: n}, "synthetic": {label: n}}``."""
        with _reading(self.voxels.get_lock()):
            values = list(self.voxels[:])
        n = len(self.labels)
        return {"real": dict(zip(self.labels, values[:n])), "synthetic": dict(zip(self.labels, values[n:]))}

    def new_ids(self) -> tuple[list[str], int]:
        """The synthetic identifiers loaded since the last call (main process only), and how many were lost."""
        with _reading(self.ids_written.get_lock()):
            written = self.ids_written.value
            first = max(self._ids_read, written - ID_SLOTS)
            ids = [bytes(self.ids[(i % ID_SLOTS) * ID_WIDTH:(i % ID_SLOTS + 1) * ID_WIDTH]).rstrip(b"\0").decode(
                errors="replace") for i in range(first, written)]
        lost, self._ids_read = first - self._ids_read, written
        return ids, lost


class SyntheticMixDataset(nnUNetBaseDataset):
    """Training cases of ``real``; with probability ``rate`` a load returns a synthetic case instead, drawn uniformly
    from the variants of all training cases (so ``rate`` is the share of synthetic loads however few cases have
    variants; with none every load is real). ``watch``: follow the manifest of ``cache_folder`` (online mode).
    ``labels``: count lesion voxels of the loaded segmentations. ``rare_focus``: the probability that a real load
    is redirected to a training case, drawn uniformly, that holds the rarest lesion label (``labels.lesions[-1]``):
    class rebalancing with real cases only, the baseline a practitioner tries first."""

    save_case = staticmethod(nnUNetDatasetBlosc2.save_case)
    get_identifiers = staticmethod(nnUNetDatasetBlosc2.get_identifiers)

    def __init__(self, real: nnUNetBaseDataset, cache_folder: Path | None, variants: dict[str, list[str]],
                 rate: float, counters: LoadCounters, labels: LesionLabels | None = None, watch: bool = False,
                 rare_focus: float = 0.0):
        super().__init__(real.source_folder, list(real.identifiers), real.folder_with_segs_from_previous_stage)
        self.real = real
        self.rate = rate
        self.store = CacheStore(cache_folder) if cache_folder is not None else None
        self.watch = watch and self.store is not None
        self.variants = variants
        self.synthetic = (nnUNetDatasetBlosc2(str(cache_folder), sorted(self._sources))
                          if cache_folder is not None and (self.variants or self.watch) else None)
        self.counters = counters
        self.labels = labels
        self._manifest_key: tuple | None = None
        self._manifest_read = 0.0
        self._voxels: dict[str, dict[str, int]] = {}  # identifier -> lesion voxels (per process, cases never change)
        self.rare_focus = rare_focus
        self.rare_cases = rare_cases(real, labels.lesions[-1]) if rare_focus > 0 and labels is not None else []
        if self.watch:
            self._refresh()

    @property
    def variants(self) -> dict[str, list[str]]:
        """source case -> its synthetic variants, for the training cases only."""
        return self._variants

    @variants.setter
    def variants(self, variants: dict[str, list[str]]) -> None:
        training = set(self.identifiers)
        self._variants = {k: list(v) for k, v in variants.items() if k in training and v}
        self._sources = {syn_id: source for source, ids in self._variants.items() for syn_id in ids}
        self._pool = sorted(self._sources)

    def _refresh(self) -> None:
        """Re-read the manifest if it changed (inode, mtime or size) or was last read ``RELOAD_S`` ago."""
        try:
            st = os.stat(self.store.manifest_path)
        except FileNotFoundError:
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        now = time.monotonic()
        if key == self._manifest_key and now - self._manifest_read < RELOAD_S:
            return
        try:
            variants = self.store.variants()
        except (LeFusionError, OSError):
            return  # keep the variants known so far; try again on the next load
        self.variants = variants
        self._manifest_key, self._manifest_read = key, now
        known = set(self.identifiers).union(self._pool)
        self._voxels = {k: v for k, v in self._voxels.items() if k in known}

    def _lesion_voxels(self, identifier: str, seg) -> dict[str, int] | None:
        if self.labels is None:
            return None
        if identifier not in self._voxels:
            self._voxels[identifier] = lesion_voxel_counts(np.asarray(seg[:]), self.labels)
        return self._voxels[identifier]

    def load_case(self, identifier: str):
        if self.watch:
            self._refresh()
        if self._pool and self.rate > 0 and np.random.uniform() < self.rate:
            syn_id = self._pool[np.random.randint(len(self._pool))]
            source = self._sources[syn_id]
            try:
                data, seg, _, properties = self.synthetic.load_case(syn_id)
            except Exception:
                if self.store.has_case_files(syn_id):
                    raise
                syn_id = None  # retired since the manifest was read: serve the real case
            if syn_id is not None:
                self.counters.count(True, self._lesion_voxels(syn_id, seg), syn_id)
                seg_prev = self.real.load_case(source)[2] if self.folder_with_segs_from_previous_stage else None
                return data, seg, seg_prev, properties
        if self.rare_cases and np.random.uniform() < self.rare_focus:
            identifier = self.rare_cases[np.random.randint(len(self.rare_cases))]
        case = self.real.load_case(identifier)
        self.counters.count(False, self._lesion_voxels(identifier, case[1]))
        return case


def rare_cases(dataset: nnUNetBaseDataset, label: int) -> list[str]:
    """The cases of ``dataset`` whose segmentation holds ``label``, from the foreground locations nnU-Net's
    preprocessing stored in each case's properties (no image is read)."""
    held = []
    for identifier in dataset.identifiers:
        locations = load_pickle(os.path.join(dataset.source_folder, f"{identifier}.pkl"))["class_locations"]
        if len(locations.get(label, ())) > 0:
            held.append(identifier)
    return held
