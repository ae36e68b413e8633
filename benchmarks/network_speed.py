"""Time one evaluation of the LeFusion denoiser: plain (official math) vs optimised path, CPU or CUDA.

Run: ``PYTHONPATH=. .venv/bin/python -m benchmarks.network_speed [--configs official small] [--batches 1 4]``.
``time_forward`` and ``time_train_step`` are importable (e.g. by ``benchmarks/sampler_speed.py``).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from nnunet_lefusion.model import ModelConfig, Unet3D

PATHS = ("plain", "fused")
ROI = (10, 72, 72)


def _inputs(config: ModelConfig, batch: int, roi: tuple[int, int, int], device: str):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.channels, *roi, generator=gen).to(device)
    t = torch.randint(0, 300, (batch,), generator=gen).to(device)
    cond = torch.rand(batch, config.cond_dim, generator=gen).to(device) if config.cond_dim else None
    return x, t, cond


def _min_time(step, repeats: int, device: str) -> float:
    """Minimum wall time of ``step()`` over ``repeats`` runs after one warm-up run."""
    times = []
    for _ in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def _config(config: ModelConfig | str) -> ModelConfig:
    return config if isinstance(config, ModelConfig) else ModelConfig.from_yaml(config)


def _run_with_path(config: ModelConfig | str | Unet3D, path: str, device: str, measure) -> float:
    """Call ``measure(model)`` with the model on ``device`` in execution path ``path``; a given model gets its
    previous path back afterwards."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    model = config if isinstance(config, Unet3D) else _config(config).build()
    previous = model.fused
    model.fused = path == "fused"
    try:
        return measure(model.to(device))
    finally:
        model.fused = previous


def time_forward(config: ModelConfig | str | Unet3D, batch: int = 1, path: str = "fused", *,
                 roi: tuple[int, int, int] = ROI, repeats: int = 3, device: str = "cpu") -> float:
    """Seconds per forward pass of a batch (minimum of ``repeats`` after a warm-up, ``torch.inference_mode``,
    fp32) of a config, a packaged config name or a built model."""

    def measure(model: Unet3D) -> float:
        x, t, cond = _inputs(model.config, batch, roi, device)
        with torch.inference_mode():
            return _min_time(lambda: model(x, t, cond), repeats, device)

    return _run_with_path(config, path, device, measure)


def time_train_step(config: ModelConfig | str | Unet3D, batch: int = 4, path: str = "fused", *,
                    roi: tuple[int, int, int] = ROI, repeats: int = 3, device: str = "cpu") -> float:
    """Seconds per Adam training step (forward, L1 noise loss, backward, update) on a batch; a given model is
    copied, not trained."""

    def measure(model: Unet3D) -> float:
        model = copy.deepcopy(model).train()
        x, t, cond = _inputs(model.config, batch, roi, device)
        target = torch.randn(batch, model.config.out_channels, *roi).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.l1_loss(model(x, t, cond), target).backward()
            optimizer.step()

        return _min_time(step, repeats, device)

    return _run_with_path(config, path, device, measure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["official", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train", action="store_true", help="also time an Adam train step (batch 4)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"ROI 2x{'x'.join(map(str, ROI))}, seconds per call (minimum of {args.repeats})")
    print(f"{'config':<10}{'params':>9}{'batch':>7}{'plain s':>10}{'fused s':>10}{'plain/fused':>13}")
    for name in args.configs:
        config = _config(name)
        model = config.build()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for batch in args.batches:
            plain, fused = (time_forward(model, batch, path, repeats=args.repeats, device=args.device)
                            for path in PATHS)
            print(f"{name:<10}{params:>8.1f}M{batch:>7}{plain:>10.3f}{fused:>10.3f}{plain / fused:>13.2f}", flush=True)
        if args.train:
            plain, fused = (time_train_step(model, 4, path, repeats=args.repeats, device=args.device) for path in PATHS)
            print(f"{name:<10}{'train step, batch 4':>23}{plain:>10.3f}{fused:>10.3f}{plain / fused:>13.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
