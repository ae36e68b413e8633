"""The statistics of a LeFusion training: per epoch, the training-case loads (synthetic among them), the lesion
voxels loaded, and the online source's figures, summed over the DDP ranks and written by rank 0 to
``fold_X/lefusion_stats.json``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from nnunet_lefusion.config import TrainerSettings
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.nnunet.cache import atomic_write_text
from nnunet_lefusion.nnunet.dataset import LoadCounters
from nnunet_lefusion.nnunet.online_budget import unreachable

STATS_FILE = "lefusion_stats.json"
SumOverRanks = Callable[[list[float]], list[float]]


class LeFusionStats:
    """Counts of one training (see the module documentation); the counters are shared with the data workers."""

    def __init__(self, settings: TrainerSettings, log: Callable[[str], None]) -> None:
        self.settings, self.log = settings, log
        self.counters = LoadCounters()
        self.epochs: list[dict] = []
        self._seen = {"loads": 0, "synthetic": 0, "voxels": None}
        self._loaded: dict[str, int] = {}   # synthetic identifier -> loads, this epoch
        self._lost = 0
        self._new_ids: set[str] = set()

    def count_labels(self, labels: LesionLabels | None) -> LoadCounters:
        """Fresh counters of the lesion voxels of ``labels`` (None: none counted), for the training dataset."""
        self.counters = LoadCounters(labels.lesions if labels is not None else ())
        return self.counters

    def resume(self, folder: Path, current_epoch: int) -> None:
        """``--c``: continue the statistics of the epochs the checkpoint holds (later epochs in the file, written
        after that checkpoint, are trained again and counted anew)."""
        path = Path(folder) / STATS_FILE
        self.epochs = []
        try:
            self.epochs = [e for e in json.loads(path.read_text())["epochs"] if int(e["epoch"]) < current_epoch]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.log(f"LeFusion: cannot read the statistics of the earlier epochs ({path}: {type(exc).__name__}); "
                     "counting from this epoch on")
        if self.epochs:
            self.log(f"LeFusion: resumed the statistics of {len(self.epochs)} earlier epochs")

    def read_ids(self) -> None:
        """Take in the synthetic identifiers the workers loaded since the last call (their ring is bounded)."""
        ids, lost = self.counters.new_ids()
        for identifier in ids:
            self._loaded[identifier] = self._loaded.get(identifier, 0) + 1
        self._lost += lost

    def end_epoch(self, epoch: int, source, sum_over_ranks: SumOverRanks) -> dict:
        """The epoch's entry, over all ranks (every rank calls this at the same point), logged and kept."""
        self.read_ids()
        loads, synthetic = self.counters.snapshot()
        voxels = self.counters.voxel_snapshot()
        seen = self._seen
        before = seen["voxels"] or {k: dict.fromkeys(v, 0) for k, v in voxels.items()}
        labels = list(self.counters.labels)
        d_voxels = [voxels[k][lab] - before[k][lab] for k in ("real", "synthetic") for lab in labels]
        self._seen = {"loads": loads, "synthetic": synthetic, "voxels": voxels}
        figures = source.epoch_figures() if source is not None else {}
        summed = sum_over_ranks([loads - seen["loads"], synthetic - seen["synthetic"], *d_voxels,
                                 *figures.values()])
        d_loads, d_syn = int(summed[0]), int(summed[1])
        d_voxels = [int(v) for v in summed[2:2 + 2 * len(labels)]]
        fraction = d_syn / d_loads if d_loads else 0.0
        entry = {"epoch": epoch, "loads": d_loads, "synthetic": d_syn, "fraction": round(fraction, 4),
                 "lesion_voxels": {"real": dict(zip(labels, d_voxels[:len(labels)])),
                                   "synthetic": dict(zip(labels, d_voxels[len(labels):]))}}
        self.log(f"LeFusion: {d_syn} of {d_loads} training-case loads were synthetic "
                 f"(realised fraction {fraction:.3f}, rate {self.settings.rate})")
        if labels:
            self.log("LeFusion: lesion voxels loaded, " + "; ".join(
                f"{k} " + ", ".join(f"label {lab}: {n}" for lab, n in entry["lesion_voxels"][k].items())
                for k in ("real", "synthetic")))
        if figures:
            entry.update(self._online_entry(source, dict(zip(figures, summed[2 + 2 * len(labels):]))))
        self._loaded = {}
        self.epochs.append(entry)
        return entry

    def _online_entry(self, source, figures: dict[str, float]) -> dict:
        made, failed, retired = (int(figures[k]) for k in ("produced", "failed", "retired"))
        new = {i: n for i, n in self._loaded.items() if i not in source.initial_ids}
        self._new_ids.update(new)
        pool_online, pool_total = source.pool_sizes()
        self.log(f"LeFusion online: {made} case(s) made this epoch ({figures['synthesis_s']:.1f} s), {failed} failed, "
                 f"{retired} retired; pool {pool_online}/{self.settings.pool_max} online cases, {pool_total} in all; "
                 f"{sum(new.values())} load(s) of {len(new)} case(s) made during this training")
        target = int(figures["target"]) if self.settings.online_cases_per_epoch else None
        warning = unreachable(made, failed, target)
        if warning:
            self.log(warning)
        return {"produced": made, "failed": failed, "retired": retired, "synthesis_s": round(figures["synthesis_s"], 2),
                "pool_online": pool_online, "pool_total": pool_total, "new_loads": sum(new.values()),
                "new_cases_loaded": len(new)}

    def write(self, folder: Path, source) -> None:
        """Write the statistics of all epochs so far (rank 0)."""
        stats = {"settings": self.settings.to_dict(), "epochs": self.epochs,
                 "total_loads": sum(e["loads"] for e in self.epochs),
                 "total_synthetic": sum(e["synthetic"] for e in self.epochs)}
        if source is not None and source.watch:   # online: which of the cases made were loaded
            stats["online"] = {"new_ids_loaded": sorted(self._new_ids), "ids_lost": self._lost,
                               "initial_cases": len(source.initial_ids)}
        atomic_write_text(Path(folder) / STATS_FILE, json.dumps(stats, indent=1))
