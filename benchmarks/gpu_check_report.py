"""The figures of ``benchmarks/gpu_check.sh`` from what its run left in its work folder, headline last.

Reads ``stage_times.tsv`` (stage, start, end in epoch seconds), ``gpu_memory.csv`` (nvidia-smi's timestamp and MiB
used, all processes, every 0.5 s) and the nnU-Net training logs of ``results_{cache,online,r000}``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import re
import statistics
from pathlib import Path

_EPOCH_TIME = re.compile(r"Epoch time: ([0-9.]+) s")


def stage_times(work: Path) -> dict[str, tuple[float, float]]:
    """Stage name -> (start, end) in epoch seconds."""
    rows = csv.reader((work / "stage_times.tsv").read_text().splitlines(), delimiter="\t")
    return {name: (float(start), float(end)) for name, start, end in rows}


def peak_memory_mib(work: Path, start: float, end: float) -> int | None:
    """The most GPU memory nvidia-smi saw in use between start and end, in MiB (None without samples)."""
    peak = None
    samples = work / "gpu_memory.csv"
    for line in (samples.read_text().splitlines() if samples.exists() else []):
        stamp, used = (field.strip() for field in line.split(","))
        when = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
        if start <= when <= end:
            peak = max(peak or 0, int(used))
    return peak


def epoch_seconds(results: Path) -> list[float]:
    """nnU-Net's epoch times of the one training log under a results folder, the first (warm-up) epoch left out."""
    log = next(results.rglob("training_log_*.txt"))
    return [float(t) for t in _EPOCH_TIME.findall(log.read_text())][1:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--fast-cases", type=int, required=True)
    parser.add_argument("--official-cases", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args(argv)
    times = stage_times(args.work)
    seconds = {name: end - start for name, (start, end) in times.items()}
    peaks = {name: peak_memory_mib(args.work, *span) for name, span in times.items()}
    print("\n=== gpu_check: stages (wall time, peak GPU memory of all processes by nvidia-smi)")
    for name in times:
        print(f"{name:22s} {seconds[name]:8.1f} s  {peaks[name] or 0:7d} MiB")
    epochs = {run: epoch_seconds(args.work / f"results_{run}") for run in ("cache", "online", "r000")}
    medians = {run: statistics.median(values) for run, values in epochs.items()}
    online = json.loads(next((args.work / "results_online").rglob("lefusion_stats.json")).read_text())
    made = sum(e.get("produced", 0) for e in online["epochs"])
    fast = args.fast_cases / seconds["synthesize_fast"] * 60
    official = args.official_cases / seconds["synthesize_official"] * 60 if args.official_cases else float("nan")
    print(f"sampler training: {args.steps / seconds['train_sampler']:.2f} steps/s (with ROI extraction)")
    for run in epochs:
        print(f"nnU-Net epoch time, {run}: median {medians[run]:.2f} s over epochs {epochs[run]}")
    print(f"online mode made {made} LeFusion case(s) during its training")
    print("\n=== gpu_check headline")
    print(f"synthetic cases per minute (whole command, loading included): fast {fast:.1f}, official {official:.2f}")
    print(f"online-mode epoch time / _r000: {medians['online'] / medians['r000']:.3f}; "
          f"from the cache / _r000: {medians['cache'] / medians['r000']:.3f}")
    print(f"peak GPU memory: {max(p or 0 for p in peaks.values())} MiB "
          f"(training {max(peaks[s] or 0 for s in ('train_cache', 'train_online', 'train_r000'))} MiB)")


if __name__ == "__main__":
    main()
