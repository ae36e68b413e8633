"""Online mode: the trainer synthesizes cases during training into a bounded pool of the synthetic cache.

* **Where.** In nnU-Net's main process of each rank, the one that holds the GPU, between training steps
  (``nnUNetTrainerLeFusion.train_step``). Never in the data-augmentation workers: they are forked after CUDA was
  initialised and cannot use it, and each would hold its own model copy.
* **Budget.** Per epoch a rank makes its share of ``online_cases_per_epoch``, spread over the epoch, at most one
  case per training step, within ``online_time_share`` of the time (:mod:`nnunet_lefusion.nnunet.online_budget`). A
  rank whose share is 0 makes nothing. A case that fails (out of memory, full disk, a sampler error) is logged and
  skipped; training goes on.
* **Memory.** The fold's training cases, which the synthesizer draws from, are memory-mapped from a scratch folder
  (``$TMPDIR``), removed at the end: no rank holds them all in its memory.
* **Writing.** A case is made like ``nnUNetv2_lefusion_synthesize`` makes one (``prepare_synthesis``,
  ``choose_proposals``, ``render_many``) and stored through the same ``store_case`` into the same
  :class:`~nnunet_lefusion.nnunet.cache_store.CacheStore`: nnU-Net's preprocessor, Blosc2 files flushed to disk,
  then listed in the manifest under the cache lock. Case numbers come from the manifest
  (``CacheStore.reserve_index``, under the lock), so ranks and offline runs never collide.
* **Pool.** Each rank's run has its own pool: in that same manifest update the oldest cases of its pool beyond its
  share of ``pool_max`` (``pool_max // world``, at least 1) are unlisted; their files are deleted after the manifest
  is saved. Another training of the same fold has its own pools, so neither retires the other's cases; a run
  started again (``--c``) adopts the cases of runs whose writer is gone. Cases of offline runs (an existing cache)
  are kept and used, never retired.
* **Workers** (``SyntheticMixDataset(watch=True)``) re-read the manifest when it changes and fall back to the real
  case if a picked case was retired meanwhile.
* **DDP** (``nnUNetv2_train -num_gpus N``): every rank is a process with its own trainer, DA workers and producer on
  its own GPU (``self.device``, ``cuda:local_rank``); each makes its share, seeded by ``(seed, rank, epoch, k)``,
  into its pool of the one cache (shared cache folder, cache lock). The trainer sums the per-epoch counts over the
  ranks (``torch.distributed.all_reduce``) before rank 0 logs and writes them.
"""
from __future__ import annotations

import functools
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from nnunet_lefusion.config import TrainerSettings
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.nnunet.cache import ONLINE, Manifest, recorded_labels
from nnunet_lefusion.nnunet.cache_lock import Writer
from nnunet_lefusion.nnunet.cache_runs import start_online_run, store_case
from nnunet_lefusion.nnunet.cache_store import CacheStore
from nnunet_lefusion.nnunet.context import DatasetContext
from nnunet_lefusion.nnunet.generators import (SynthesizerOptions, check_generator_files, generator_paths,
                                               generator_records, with_shipped_generators)
from nnunet_lefusion.nnunet.online_budget import RankBudget
from nnunet_lefusion.nnunet.preprocess import mapped_raw_case
from nnunet_lefusion.nnunet.provenance import check_no_leak
from nnunet_lefusion.nnunet.slots import Slot, choose_proposals
from nnunet_lefusion.nnunet.synthesize import prepare_synthesis


def online_labels(ctx: DatasetContext, folder: Path) -> LesionLabels:
    """The lesion labels online synthesis uses: those of the cache in ``folder`` (checked against this fold) if it
    exists, else those named in dataset.json; ``LeFusionError`` if neither gives them."""
    store = CacheStore(folder)
    manifest = store.load() if store.exists() else None
    if manifest is not None:
        manifest.check_matches(ctx, ctx.split[0], folder)
    try:
        return recorded_labels(manifest, ctx.dataset_json)
    except LeFusionError as exc:
        raise LeFusionError(f"online mode needs the lesion labels ({exc}): name them in dataset.json, or create the "
                            f"cache first with nnUNetv2_lefusion_synthesize --lesion-labels") from None


def synthesizer_options(settings: TrainerSettings, default_device: str) -> SynthesizerOptions:
    """The :class:`SynthesizerOptions` of ``settings`` (device: the settings' or ``default_device``)."""
    return SynthesizerOptions(settings.checkpoint, settings.sampling, settings.device or default_device,
                              settings.mask_generator, settings.histogram_matching, settings.clusters,
                              settings.strided_steps)


def online_generators(ctx: DatasetContext, labels: LesionLabels, settings: TrainerSettings,
                      device: str) -> tuple[SynthesizerOptions, list[dict]]:
    """The synthesizer options of ``settings`` (shipped weights where none are given) and the generators' records;
    ``LeFusionError`` for a missing or wrong generator file, a generator that saw this fold's validation cases, or a
    target share on labels that are not lesions. Reads metadata only: cheap enough to run before training starts."""
    plan = settings.synthesis_plan()
    if plan is not None:
        plan.validate(labels)
    options = with_shipped_generators(settings.method, synthesizer_options(settings, device), labels, plan)
    check_generator_files(settings.method, options, labels)
    generators = generator_records(settings.method, options)
    check_no_leak(generators, ctx.held_out_hashes(), ctx.fold, "online synthesis refused")
    return options, generators


