"""Benchmark outputs: summary.json, a CSV of every per-case figure, a Markdown table and a PNG."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from nnunet_lefusion.benchmark.metrics import Structure
from nnunet_lefusion.benchmark.plan import CONTROL
from nnunet_lefusion.benchmark.stats import bootstrap, paired, run_level, run_level_values
from nnunet_lefusion.nnunet.cache import atomic_write_text


def table(results: list[dict], key: str, arms: tuple[str, ...], seeds: int) -> dict[str, np.ndarray]:
    """arm -> (test cases x seeds) values of one figure; NaN where missing. In --cv every case is tested
    by one fold only, so each lands in its fold's column and the other columns stay NaN."""
    cases = sorted({row["case"] for r in results for row in r["cases"]})
    index = {c: i for i, c in enumerate(cases)}
    values = {arm: np.full((len(cases), seeds), np.nan) for arm in arms}
    for r in results:
        for row in r["cases"]:
            value = row.get(key)
            values[r["arm"]][index[row["case"]], r["seed"]] = np.nan if value is None else value
    return values


def figure_keys(scored: list[Structure], detected: list[Structure]) -> list[str]:
    """Every summarised per-case figure: Dice by nnU-Net's convention (over every case), on the cases with the
    structure, by the Emidec convention, HD95, lesion-wise sensitivity and false lesions per case (per class and
    all classes together)."""
    keys = [f"{kind}_{s.key}{suffix}" for s in scored
            for kind, suffix in (("dice", "_nnunet"), ("dice", ""), ("dice", "_emidec"), ("hd95", ""))]
    return keys + [f"{kind}_{s.key}" for s in detected for kind in ("sensitivity", "false")] + ["false_all"]


def with_detection_rates(results: list[dict], detected: list[Structure]) -> list[dict]:
    """Add per-case sensitivity (found / reference lesions; NaN without lesions) and ``false_all`` (false lesions
    of every detected class) to every row."""
    for r in results:
        for row in r["cases"]:
            for s in detected:
                lesions = row[f"lesions_{s.key}"]
                row[f"sensitivity_{s.key}"] = row[f"found_{s.key}"] / lesions if lesions else float("nan")
            row["false_all"] = sum(row[f"false_{s.key}"] for s in detected)
    return results


def lesion_f1(result: dict, structure: Structure) -> float:
    """Lesion-wise F1 of one run, its counts pooled over its test cases: found reference lesions are true
    positives, missed ones false negatives, predicted lesions touching no reference lesion false positives."""
    found = sum(row[f"found_{structure.key}"] for row in result["cases"])
    missed = sum(row[f"lesions_{structure.key}"] for row in result["cases"]) - found
    false = sum(row[f"false_{structure.key}"] for row in result["cases"])
    return 2 * found / (2 * found + missed + false) if found + missed + false else float("nan")


RUN_KEYS = ("dice_{}_nnunet", "f1_{}", "false_all", "dice_{}", "dice_{}_emidec")


def run_level_keys(scored: list[Structure], detected: list[Structure]) -> list[str]:
    """The run-level figures: per lesion class nnU-Net-convention Dice and lesion F1, false lesions per case, and
    the two other Dice conventions."""
    lesions = [s.key for s in detected]
    keys = [k.format(s) for k in RUN_KEYS[:2] for s in lesions] + [RUN_KEYS[2]]
    return keys + [k.format(s) for k in RUN_KEYS[3:] for s in lesions]


def summarise_runs(results: list[dict], arms: tuple[str, ...], seeds: int, keys: list[str],
                   detected: list[Structure]) -> dict:
    """Per run-level figure: each arm's per-run values, mean, t-interval and hierarchical bootstrap interval, and
    its paired difference to the control over runs (the unit of evidence is the trained model)."""
    summary = {}
    for key in keys:
        if key.startswith("f1_"):
            structure = next(s for s in detected if key == f"f1_{s.key}")
            values = {arm: np.full(seeds, np.nan) for arm in arms}
            for r in results:
                values[r["arm"]][r["seed"]] = lesion_f1(r, structure)
            estimate = run_level_values
        else:
            values, estimate = table(results, key, arms, seeds), run_level
        summary[key] = {arm: {"estimate": estimate(values[arm]).to_dict(),
                              **({} if arm == CONTROL else
                                 {"vs_" + CONTROL: estimate(values[arm], values[CONTROL]).to_dict()})}
                        for arm in arms}
    return summary


