"""The generators of a synthesis run: their options, the shipped defaults, the checks of their files before any case
is read, the synthesizer they make, and the record of what they were trained on."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from nnunet_lefusion.config import METHODS
from nnunet_lefusion.diffusion.histograms import read_official_clusters
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.masks import MaskGenerator, RuleBasedMaskGenerator
from nnunet_lefusion.model.checkpoint import read_meta
from nnunet_lefusion.synthesis.base import RawCase, Synthesizer, SynthesisSkipped
from nnunet_lefusion.synthesis.copypaste import CopyPasteSynthesizer


@dataclass
class SynthesizerOptions:
    """What the LeFusion method needs beyond the cases: its checkpoint, sampling mode and mask generator."""

    checkpoint: str | None = None
    mode: str = "fast"
    device: str = "cpu"
    mask_generator: str | None = None  # "rule" or a learned mask-generator checkpoint
    # lesion intensities take their histogram condition exactly; None: unless the sampler has a level offset
    histogram_matching: bool | None = None
    clusters: str | None = None  # an official histogram-cluster JSON instead of the checkpoint's clusters
    strided_steps: int | None = None  # fast mode: strided timesteps walked (None: the mode's own 45)

    def sampling_record(self) -> dict:
        """How the cases are sampled, as a cache's run records it (the strided steps only where given)."""
        return {"sampling": self.mode, "histogram_matching": self.histogram_matching,
                **({} if self.strided_steps is None else {"strided_steps": self.strided_steps})}

def with_shipped_generators(method: str, options: SynthesizerOptions, labels: LesionLabels,
                            plan: SynthesisPlan | None) -> SynthesizerOptions:
    """``options`` with what a LeFusion run needs but was not given (the sampler; the mask generator when the plan
    draws new masks) taken from ``pretrained/``, where the dataset's labels are those the shipped weights learnt;
    ``LeFusionError`` naming the missing flag otherwise."""
    if method != "lefusion":
        return options
    from nnunet_lefusion.pretrained import default_generator

    checkpoint = options.checkpoint or default_generator("sampler", labels)
    masks = options.mask_generator
    if masks is None and plan is not None and plan.new_masks:
        masks = default_generator("mask generator", labels)
    return replace(options, checkpoint=checkpoint, mask_generator=masks)

def make_mask_generator(spec: str | None, labels: LesionLabels, device: str) -> MaskGenerator | None:
    """``None``, the rule-based generator (``"rule"``) or a learned one loaded from a checkpoint path."""
    if spec is None:
        return None
    if spec == "rule":
        return RuleBasedMaskGenerator(labels)
    from nnunet_lefusion.masks.learned import LearnedMaskGenerator

    return LearnedMaskGenerator.load(spec, device)

def make_synthesizer(method: str, cases: list[RawCase], labels: LesionLabels,
                     options: SynthesizerOptions | None = None) -> Synthesizer:
    """The synthesizer called ``method``, set up on the fold's training cases."""
    options = options or SynthesizerOptions()
    if method == "copypaste":
        try:
            return CopyPasteSynthesizer(cases, labels)
        except SynthesisSkipped as exc:
            raise LeFusionError(f"copy-paste impossible: {exc}") from None
    if method == "lefusion":
        channels = {case.image.shape[0] for case in cases}
        if channels != {1}:
            raise LeFusionError(f"LeFusion re-textures one image channel, but the cases have {max(channels)}: "
                                "lesion labels would lie on untouched tissue in the others; use --method copypaste")
        if not options.checkpoint:
            raise LeFusionError("--method lefusion needs --checkpoint (train one with nnUNetv2_lefusion_train_sampler)")
        from nnunet_lefusion.synthesis.lefusion import LeFusionSynthesizer

        return LeFusionSynthesizer(options.checkpoint, labels, options.mode, options.device,
                                   mask_generator=make_mask_generator(options.mask_generator, labels, options.device),
                                   histogram_matching=options.histogram_matching, clusters=options.clusters,
                                   strided_steps=options.strided_steps)
    raise LeFusionError(f"unknown synthesis method {method!r} (available: {', '.join(METHODS)})")