def ddp_case_limit_s() -> float:
    """Half the timeout of the DDP process group (no limit without DDP): the longest one case may take."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return math.inf
    try:  # the group's own timeout (nnU-Net sets none: the backend's default)
        device = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
        timeout = dist.group.WORLD._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):
        timeout = dist.distributed_c10d.default_pg_timeout
    return timeout.total_seconds() / 2


class OnlineProducer:
    """One rank's producer of synthetic cases during training: the online synthetic-case source (see the module
    documentation)."""

    watch = True  # the dataset follows the manifest as cases come and go

    def __init__(self, ctx: DatasetContext, folder: Path, labels: LesionLabels, settings: TrainerSettings,
                 device: str, rank: int = 0, world_size: int = 1, log=print) -> None:
        self.ctx, self.store, self.labels, self.settings = ctx, CacheStore(folder), labels, settings
        self.device, self.rank, self.world_size, self.log = device, rank, world_size, log
        self.budget = RankBudget(settings.online_cases_per_epoch, settings.online_time_share, rank, world_size,
                                 ddp_case_limit_s())
        self.writer: Writer | None = None
        self.synthesizer = None
        self.scratch: Path | None = None
        self.retired = 0
        self.kinds: dict[str, int] = {}
        self.initial_ids: set[str] = set()

    def start(self) -> Manifest:
        """Set up the synthesizer on the fold's training cases and open (or create) the cache; its manifest."""
        options, generators = online_generators(self.ctx, self.labels, self.settings, self.device)
        self.store.prepare()
        self.writer = self.store.writer().__enter__()
        try:
            return self._start(options, generators)
        except BaseException:
            self.close()
            raise

    def _start(self, options, generators: list[dict]) -> Manifest:
        t0 = time.perf_counter()
        self.scratch = Path(tempfile.mkdtemp(prefix=f"lefusion-online-rank{self.rank}-"))
        cases, self.synthesizer, self.pools, self.plan = prepare_synthesis(
            self.ctx, self.labels, self.settings.method, self.settings.synthesis_plan(), options, progress=False,
            load=functools.partial(mapped_raw_case, folder=self.scratch))
        request = {"online": True, "method": self.settings.method, "seed": self.settings.seed, "rank": self.rank,
                   "mix": self.plan.mix, "target_share": {str(k): v for k, v in self.plan.target_share.items()},
                   "candidates": self.plan.candidates, **options.sampling_record(),
                   "generators": generator_paths(generators)}
        manifest, self.run = start_online_run(self.ctx, self.store, self.labels, cases, request, generators,
                                              self.rank)
        self.totals = manifest.lesion_voxel_totals()
        self.initial_ids = set(manifest.cases)
        share = self.budget.share
        self.log(f"LeFusion online: {self.settings.method} synthesizer ready on {options.device} "
                 f"({time.perf_counter() - t0:.1f} s, {len(cases)} training cases, mix {self.plan.mix}); rank "
                 f"{self.rank} makes " + ("cases" if share is None else f"{share} case(s) per epoch")
                 + ", at most one per step"
                 + (f", at most {self.settings.online_time_share:.0%} of the time" if self.settings.online_time_share
                    else "") + f"; a pool of at most {self.pool_share()} online cases in {self.store.folder}")
        return manifest

    def epoch_start(self) -> None:
        self.retired = 0
        self.budget.epoch_start()

    def after_step(self, step_time: float, steps_done: int, steps_per_epoch: int, epoch: int) -> None:
        """Called after each training step: make the case that is due, if one is (see the budget)."""
        self.budget.add_step(step_time)
        if self.budget.case_due(steps_done, steps_per_epoch):
            if self.budget.attempt(lambda: self.produce(epoch), self.log) is None:
                _free_accelerator_memory()

    def produce(self, epoch: int) -> str:
        """Make one case, store it in the pool (retiring the oldest beyond ``pool_max``); its identifier."""
        kind = self.plan.next_kind(self.kinds)
        rng = np.random.default_rng([self.settings.seed, self.rank, epoch, self.budget.tried])
        seed = int(rng.integers(2 ** 31))
        index = self.store.reserve_index()
        slot = Slot(index, kind, int(rng.integers(len(self.pools[kind]))), seed)
        proposal = choose_proposals(self.synthesizer, self.pools, [slot], self.plan, self.labels, self.totals,
                                    {index})[index]
        synthetic = self.synthesizer.render_many([proposal], np.random.default_rng(seed))[0]
        source = proposal.target.identifier
        syn_id = f"{source}__syn{index:04d}"
        provenance = {"source": source, "seed": seed, "run": self.run["id"], "slot": index, **synthetic.provenance,
                      ONLINE: {"rank": self.rank, "epoch": epoch, "time": round(time.time(), 3)}}
        retired = store_case(self.ctx, self.store, syn_id, synthetic.case, provenance, self.pool_share())
        for label, n in synthetic.provenance.get("lesion_voxels", {}).items():
            self.totals[label] = self.totals.get(label, 0) + int(n)
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.retired += len(retired)
        return syn_id

    def epoch_figures(self) -> dict[str, float]:
        """This rank's figures of the epoch, to be summed over the ranks."""
        b = self.budget
        return {"produced": b.made, "failed": b.failed, "retired": self.retired, "synthesis_s": b.synthesis_time,
                "target": b.share or 0}

    def pool_share(self) -> int:
        """The online cases this rank's run keeps: its share of ``pool_max`` (at least 1)."""
        n = self.settings.pool_max
        return max(1, n // self.world_size + (1 if self.rank < n % self.world_size else 0))

    def pool_sizes(self) -> tuple[int, int]:
        """(online cases, all cases) the manifest lists now."""
        manifest = self.store.load()
        return len(manifest.online_ids()), len(manifest.cases)

    def close(self) -> None:
        """Stop being a writer of the cache, free the synthesizer (and its GPU memory) and the mapped cases."""
        if self.writer is not None:
            self.writer.__exit__(None, None, None)
            self.writer = None
        self.synthesizer, self.pools = None, {}
        _free_accelerator_memory()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