def run_cell(estimate: dict, signed: bool = False) -> str:
    if estimate["mean"] is None:
        return "-"
    sign = "+" if signed else ""
    interval = "" if estimate["t_low"] is None else f" [{estimate['t_low']:{sign}.3f}, {estimate['t_high']:{sign}.3f}]"
    p = "" if estimate.get("p") is None else f" p={estimate['p']:.3f}"
    return f"{estimate['mean']:{sign}.3f}{interval}{p}"


def run_markdown(summary: dict, arms: tuple[str, ...], keys: list[str]) -> str:
    """Run-level table: per arm the mean over runs [95 % t-interval], per arm the paired difference to the
    control over runs [t-interval] with the paired t-test's p, then every run's own value."""
    lines = ["| arm | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {arm} | " + " | ".join(run_cell(summary[k][arm]["estimate"]) for k in keys) + " |" for arm in arms]
    lines += [f"| {arm} - {CONTROL} | " + " | ".join(run_cell(summary[k][arm]["vs_" + CONTROL], True) for k in keys)
              + " |" for arm in arms[1:]]
    lines += ["", "Per run (seed 0, 1, ...):", "", "| arm | " + " | ".join(keys) + " |",
              "|---" * (len(keys) + 1) + "|"]
    for arm in arms:
        cells = [" / ".join("-" if v is None else f"{v:.3f}" for v in summary[k][arm]["estimate"]["per_run"])
                 for k in keys]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarise(results: list[dict], arms: tuple[str, ...], seeds: int, keys: list[str], cv: bool) -> dict:
    """Per figure: each arm's mean with its interval, and each arm's paired difference to the control."""
    summary = {}
    for key in keys:
        values = table(results, key, arms, seeds)
        if cv:   # one test per case: its fold's value
            values = {arm: np.nanmean(v, axis=1, keepdims=True) if np.isfinite(v).any() else v[:, :1]
                      for arm, v in values.items()}
        summary[key] = {arm: {"estimate": bootstrap(values[arm]).to_dict(),
                              **({} if arm == CONTROL else
                                 {"vs_" + CONTROL: paired(values[arm], values[CONTROL]).to_dict()})}
                        for arm in arms}
    return summary


def write_csv(results: list[dict], path: Path) -> None:
    """One row per arm, seed and test case with every figure."""
    rows = [{"arm": r["arm"], "seed": r["seed"], **row} for r in results for row in r["cases"]]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _cell(estimate: dict, digits: int = 3) -> str:
    if estimate["mean"] is None:
        return "-"
    return f"{estimate['mean']:.{digits}f} [{estimate['low']:.{digits}f}, {estimate['high']:.{digits}f}]"


def paired_cell(diff: dict) -> str:
    """A paired difference as `+mean [low, high] p=...` (`p<0.001` below what three decimals show), `-` if undefined."""
    if diff["mean"] is None:
        return "-"
    p = "p<0.001" if diff["p"] < 0.001 else f"p={diff['p']:.3f}"
    return f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}] {p}"


