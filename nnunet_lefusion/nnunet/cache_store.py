"""One synthetic-case cache folder on disk: its lock, its manifest and its case files.

The offline command, online mode and the dataset hook all go through :class:`CacheStore`:

* **Files.** A case's files are written under temporary names (carrying their writer, ``cache_lock.tmp_name``),
  flushed to disk, renamed into place, and the folder is flushed, all before the manifest lists the case. The
  manifest is replaced atomically (temporary file, flush, rename, flush of the folder). So after a crash or a power
  loss the manifest lists only complete cases; files it does not list are leftovers, deleted later.
* **Changes.** The manifest is changed only under the cache lock (:func:`cache_lock.locked`, a kernel lock), held
  only while it is read, changed and replaced.
* **Pools.** An online run retires only the cases of its own pool (the cases it made, and those it adopted from
  online runs whose writer had gone), so two trainings of one fold never retire each other's cases.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.nnunet.cache import (CASE_FILES, MANIFEST, ONLINE, POOL, Manifest, default_cache_folder,
                                          fsync_path, pool_of)
from nnunet_lefusion.nnunet.cache_lock import (LOCK, LOCK_TIMEOUT_S, TMP_PREFIX, WRITER_PREFIX, Writer, alive,
                                               locked, other_writers, remove_dead_leftovers, tmp_name, token)
from nnunet_lefusion.nnunet.context import DatasetContext


class CacheStore:
    """The cache in ``folder``: lock, manifest, and the files of its cases."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def for_context(cls, ctx: DatasetContext, folder: Path | str | None = None) -> "CacheStore":
        """The cache in ``folder``, else in the default folder of the context's dataset/configuration/fold."""
        return cls(Path(folder) if folder else default_cache_folder(ctx))

    def __repr__(self) -> str:
        return f"CacheStore({str(self.folder)!r})"

    # --- the folder -------------------------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def exists(self) -> bool:
        """Whether the folder holds a manifest (a cache was started here)."""
        return self.manifest_path.is_file()

    def check_folder(self) -> None:
        """Refuse a cache path that is a file, or a folder that holds something other than a cache."""
        control = (LOCK, WRITER_PREFIX, TMP_PREFIX)
        if self.folder.exists() and (not self.folder.is_dir() or not self.manifest_path.exists() and any(
                not p.name.startswith(control) for p in self.folder.iterdir())):
            raise LeFusionError(f"{self.folder} exists and is not a LeFusion cache; choose an empty or new folder")

    def prepare(self) -> None:
        """Create the cache folder (see :meth:`check_folder`)."""
        self.check_folder()
        self.folder.mkdir(parents=True, exist_ok=True)

    # --- lock and writers -------------------------------------------------------------------------------------

    def locked(self, timeout: float = LOCK_TIMEOUT_S):
        """Context manager: hold the cache lock."""
        return locked(self.folder, timeout)

    def writer(self) -> Writer:
        """Context manager: this process is a writer of the cache while inside."""
        return Writer(self.folder)

    def alive(self, writer: str | None) -> bool:
        """Whether writer ``writer`` (a token) still runs; under the lock."""
        return alive(writer, self.folder)

    def other_writers(self) -> list[str]:
        """The live writers other than this process; under the lock."""
        return other_writers(self.folder)

    def remove_dead_leftovers(self) -> None:
        """Delete gone writers' temporary and writer files; under the lock."""
        remove_dead_leftovers(self.folder)

    def clear(self) -> None:
        """``--overwrite``: delete the cache's contents, refused while another writer runs; under the lock."""
        others = self.other_writers()
        if others:
            raise LeFusionError(f"--overwrite refused: {self.folder} is being written by {', '.join(others)}")
        for path in self.folder.iterdir():
            if path.name != LOCK and path.name != f"{WRITER_PREFIX}{token()}":
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    # --- the manifest -----------------------------------------------------------------------------------------

    def load(self) -> Manifest:
        """The manifest as it is now (``LeFusionError`` if there is none or it is corrupt)."""
        return Manifest.load(self.folder)

    def save(self, manifest: Manifest) -> None:
        """Replace the manifest atomically; under the lock."""
        manifest.save(self.folder)

    @contextmanager
    def update(self, new: Callable[[], Manifest] | None = None) -> Iterator[Manifest]:
        """Under the cache lock: the manifest (``new()`` where there is none yet), saved when the block ends
        without an error."""
        with self.locked():
            manifest = new() if new is not None and not self.exists() else self.load()
            yield manifest
            self.save(manifest)

    def variants(self) -> dict[str, list[str]]:
        """source case -> the synthetic cases made from it, as the manifest lists them now."""
        return self.load().variants_by_source()

    def reserve_index(self) -> int:
        """The next case number (an online case's number; offline runs reserve ranges)."""
        with self.update() as manifest:
            index = manifest.next_index
            manifest.next_index += 1
        return index

    # --- cases ------------------------------------------------------------------------------------------------

    def case_files(self, identifier: str) -> list[Path]:
        """The files of a case."""
        return [self.folder / f"{identifier}{suffix}" for suffix in CASE_FILES]

    def has_case_files(self, identifier: str) -> bool:
        return all(p.is_file() for p in self.case_files(identifier))

    def write_case(self, identifier: str, data: np.ndarray, seg: np.ndarray, properties: dict,
                   patch_size: tuple[int, ...]) -> None:
        """Save one preprocessed case like nnU-Net's preprocessor does (Blosc2, chunks for ``patch_size``), flushed
        to disk under its final names; not listed yet."""
        from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

        data = np.ascontiguousarray(data, dtype=np.float32)
        seg = np.ascontiguousarray(seg, dtype=np.int16)
        blocks, chunks = comp_blosc2_params(data.shape, tuple(patch_size), data.itemsize)
        blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(patch_size), seg.itemsize)
        tmp = str(self.folder / tmp_name(identifier))
        nnUNetDatasetBlosc2.save_case(data, seg, properties, tmp, chunks=chunks, blocks=blocks,
                                      chunks_seg=chunks_seg, blocks_seg=blocks_seg)
        for suffix in CASE_FILES:
            fsync_path(Path(tmp + suffix))
        for suffix, final in zip(CASE_FILES, self.case_files(identifier)):
            os.replace(tmp + suffix, final)
        fsync_path(self.folder)

    def add(self, identifier: str, data: np.ndarray, seg: np.ndarray, properties: dict, patch_size: tuple[int, ...],
            provenance: dict, pool_max: int | None = None) -> list[str]:
        """Write a case and list it with ``provenance``. With ``pool_max`` (online mode) the oldest cases of its
        run's pool beyond it are unlisted in the same manifest update and their files deleted after it; returns
        their identifiers."""
        self.write_case(identifier, data, seg, properties, patch_size)
        with self.update() as manifest:
            manifest.cases[identifier] = provenance
            retired = manifest.retire_online(provenance["run"], pool_max) if pool_max is not None else []
        self.remove_case_files(retired)
        return retired

    def remove_case_files(self, identifiers: list[str]) -> None:
        """Delete the files of cases the manifest no longer lists (the .pkl first: the case is then incomplete)."""
        for identifier in identifiers:
            for path in reversed(self.case_files(identifier)):
                path.unlink(missing_ok=True)

    def unlisted_cases(self, manifest: Manifest) -> list[str]:
        """Identifiers of case files that ``manifest`` does not list (left by a killed run between writing a case
        and listing it, or between unlisting retired cases and deleting their files)."""
        found = set()
        for path in self.folder.iterdir():
            name = path.name
            if name.startswith(".") or name == MANIFEST:
                continue
            for suffix in ("_seg.b2nd", ".b2nd", ".pkl"):
                if name.endswith(suffix):
                    found.add(name[:-len(suffix)])
                    break
        return sorted(found - set(manifest.cases))

    def adopt_orphaned_pools(self, manifest: Manifest, run_id: int) -> int:
        """Move the online cases of runs whose writers are all gone into run ``run_id``'s pool (so a resumed
        training retires what it made before); under the lock. Returns how many were adopted."""
        gone = {run["id"] for run in manifest.runs
                if run.get("online") and run["id"] != run_id and not any(map(self.alive, run["parts"].values()))}
        adopted = [case for case in manifest.cases.values() if ONLINE in case and pool_of(case) in gone]
        for case in adopted:
            case[POOL] = run_id
        return len(adopted)
