"""Seconds per ROI of the official RePaint schedule (5/5) against the fast mode, and what the network costs.

Run: ``PYTHONPATH=. .venv/bin/python -m benchmarks.sampler_speed [--config small] [--batch 1] [--device cpu]``.
Sections:
1. sampler on ``--config``: seconds per network evaluation, the official 5/5 schedule (1,480 evaluations;
   measured end to end with ``--measure-official``, the default on CUDA, else evaluations x per-evaluation
   time), and the fast mode run end to end once; per ROI and as ratios.
2. the official-size network: one evaluation, batch 1 and 4, plain (official math) vs optimised path
   (``benchmarks/network_speed.time_forward``); ``--skip-official`` leaves it out.
3. ``--quality``: how well each schedule harmonises a lesion with its surroundings, with the exact denoiser
   of a Gaussian random field (no training needed): the error of the mean inpainted lesion against the exact
   conditional mean, and the excess variance left, both relative to the field's prior (0 is exact).
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.network_speed import time_forward
from nnunet_lefusion.diffusion.sampler import RePaintSampler, SamplerConfig
from nnunet_lefusion.diffusion.schedule import CosineSchedule
from nnunet_lefusion.model import ModelConfig, available_configs

ROI = (10, 72, 72)
T = 300


def _roi_batch(batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ROIs in [-1, 1] with an infarct block (3) holding a no-reflow core (4)."""
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(batch, *ROI, generator=gen) * 2 - 1
    label = torch.zeros(batch, *ROI, dtype=torch.long)
    label[:, 3:7, 20:44, 24:40] = 3
    label[:, 4:6, 28:34, 28:34] = 4
    return image.to(device), label.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_sampling(model: torch.nn.Module, config: SamplerConfig, batch: int, device: str) -> tuple[float, int]:
    """Wall seconds of one sampling call on ``batch`` ROIs, and its network evaluations."""
    image, label = _roi_batch(batch, device)
    sampler = RePaintSampler(model, CosineSchedule(T), config)
    cond = torch.full((model.config.cond_dim,), 1 / 16, device=device) if model.config.cond_dim else None
    gen = torch.Generator(device).manual_seed(0)
    _sync(device)
    start = time.perf_counter()
    result = sampler.sample(image, label, [3, 4], cond, gen)
    _sync(device)
    return time.perf_counter() - start, result.evaluations


def sampler_section(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = ModelConfig.from_yaml(args.config).build().eval().to(args.device)
    per_eval = time_forward(model, args.batch, "fused", roi=ROI, repeats=args.repeats, device=args.device)
    official, fast = SamplerConfig.official(), SamplerConfig.fast(precision=args.precision, compile=args.compile)
    rows = []
    if args.measure_official:
        rows.append(("official 5/5 (measured)", *time_sampling(model, official, args.batch, args.device)))
    else:
        rows.append(("official 5/5 (evals x eval time)", per_eval * official.evaluations(T), official.evaluations(T)))
    rows.append(("fast (evals x eval time)", per_eval * fast.evaluations(T), fast.evaluations(T)))
    rows.append((f"fast (measured, {args.precision})", *time_sampling(model, fast, args.batch, args.device)))
    print(f"\n[1] sampler, config '{args.config}', batch {args.batch}, ROI 2x{'x'.join(map(str, ROI))}, "
          f"{per_eval / args.batch:.4f} s per evaluation per ROI")
    print(f"{'mode':<36}{'evals':>7}{'s/ROI':>11}{'official/this':>15}")
    base = rows[0][1] / args.batch
    for name, seconds, evals in rows:
        per_roi = seconds / args.batch
        print(f"{name:<36}{evals:>7}{per_roi:>11.2f}{base / per_roi:>15.1f}", flush=True)


def official_network_section(args: argparse.Namespace) -> None:
    model = ModelConfig.from_yaml("official").build().eval()
    evals = SamplerConfig.official().evaluations(T), SamplerConfig.fast().evaluations(T)
    print(f"\n[2] official-size network ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
          f"one evaluation, {args.device}")
    print(f"{'batch':>5}{'plain s':>10}{'fused s':>10}{'plain/fused':>13}"
          f"{'5/5 plain s/ROI':>17}{'fast fused s/ROI':>18}{'ratio':>8}")
    for batch in (1, 4):
        plain, fused = (time_forward(model, batch, path, roi=ROI, repeats=args.official_repeats, device=args.device)
                        for path in ("plain", "fused"))
        slow, quick = plain / batch * evals[0], fused / batch * evals[1]
        print(f"{batch:>5}{plain:>10.3f}{fused:>10.3f}{plain / fused:>13.2f}{slow:>17.1f}{quick:>18.1f}"
              f"{slow / quick:>8.1f}", flush=True)


def _gaussian_field(shape: tuple[int, int, int], length: float, sd: float, seed: int):
    """Covariance eigen-decomposition of a squared-exponential field on ``shape`` and one draw from it."""
    grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in shape), indexing="ij"), -1)
    points = (grid * torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)).reshape(-1, 3)  # slices 2 voxels apart
    cov = sd ** 2 * torch.exp(-torch.cdist(points, points) ** 2 / (2 * length ** 2))
    cov += 1e-4 * torch.eye(len(points), dtype=torch.float64)
    lam, vec = torch.linalg.eigh(cov)
    draw = vec @ (lam.sqrt() * torch.randn(len(points), generator=torch.Generator().manual_seed(seed),
                                           dtype=torch.float64))
    return cov, lam, vec, draw


