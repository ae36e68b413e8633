"""What a benchmark runs: arms (how the training cases are augmented), presets (how long nnU-Net trains) and the
seeded draw of training cases, with a time estimate."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from nnunet_lefusion.errors import LeFusionError


@dataclass(frozen=True)
class Arm:
    """One way of training: ``method`` None trains on real cases only (rate 0, same trainer code path)."""

    name: str
    method: str | None
    mix: str | None = None
    new_masks: bool = False     # the arm draws new lesion masks with a mask generator
    rare_share: bool = False    # its synthetic lesions carry the benchmark's target share of the rarest class
    rare_focus: bool = False    # real cases only, foreground patches biased towards the rarest lesion class


ARMS = {arm.name: arm for arm in (
    Arm("real", None),
    Arm("real_balanced", None, rare_focus=True),
    Arm("copypaste", "copypaste", rare_share=True),
    Arm("lefusion", "lefusion", "retexture=1"),
    Arm("lefusion_masks", "lefusion", "retexture=0.25,newmask=0.25,normal=0.5", new_masks=True, rare_share=True),
)}
CONTROL = "real"
DEFAULT_RARE_SHARE = 0.3   # share of the rarest lesion class among the synthetic lesion voxels of the rebalancing arms


NNUNET_SCHEDULE = (1000, 250, 50)   # nnU-Net's own epochs, training and validation iterations per epoch


@dataclass(frozen=True)
class Preset:
    """How each run trains and how much it synthesizes; ``None`` epochs keep nnU-Net's own schedule."""

    name: str
    arms: tuple[str, ...]
    seeds: int
    train_cases: int | None      # None: every training case
    test_cases: int              # size of the held-out phantom test set
    synthetic_per_case: float    # synthetic cases per training case and run
    epochs: int | None
    iterations: int | None
    val_iterations: int | None
    seconds_per_iteration: float  # for the time estimate (3d_fullres on the machine the preset is meant for)
    seconds_per_synthetic: dict[str, float]  # per arm that synthesizes (new masks cost the mask generator too)
    describe: str
    cpu_bf16: bool = False       # on a CPU device, nnU-Net's steps run under bf16 autocast (the trainer's cpu_bf16)

    @property
    def short(self) -> bool:
        """Whether the run uses the short trainer variants (own epoch/iteration counts, no test-time mirroring)."""
        return self.epochs is not None

    @property
    def schedule(self) -> str:
        """How long each run trains, in words."""
        if not self.short:
            return f"nnU-Net's own schedule ({NNUNET_SCHEDULE[0]} epochs x {NNUNET_SCHEDULE[1]} iterations)"
        epochs = f"{self.epochs} epoch{'s' * (self.epochs != 1)}"
        return f"{epochs} x {self.iterations} iterations = {self.epochs * self.iterations:,} per run"

    def with_schedule(self, epochs: int | None, iterations: int | None) -> "Preset":
        """This preset with ``--epochs/--iterations`` in place of its own (either may be None: kept; a preset on
        nnU-Net's schedule keeps nnU-Net's count for the one not given)."""
        if epochs is None and iterations is None:
            return self
        if min(v for v in (epochs, iterations) if v is not None) < 1:
            raise LeFusionError("need --epochs >= 1 and --iterations >= 1")
        default_epochs, default_iterations, default_val = NNUNET_SCHEDULE
        return replace(self, epochs=epochs or self.epochs or default_epochs,
                       iterations=iterations or self.iterations or default_iterations,
                       val_iterations=self.val_iterations or default_val)


CPU_BF16_SPEEDUP = 40 / 28   # the cpu preset's fp32 vs bf16 epoch seconds on this project's AMX CPU (one DA worker)
STEP_OVERHEAD = 1.05   # an iteration over a bare training step: validation steps, data loading (AMD EPYC: 3.0 vs 2.9 s)

PHANTOM_ARMS = ("real", "copypaste", "lefusion", "lefusion_masks")   # the phantom benchmark's arms (no real_balanced)

PRESETS = {p.name: p for p in (
    Preset("cpu", PHANTOM_ARMS, 3, 40, 40, 0.5, 100, 30, 2, 0.52, {"copypaste": 1.0, "lefusion": 10.0,
                                                                   "lefusion_masks": 17.0},
           "2-core CPU, 40 training cases, bf16 where the CPU has it (timed with OMP_NUM_THREADS=2 "
           "nnUNet_n_proc_DA=0)", cpu_bf16=True),
    Preset("real_cpu", tuple(ARMS), 5, None, 0, 0.5, 30, 50, 5, 1.7, {"copypaste": 0.1, "lefusion": 50.0,
                                                                       "lefusion_masks": 55.0},
           "2-core CPU, fp32, real cases cropped to the heart, -c 2d (timed on an AMD EPYC with "
           "nnUNet_n_proc_DA=0: a run within an hour; give --test-dataset and --split-fold)"),
    Preset("full", tuple(ARMS), 3, None, 40, 2.0, None, None, None, 0.15, {"copypaste": 0.5, "lefusion": 2.0,
                                                                           "lefusion_masks": 6.0},
           "GPU, every training case"),
    Preset("tiny", ("real", "copypaste"), 1, 6, 3, 1.0, 1, 4, 1, 1.1, {"copypaste": 1.0, "lefusion": 24.0,
                                                                        "lefusion_masks": 70.0},
           "smoke test", cpu_bf16=True),
)}


def parse_arms(text: str | None, preset: Preset) -> tuple[str, ...]:
    """Arm names from ``--arms a,b`` (default: the preset's); the control always comes first."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(","))) if text else preset.arms
    unknown = [n for n in names if n not in ARMS]
    if unknown or not names:
        raise LeFusionError(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    return (CONTROL, *[n for n in names if n != CONTROL])


def draw_training_cases(pool: list[str], count: int | None, seed: int) -> list[str]:
    """The same seeded draw of ``count`` cases for every arm of a seed (all of ``pool`` if ``count`` is None)."""
    if count is None or count >= len(pool):
        return sorted(pool)
    rng = np.random.default_rng([seed, 7919])
    return sorted(str(c) for c in rng.choice(sorted(pool), size=count, replace=False))


def run_list(arms: tuple[str, ...], seeds: int) -> list[tuple[str, int]]:
    """Every (arm, seed) run in the order they are run (seed by seed; the order ``-num_parts`` splits)."""
    return [(name, seed) for seed in range(seeds) for name in arms]


def estimate_seconds(preset: Preset, runs: list[tuple[str, int]], train_cases: int, bf16: bool,
                     step: float | None = None) -> float:
    """A rough duration of ``runs``: training iterations plus synthesis, on the machine the preset was timed on
    (``bf16``: whether the preset's CPU bf16 applies here), or, given ``step`` (one training step measured here,
    :func:`~nnunet_lefusion.benchmark.step_time.step_seconds`), on this one: iterations from the step, synthesis
    scaled by the same ratio."""
    iterations = (preset.epochs * preset.iterations) if preset.short else NNUNET_SCHEDULE[0] * NNUNET_SCHEDULE[1]
    timed = preset.seconds_per_iteration * (CPU_BF16_SPEEDUP if preset.cpu_bf16 and not bf16 else 1.0)
    per_iteration = timed if step is None else STEP_OVERHEAD * step
    total = 0.0
    for name, _ in runs:
        arm = ARMS[name]
        total += iterations * per_iteration + 60
        if arm.method:
            total += train_cases * preset.synthetic_per_case * preset.seconds_per_synthetic[name] * (
                per_iteration / timed)
    return total