def check_generator_files(method: str, options: SynthesizerOptions, labels: LesionLabels) -> None:
    """Refuse, before any case is read, a LeFusion run without a readable sampler checkpoint, whose checkpoint or
    mask generator is another kind of file, whose histogram clusters are missing (an official checkpoint has none)
    or not an official cluster file for ``labels``, or whose learned mask generator draws other lesion or organ
    labels than ``labels`` (it draws its own: they would land as the wrong classes; metadata only, the networks are
    checked when they are built)."""
    if method != "lefusion":
        return
    from nnunet_lefusion.masks.learned import MASK_KIND
    from nnunet_lefusion.training.sampler import SAMPLER_KIND

    if not options.checkpoint:
        raise LeFusionError("--method lefusion needs --checkpoint (train one with nnUNetv2_lefusion_train_sampler)")
    meta = read_meta(options.checkpoint)  # None: an official checkpoint, checked when loaded
    if meta is not None and meta.extras.get("kind") != SAMPLER_KIND:
        raise LeFusionError(f"--checkpoint {options.checkpoint} is not a LeFusion sampler checkpoint (kind "
                            f"{meta.extras.get('kind')!r}); a mask generator goes to --mask-generator")
    if options.clusters:
        read_official_clusters(options.clusters, len(labels.lesions))
    elif meta is None:
        raise LeFusionError(f"--checkpoint {options.checkpoint} is an official checkpoint, which holds no histogram "
                            f"clusters: give the official ones with --clusters FILE (hist_clusters/"
                            f"emidec_clusters.json of LeFusion; online mode: settings key clusters or "
                            f"LEFUSION_CLUSTERS)")
    if options.mask_generator not in (None, "rule"):
        meta = read_meta(options.mask_generator)
        kind = meta.extras.get("kind") if meta is not None else None
        if kind != MASK_KIND:
            raise LeFusionError(f"--mask-generator {options.mask_generator} is not a lesion-mask generator "
                                f"checkpoint (kind {kind!r}); give 'rule' or a checkpoint of "
                                f"nnUNetv2_lefusion_train_masks")
        drawn = LesionLabels.from_dict(meta.extras["labels"])
        if (drawn.lesions, drawn.organ) != (labels.lesions, labels.organ):
            raise LeFusionError(f"--mask-generator {options.mask_generator} draws lesion labels {list(drawn.lesions)} "
                                f"(outer to inner) in organ {list(drawn.organ)}, not {list(labels.lesions)} in "
                                f"{list(labels.organ)}: train one on this dataset with nnUNetv2_lefusion_train_masks")

def generator_records(method: str, options: SynthesizerOptions) -> list[dict]:
    """Role, path and recorded training cases (``CheckpointMeta.training_data``) of the trained generators used, and
    of the histogram-cluster file given (its cases unrecorded)."""
    used = [("sampler", options.checkpoint), ("mask generator", options.mask_generator)] if method == "lefusion" else []
    records = []
    for role, path in used:
        if path and path != "rule":
            meta = read_meta(path)
            records.append({"role": role, "path": str(Path(path).resolve()),
                            "training_data": meta.training_data if meta is not None else None})
            start = meta.extras.get("initialised_from", {}) if meta is not None else {}
            for seen in start.get("training_data", []):  # a fine-tuned generator also saw what it started from
                records.append({"role": f"{role} (its initial weights, {start['file']})",
                                "path": str(Path(path).resolve()), "training_data": seen})
    if method == "lefusion" and options.clusters:
        records.append({"role": "histogram clusters", "path": str(Path(options.clusters).resolve()),
                        "training_data": None})
    return records

def generator_paths(generators: list[dict]) -> list[str]:
    """The files of ``generator_records``, each once, in order (the request a cache run records)."""
    return list(dict.fromkeys(g["path"] for g in generators))
