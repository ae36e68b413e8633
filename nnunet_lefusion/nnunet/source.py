"""Where a LeFusion training's synthetic cases come from: a pre-synthesized cache, or online synthesis into it.

A source is started once (its manifest: the cases there are now), told about each epoch and training step, gives
its per-epoch figures and is closed at the end. :class:`CacheSource` does nothing during training;
:class:`~nnunet_lefusion.nnunet.online.OnlineProducer` makes cases between steps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from nnunet_lefusion.config import TrainerSettings
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.nnunet.cache import Manifest
from nnunet_lefusion.nnunet.context import DatasetContext


class CacheSource:
    """The cases of a cache made before training (``nnUNetv2_lefusion_synthesize``), as they are."""

    watch = False  # the cache does not change during training

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def start(self) -> Manifest:
        return Manifest.load(self.folder)

    def epoch_start(self) -> None:
        pass

    def after_step(self, step_time: float, steps_done: int, steps_per_epoch: int, epoch: int) -> None:
        pass

    def epoch_figures(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


def synthetic_source(settings: TrainerSettings, ctx: DatasetContext, folder: Path, labels: LesionLabels | None,
                     device: str, rank: int, world_size: int, log: Callable[[str], None]):
    """The source of ``settings.mode`` (``labels``: those online synthesis uses; unused for a cache)."""
    if settings.mode == "cache":
        return CacheSource(folder)
    from nnunet_lefusion.nnunet.online import OnlineProducer

    return OnlineProducer(ctx, folder, labels, settings, device, rank, world_size, log)