def markdown(summary: dict, arms: tuple[str, ...], keys: list[str]) -> str:
    """Arms as rows; per figure the mean [95 % CI]; and the paired difference to the control with its p-value."""
    lines = ["| arm | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(_cell(summary[k][arm]["estimate"]) for k in keys) + " |")
    for arm in arms[1:]:
        cells = [paired_cell(summary[k][arm]["vs_" + CONTROL]) for k in keys]
        lines.append(f"| {arm} - {CONTROL} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_png(summary: dict, results: list[dict], arms: tuple[str, ...], scored: list[Structure], path: Path) -> None:
    """Left: Dice per structure and arm with 95 % intervals; right: nnU-Net's pseudo Dice per epoch per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        estimates = [summary[f"dice_{s.key}"][arm]["estimate"] for s in scored]
        means = np.array([e["mean"] if e["mean"] is not None else np.nan for e in estimates])
        errors = np.array([[m - (e["low"] if e["low"] is not None else m) for m, e in zip(means, estimates)],
                           [(e["high"] if e["high"] is not None else m) - m for m, e in zip(means, estimates)]])
        bars.bar(np.arange(len(scored)) + i * width, means, width, yerr=errors, capsize=3, label=arm)
        runs = [r["curves"].get("ema_fg_dice", []) for r in results if r["arm"] == arm and r["curves"]]
        if runs:
            length = min(map(len, runs))
            curves.plot(np.mean([c[:length] for c in runs], axis=0), label=arm)
    bars.set_xticks(np.arange(len(scored)) + 0.4 - width / 2, [s.key for s in scored])
    bars.set_ylabel("Dice (cases with the structure), mean and 95 % CI")
    bars.set_ylim(0, 1)
    bars.legend()
    curves.set_xlabel("epoch")
    curves.set_ylabel("nnU-Net pseudo Dice (EMA), mean over seeds")
    curves.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def run_name(result: dict) -> str:
    """``arm/seed_k`` of a run's metrics."""
    return f"{result['arm']}/seed_{result['seed']}"


def run_times(results: list[dict]) -> dict:
    """Seconds per run (synthesis and prediction wall time, training as nnU-Net's logged epoch times over all its
    sittings; None where a run finished before times were kept) and their sum over the runs that have one."""
    per_run = {}
    for result in results:
        stages = result.get("seconds") or {}
        known = [v for v in stages.values() if v is not None]
        complete = bool(stages) and stages.get("train") is not None
        per_run[run_name(result)] = round(sum(known), 1) if complete else None
    timed = [v for v in per_run.values() if v is not None]
    return {"per_run": per_run, "timed_runs": len(timed), "timed_seconds": round(sum(timed), 1)}


def exposure(results: list[dict], arms: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per arm, the lesion voxels per training-case load of each lesion label, averaged over its runs: how much of
    each class the arm's training saw (the rebalancing arms are meant to see about as much of the rarest)."""
    found = {}
    for arm in arms:
        runs = [r.get("lesion_voxels_per_load") or {} for r in results if r["arm"] == arm]
        labels = sorted({label for run in runs for label in run})
        found[arm] = {label: round(float(np.mean([run.get(label, 0.0) for run in runs])), 1) for label in labels}
    return found


POSTPROCESSED = "_postprocessed"   # suffix of the figures after nnU-Net's postprocessing


def write_outputs(out: Path, info: dict, results: list[dict], arms: tuple[str, ...], seeds: int,
                  scored: list[Structure], detected: list[Structure], cv: bool) -> tuple[str, dict[str, dict]]:
    """summary.json, per_case.csv, table.md and benchmark.png in ``out``, for the predictions as they are and, where
    every run has them, after nnU-Net's postprocessing; returns the Markdown tables and the run-level figures
    (keys ``""`` and :data:`POSTPROCESSED`)."""
    variants = {"": results}
    if results and all("cases_postprocessed" in r for r in results):
        variants[POSTPROCESSED] = [{**r, "cases": r["cases_postprocessed"]} for r in results]
    keys = figure_keys(scored, detected)
    headline = [k for k in keys if k.startswith("dice_") and not k.endswith("_emidec")] + \
        [k for k in keys if k.startswith(("sensitivity_", "false_"))]
    sections, figures, runs = [], {}, {}
    for suffix, variant in variants.items():
        variant = with_detection_rates(variant, detected)
        summary = summarise(variant, arms, seeds, keys, cv)
        runs[suffix] = summarise_runs(variant, arms, seeds, run_level_keys(scored, detected), detected)
        figures.update({"figures" + suffix: summary, "run_figures" + suffix: runs[suffix]})
        what = "after nnU-Net's postprocessing" if suffix else "as predicted"
        sections.append(f"## {what}\n\nRun level (the unit is the trained model):\n\n"
                        + run_markdown(runs[suffix], arms, list(runs[suffix]))
                        + "\nCase level (cases x runs pooled):\n\n" + markdown(summary, arms, headline))
        if not suffix:
            write_csv(variant, out / "per_case.csv")
            write_png(summary, variant, arms, scored, out / "benchmark.png")
    seen = exposure(results, arms)
    sections.append("## What training saw\n\nLesion voxels per training-case load, per label (mean over runs): "
                    + "; ".join(f"{arm} " + ", ".join(f"{k}: {v:g}" for k, v in per.items())
                                for arm, per in seen.items()) + "\n")
    text = "\n".join(sections)
    atomic_write_text(out / "summary.json", json.dumps({**info, **figures, "lesion_voxels_per_load": seen},
                                                       indent=1))
    atomic_write_text(out / "table.md", text)
    return text, runs