def quality_section(args: argparse.Namespace) -> None:
    shape, batch = (4, 8, 8), args.quality_samples
    cov, lam, vec, truth = _gaussian_field(shape, length=2.5, sd=0.3, seed=0)
    schedule = CosineSchedule(T)
    abar = schedule.official_buffers()["alphas_cumprod"].double()

    def exact_denoiser(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        a, b = abar[t].sqrt()[:, None], (1 - abar[t]).sqrt()[:, None]
        flat = x.reshape(x.shape[0], -1).double()
        x0 = ((flat @ vec) * (a * lam / (a * a * lam + b * b))) @ vec.T  # E[x0 | x_t] of the field
        return ((flat - a * x0) / b).float().reshape(x.shape)

    label = torch.zeros(shape, dtype=torch.long)
    label[1:3, 2:6, 2:6] = 1
    lesion = label.reshape(-1).bool()
    solve = torch.linalg.solve(cov[~lesion][:, ~lesion], cov[~lesion][:, lesion])
    cond_mean = solve.T @ truth[~lesion]
    cond_var = torch.diag(cov[lesion][:, lesion] - cov[lesion][:, ~lesion] @ solve)
    prior_var = torch.diag(cov)[lesion]
    configs = {"official 5/5": SamplerConfig.official(), "official 2/2": SamplerConfig.official(2, 2),
               "DDPM, every step, no jumps": SamplerConfig.official(1, 1),
               "DDIM 50 strided, no jumps": SamplerConfig(1, 1, strided_steps=50),
               "50 even strides, 3 samples each": SamplerConfig(1, 3, strided_steps=50, eta=1.0),
               "fast (default)": SamplerConfig.fast()}
    floor = (cond_var.mean() / batch).sqrt() / prior_var.mean().sqrt()
    print(f"\n[3] harmonisation with the exact denoiser of a Gaussian field {shape}, {batch} samples "
          f"(Monte-Carlo error of the mean about {floor:.3f})")
    print(f"{'mode':<30}{'evals':>7}{'mean error':>12}{'excess var':>12}")
    image = truth.float().reshape(1, *shape).expand(batch, *shape)
    for name, config in configs.items():
        result = RePaintSampler(exact_denoiser, schedule, config).sample(
            image, label.expand(batch, *shape), [1], None, torch.Generator().manual_seed(1))
        samples = result.image.reshape(batch, -1)[:, lesion].double()
        error = (samples.mean(0) - cond_mean).pow(2).mean().sqrt() / prior_var.mean().sqrt()
        excess = (samples.var(0) - cond_var).mean() / (prior_var - cond_var).mean()
        print(f"{name:<30}{result.evaluations:>7}{error:>12.3f}{excess:>12.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small" if "small" in available_configs() else "tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the network in the fast run")
    parser.add_argument("--measure-official", action=argparse.BooleanOptionalAction, default=None,
                        help="run the official 5/5 schedule end to end (default: only on CUDA)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--official-repeats", type=int, default=1)
    parser.add_argument("--skip-official", action="store_true", help="leave out the official-size network")
    parser.add_argument("--quality", action="store_true", help="also run the harmonisation check")
    parser.add_argument("--quality-samples", type=int, default=2048)
    args = parser.parse_args(argv)
    if args.measure_official is None:
        args.measure_official = args.device.startswith("cuda")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    sampler_section(args)
    if not args.skip_official:
        official_network_section(args)
    if args.quality:
        quality_section(args)


if __name__ == "__main__":
    main()
