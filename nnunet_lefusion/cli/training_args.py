"""The optimisation options shared by the training commands (lesion sampler, mask generator)."""
from __future__ import annotations

import argparse

from nnunet_lefusion.cli.common import add_device_argument, check_device, seed_value
from nnunet_lefusion.training.loop import TrainConfig


def add_optimisation_arguments(parser: argparse.ArgumentParser, steps: int, lr: float, checkpoint_every: int,
                               item: str, notes: dict[str, str] | None = None) -> None:
    """``--steps --batch-size --grad-accum --lr --checkpoint-every``, ``-device`` and ``--seed``; ``item`` is what
    a micro-batch holds, ``notes`` (option name -> text) is added to an option's default in its help."""
    notes = {name: f"; {text}" for name, text in (notes or {}).items()}
    parser.add_argument("--steps", type=int, default=steps,
                        help=f"optimisation steps in total (default {steps}{notes.get('steps', '')})")
    parser.add_argument("--batch-size", type=int, default=4,
                        help=f"{item} per micro-batch (default 4{notes.get('batch-size', '')})")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help=f"micro-batches per step (default 1{notes.get('grad-accum', '')})")
    parser.add_argument("--lr", type=float, default=lr,
                        help=f"Adam learning rate (default {lr:g}{notes.get('lr', '')})")
    parser.add_argument("--checkpoint-every", type=int, default=checkpoint_every,
                        help=f"steps between checkpoints (default {checkpoint_every})")
    add_device_argument(parser)
    parser.add_argument("--seed", type=seed_value, default=0, help="random seed (default 0)")


def train_config_from(args: argparse.Namespace, **settings) -> TrainConfig:
    """The ``TrainConfig`` of the options above and ``settings`` (other ``TrainConfig`` fields), checked so that a
    bad value is refused (``LeFusionError``) before any data is read."""
    config = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         checkpoint_every=args.checkpoint_every, seed=args.seed, device=check_device(args.device),
                         **settings)
    config.resolved()
    return config
