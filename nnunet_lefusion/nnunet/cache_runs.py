"""The runs of a cache's manifest, opened under the cache lock: join an unfinished run or append one, start an online
run; and the one way a synthetic case enters a cache."""
from __future__ import annotations

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.nnunet.cache import Manifest
from nnunet_lefusion.nnunet.cache_lock import token
from nnunet_lefusion.nnunet.cache_store import CacheStore
from nnunet_lefusion.nnunet.context import DatasetContext
from nnunet_lefusion.nnunet.preprocess import preprocess_case
from nnunet_lefusion.nnunet.slots import run_slots
from nnunet_lefusion.synthesis.base import RawCase, lesion_voxel_counts
from nnunet_lefusion.synthesis.plan import SynthesisPlan


def join_run(manifest: Manifest, store: CacheStore, request: dict, plan: SynthesisPlan, part_id: int,
             generators: list[dict]) -> dict:
    """The run this process works on: an unfinished run of the same request whose part has no live writer (a
    parallel part, or a killed run started again), else a new run appended to the cache."""
    for run in manifest.runs:
        done = sum(1 for c in manifest.cases.values() if c["run"] == run["id"])
        if run["request"] == request and done < run["num_cases"] and not store.alive(run["parts"].get(str(part_id))):
            run["parts"][str(part_id)] = token()
            return run
    run = {"id": len(manifest.runs), "request": request, "first": manifest.next_index,
           "num_cases": request["num_cases"], "position": dict(manifest.position),
           "totals": manifest.lesion_voxel_totals(), "parts": {str(part_id): token()}, "generators": generators}
    manifest.runs.append(run)
    manifest.next_index += run["num_cases"]
    manifest.position = run_slots(run, plan)[1]
    return run

def existing_manifest(ctx: DatasetContext, store: CacheStore) -> Manifest:
    """The manifest of the cache to add to, refused unless it matches these plans, fold and raw labels."""
    manifest = store.load()
    try:
        manifest.check_matches(ctx, ctx.split[0], store.folder)
    except LeFusionError as exc:
        raise LeFusionError(f"{exc} (use --overwrite to replace it)") from None
    return manifest

def open_manifest(ctx: DatasetContext, store: CacheStore, labels: LesionLabels, cases: list[RawCase]) -> Manifest:
    """Under the cache lock: the checked manifest of the cache, or a new one (not saved yet); removes the leftovers
    of gone writers."""
    store.remove_dead_leftovers()
    if store.exists():
        return existing_manifest(ctx, store)
    manifest = Manifest.for_context(ctx)
    manifest.lesion_labels = labels.to_dict()
    manifest.real_lesion_voxels = real_lesion_voxels(cases, labels)
    return manifest

def start_run(ctx: DatasetContext, store: CacheStore, overwrite: bool, request: dict, plan: SynthesisPlan,
              part_id: int, generators: list[dict], labels: LesionLabels,
              cases: list[RawCase]) -> tuple[dict, set[int]]:
    """Under the cache lock: (re)start the cache if needed, join or append a run; (run entry, slots done)."""
    with store.locked():
        if overwrite:
            store.clear()
        manifest = open_manifest(ctx, store, labels, cases)
        run = join_run(manifest, store, request, plan, part_id, generators)
        store.save(manifest)
    return run, {c["slot"] for c in manifest.cases.values() if c["run"] == run["id"]}

def start_online_run(ctx: DatasetContext, store: CacheStore, labels: LesionLabels, cases: list[RawCase],
                     request: dict, generators: list[dict], part: int) -> tuple[Manifest, dict]:
    """Under the cache lock: open (or create) the cache for online synthesis and add this process's run entry (it
    records the generators, so later checks see them), whose pool adopts the online cases of runs whose writers
    are gone. The caller is a writer of ``store`` already. If no other writer is alive, case files the manifest
    does not list (a killed online run's) are deleted."""
    store.prepare()
    with store.locked():
        manifest = open_manifest(ctx, store, labels, cases)
        if not store.other_writers():
            store.remove_case_files(store.unlisted_cases(manifest))
        run = {"id": len(manifest.runs), "request": request, "first": manifest.next_index, "num_cases": 0,
               "position": {}, "totals": {}, "parts": {str(part): token()}, "generators": generators,
               "online": True}
        manifest.runs.append(run)
        store.adopt_orphaned_pools(manifest, run["id"])
        store.save(manifest)
    return manifest, run

def store_case(ctx: DatasetContext, store: CacheStore, syn_id: str, case: RawCase, provenance: dict,
               pool_max: int | None = None) -> list[str]:
    """The one way a synthetic case enters a cache: preprocess it with nnU-Net and add it to ``store`` (see
    :meth:`CacheStore.add`; ``pool_max``: online mode's pool of the case's run); the retired identifiers."""
    data, seg, properties = preprocess_case(ctx, case)
    properties["lefusion"] = provenance
    return store.add(syn_id, data, seg, properties, ctx.configuration_manager.patch_size, provenance, pool_max)

def real_lesion_voxels(cases: list[RawCase], labels: LesionLabels) -> dict[str, int]:
    """Lesion voxels per label over real cases (raw grid)."""
    totals = {str(lab): 0 for lab in labels.lesions}
    for case in cases:
        for label, n in lesion_voxel_counts(case.seg, labels).items():
            totals[label] += n
    return totals
