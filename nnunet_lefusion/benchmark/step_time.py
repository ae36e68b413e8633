"""This machine's speed at nnU-Net's training step, so that the benchmark's time estimate holds where it runs."""
from __future__ import annotations

import contextlib
import time

import torch

from nnunet_lefusion.nnunet.context import DatasetContext
from nnunet_lefusion.precision import cpu_bf16_autocast


def _precision(device: torch.device, cpu_bf16: bool) -> contextlib.AbstractContextManager:
    """The autocast the trainer steps under: nnU-Net's own on CUDA, bf16 on a CPU with ``cpu_bf16``."""
    return torch.autocast("cuda") if device.type == "cuda" else cpu_bf16_autocast(cpu_bf16)


def step_seconds(ctx: DatasetContext, device: str, cpu_bf16: bool, steps: int = 2) -> float:
    """Seconds of one training step (forward with deep supervision, backward, SGD update) of the configuration's
    nnU-Net network at its batch and patch size on ``device``, the median of ``steps`` after a warm-up step."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    config = ctx.configuration_manager
    channels = determine_num_input_channels(ctx.plans_manager, config, ctx.dataset_json)
    where = torch.device(device)
    network = nnUNetTrainer.build_network_architecture(ctx.plans_manager, config, channels,
                                                       ctx.label_manager.num_segmentation_heads,
                                                       enable_deep_supervision=True).to(where)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    batch = torch.randn(config.batch_size, channels, *config.patch_size, device=where)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with _precision(where, cpu_bf16):
            loss = sum(out.float().square().mean() for out in network(batch))
        loss.backward()
        optimizer.step()
        if where.type == "cuda":
            torch.cuda.synchronize(where)
        times.append(time.perf_counter() - start)
    return float(sorted(times[1:])[len(times[1:]) // 2])
