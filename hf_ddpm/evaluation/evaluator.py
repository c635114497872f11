"""The evaluation driver: samples (generated or read), reference images, feature extractors and the metrics'
values, spread over accelerate processes; what `evaluate` and `evaluate_pipeline` run.

`evaluate` generates samples with `hf_ddpm.sampling.generate` (or reads them), runs the feature extractors of
`hf_ddpm.evaluation.feature_extractors` on samples and reference images, computes the metrics of
`hf_ddpm.evaluation.metrics` and saves the results with `hf_ddpm.evaluation.results` (eval_results.json and the
model card). `evaluate_pipeline` is the same without files, for the training loop's `--eval_every`. The metrics
and the values they report: see `hf_ddpm.evaluation`.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import accelerate
import numpy as np
import torch

from hf_ddpm.arguments import check_positive
from hf_ddpm.data import DataArguments, ImageDataset, load_data
from hf_ddpm.distributed import gather_objects, is_main, run_sharded
from hf_ddpm.errors import ConfigError
from hf_ddpm.evaluation.feature_extractors import (
    DINOV2_DEFAULT,
    INCEPTION_WEIGHTS_FILE,
    FeatureExtractor,
    build_feature_extractor,
)
from hf_ddpm.evaluation.metrics import (
    DEFAULT_STATS_CACHE,
    FeatureStats,
    check_enough_samples,
    class_histogram_entropy,
    confident_fraction,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    stats_cache_path,
)
from hf_ddpm.evaluation.results import RESULTS_FILE, dataset_label, result_entries, save_results, split_label
from hf_ddpm.hub import load_pipeline
from hf_ddpm.pipeline import DDPMPipeline
from hf_ddpm.sampling import (
    SamplingArguments,
    compile_for_sampling,
    default_steps,
    generate,
    image_generators,
    load_images,
)
from hf_ddpm.scheduler import DDPMScheduler

METRICS = ("fid", "kid", "inception_score", "fd_dinov2", "nll", "digits")
# The feature extractor each metric needs (nll needs none).
EXTRACTOR_OF = {"fid": "inception", "kid": "inception", "inception_score": "inception", "fd_dinov2": "dinov2",
                "digits": "digits"}  # fmt: skip
# Metrics that fit a Gaussian to the samples' features, so need more samples than feature dimensions.
_FRECHET = ("fid", "fd_dinov2", "digits")
DEFAULT_NUM_SAMPLES = 1000
DEFAULT_BATCH_SIZE = SamplingArguments.batch_size
CONFIDENCE_THRESHOLD = 0.9
# In-memory reference statistics for evaluate_pipeline, which writes no files.
_MEMORY_STATS: dict[str, FeatureStats] = {}


def check_metrics(metrics: Sequence[str]) -> list[str]:
    """The metric names, de-duplicated in order; unknown names raise a ConfigError listing the valid ones."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ConfigError(f"unknown metric(s) {unknown or list(metrics)}; valid metrics: {', '.join(METRICS)}")
    return list(dict.fromkeys(metrics))


@dataclass
class EvaluationArguments:
    """What scripts/evaluate.py measures and where the results go; `SamplingArguments` draw the samples and
    `DataArguments` name the reference images."""

    metrics: str = field(default="digits", metadata={"help": f"comma-separated, from {', '.join(METRICS)}"})
    num_images: int | None = field(
        default=None,
        metadata={"aliases": ["--num_samples"],
                  "help": f"images to generate (default {DEFAULT_NUM_SAMPLES}) or read from --samples (default all); "
                  "nll scores the first N reference images (--num_samples is the old name)"},
    )  # fmt: skip
    samples: str | None = field(
        default=None, metadata={"help": "score these samples (PNG folder or .npz) instead of generating"}
    )
    heldout_last: int | None = field(default=None, metadata={"help": "use only the last N images of the split"})
    channels: int | None = field(default=None, metadata={"help": "reference image channels (default: the model's)"})
    nll_clip_denoised: bool = field(
        default=True,
        metadata={"help": "nll: clamp the predicted x_0 to [-1, 1] in every term, as the DDPM paper and "
                  "improved-diffusion report NLL (--no_nll_clip_denoised: the bound of the raw x_0 prediction)"},
    )  # fmt: skip
    inception_weights: str | None = field(
        default=None, metadata={"help": f"{INCEPTION_WEIGHTS_FILE} (default: the torch hub cache)"}
    )
    dinov2_model: str = field(default=DINOV2_DEFAULT, metadata={"help": "Hub id or local folder"})
    stats_cache_dir: str | None = field(
        default=None, metadata={"help": "reference statistics (default ~/.cache/hf_ddpm/stats)"}
    )
    output: str | None = field(default=None, metadata={"help": "results JSON (default: MODEL/eval_results.json)"})
    model_card: bool = field(
        default=True, metadata={"help": "re-render MODEL/README.md when the results go to MODEL/eval_results.json"}
    )
    metric_names: list[str] = field(init=False, repr=False)  # --metrics as a list, de-duplicated in order

    def __post_init__(self) -> None:
        try:
            self.metric_names = check_metrics([name.strip() for name in self.metrics.split(",") if name.strip()])
        except ValueError as err:
            raise ConfigError(f"--metrics: {err}") from None
        check_positive(self, ("num_images", "heldout_last"))


def distributed_batches(
    fn: Callable[[int, list[int]], dict[str, torch.Tensor]],
    num_items: int,
    batch_size: int,
    accelerator: accelerate.Accelerator | None = None,
) -> dict[str, torch.Tensor]:
    """Run `fn(batch_index, rows)` over global batches of `batch_size` rows; return the outputs, concatenated.

    Batch b holds rows b*batch_size ... (b+1)*batch_size - 1 whatever the number of processes P; the batches are
    shared out by `distributed.run_sharded` and gathered onto every process in row order, so P processes return
    exactly what one process does.
    """

    def run(batches: range) -> dict[str, torch.Tensor]:
        outputs = [fn(b, list(range(b * batch_size, min((b + 1) * batch_size, num_items)))) for b in batches]
        return {key: torch.cat([output[key] for output in outputs]) for key in outputs[0]}

    return run_sharded(run, math.ceil(num_items / batch_size), accelerator)


def extract_features(
    extractor: FeatureExtractor,
    images: torch.Tensor | ImageDataset,
    rows: Sequence[int] | None = None,
    batch_size: int = 64,
    accelerator: accelerate.Accelerator | None = None,
) -> dict[str, torch.Tensor]:
    """The extractor's outputs for uint8 images (N, C, H, W), or for `rows` of a dataset (its un-augmented pixels),
    computed in `distributed_batches` (the same on every process, whatever their number)."""
    rows = list(range(len(images))) if rows is None else list(rows)

    def run(_: int, batch: list[int]) -> dict[str, torch.Tensor]:
        selected = [rows[i] for i in batch]
        pixels = images[selected] if isinstance(images, torch.Tensor) else images.pixels(selected)
        return extractor(pixels)

    return distributed_batches(run, len(rows), batch_size, accelerator)


def nll_bits_per_dim(
    pipeline: DDPMPipeline,
    images: torch.Tensor | ImageDataset,
    rows: Sequence[int] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    accelerator: accelerate.Accelerator | None = None,
    clip_denoised: bool = True,
) -> torch.Tensor:
    """Per-image negative variational bound (N,) in bits/dim of uint8 images, through the scheduler.

    x0 = pixels / 127.5 - 1; `DDPMScheduler.vlb_bits_per_dim` with model_fn(x_t, t) = unet(x_t, t).sample sums
    the prior term and all T terms, with the predicted x_0 clamped to [-1, 1] in each unless not `clip_denoised`
    (see `DDPMScheduler.calc_bpd_loop`). Batches of `batch_size` images run timestep_batch = batch_size // images
    timesteps per UNet call; the noise of batch b comes from `sampling.image_generators(seed, [b])`, so the
    values depend on the batch size but not on the number of processes.
    """
    scheduler = pipeline.scheduler
    if not isinstance(scheduler, DDPMScheduler):
        scheduler = DDPMScheduler.from_config(scheduler.config)
    unet = pipeline.unet
    rows = list(range(len(images))) if rows is None else list(rows)

    def model_fn(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(xt.to(unet.dtype), t).sample

    def run(batch_index: int, batch: list[int]) -> dict[str, torch.Tensor]:
        selected = [rows[i] for i in batch]
        pixels = images[selected] if isinstance(images, torch.Tensor) else images.pixels(selected)
        x0 = pixels.to(unet.device).float() / 127.5 - 1
        generator = image_generators(seed, [batch_index])[0]  # seeded from (seed, batch_index) alone
        timestep_batch = max(1, batch_size // len(batch))
        nll = scheduler.vlb_bits_per_dim(
            model_fn, x0, generator=generator, timestep_batch=timestep_batch, clip_denoised=clip_denoised
        )
        return {"nll": nll}

    return distributed_batches(run, len(rows), batch_size, accelerator)["nll"]


def reference_stats(
    extractor: FeatureExtractor,
    reference: ImageDataset,
    rows: range,
    *,
    cache_dir: str | Path | None,
    labels: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    accelerator: accelerate.Accelerator | None = None,
) -> FeatureStats:
    """Feature statistics of reference `rows`, from the cache or computed (un-augmented pixels) and cached.

    The key holds the extractor's name, the dataset's content fingerprint, resolution, channels and rows, plus
    `labels` (dataset, config, split). `cache_dir=None` keeps them in memory for this process only. A disk cache
    is used only when every process finds the file; the main process writes it.
    """
    key = {
        "extractor": extractor.name,
        **(labels or {}),
        "fingerprint": reference.data._fingerprint,
        "resolution": reference.resolution,
        "channels": reference.channels,
        "num_images": len(rows),
        "rows": f"{rows.start}:{rows.stop}",
    }
    if cache_dir is None:
        memory_key = json.dumps(key, sort_keys=True, default=str)
        if memory_key not in _MEMORY_STATS:
            features = extract_features(extractor, reference, rows, batch_size, accelerator)["features"]
            _MEMORY_STATS[memory_key] = FeatureStats.from_features(features)
        return _MEMORY_STATS[memory_key]
    path = stats_cache_path(cache_dir, key)
    if all(gather_objects([path.is_file()], accelerator)):
        return FeatureStats.load(path)
    features = extract_features(extractor, reference, rows, batch_size, accelerator)["features"]
    stats = FeatureStats.from_features(features)
    if is_main(accelerator):
        stats.save(path, metadata=key)
    return stats


def _check_sizes(
    metrics: Sequence[str], extractors: Mapping[str, FeatureExtractor], num_samples: int, num_reference: int
) -> None:
    """Raise before any sampling unless each Gaussian the metrics fit has at least D + 1 points: the samples and
    the reference images for fid / fd_dinov2 / digits, and each half of the reference for digits_fd_real_halves."""
    for metric in metrics:
        if metric not in _FRECHET:
            continue
        dim = extractors[EXTRACTOR_OF[metric]].feature_dim
        sets = [("samples", num_samples), ("reference images", num_reference)]
        if metric == "digits":
            sets.append(("reference images per half (for digits_fd_real_halves)", num_reference // 2))
        for what, count in sets:
            try:
                check_enough_samples(count, dim, what)
            except ValueError as err:
                raise ConfigError(f"{metric}: {err}; raise --num_images or use more reference images") from None


def _compute_metrics(
    metrics: Sequence[str],
    *,
    samples: torch.Tensor | None,
    reference: ImageDataset | None,
    rows: range,
    pipeline: DDPMPipeline | None,
    extractors: Mapping[str, FeatureExtractor],
    num_samples: int,
    batch_size: int,
    seed: int,
    stats_cache_dir: str | Path | None,
    labels: Mapping[str, Any] | None,
    accelerator: accelerate.Accelerator | None,
    nll_clip_denoised: bool,
) -> dict[str, float]:
    """The values of `metrics` (see the module docstring) from samples, reference rows and the pipeline."""
    sample_outputs = {
        kind: extract_features(extractors[kind], samples, batch_size=batch_size, accelerator=accelerator)
        for kind in dict.fromkeys(EXTRACTOR_OF[m] for m in metrics if m != "nll")
    }

    def ref(kind: str) -> FeatureStats:
        return reference_stats(
            extractors[kind], reference, rows, cache_dir=stats_cache_dir, labels=labels, batch_size=batch_size,
            accelerator=accelerator,
        )  # fmt: skip

    results: dict[str, float] = {}
    for metric in metrics:
        outputs = sample_outputs.get(EXTRACTOR_OF.get(metric, ""))
        if metric in ("fid", "fd_dinov2"):
            fake = FeatureStats.from_features(outputs["features"])
            results[metric] = frechet_distance(fake, ref(EXTRACTOR_OF[metric]))
        elif metric == "kid":
            results["kid"] = kernel_inception_distance(outputs["features"], ref("inception").features, seed=seed)[0]
        elif metric == "inception_score":
            results["inception_score"] = inception_score(outputs["logits"])[0]
        elif metric == "digits":
            real = ref("digits")
            results["digits_confidence"] = confident_fraction(outputs["logits"], CONFIDENCE_THRESHOLD)
            results["digits_class_entropy"] = class_histogram_entropy(outputs["logits"])
            results["digits_fd"] = frechet_distance(FeatureStats.from_features(outputs["features"]), real)
            results["digits_fd_real_halves"] = _real_halves_distance(real.features, seed)
        elif metric == "nll":
            nll = nll_bits_per_dim(
                pipeline, reference, rows[:num_samples], batch_size, seed, accelerator, nll_clip_denoised
            )
            results["nll_bpd"] = float(nll.mean())
    return results


def _real_halves_distance(features: np.ndarray, seed: int) -> float:
    """Fréchet distance between two random halves of the reference features (a permutation seeded by `seed`)."""
    order = np.random.default_rng(seed).permutation(len(features))
    half = len(features) // 2
    first = FeatureStats.from_features(features[order[:half]])
    return frechet_distance(first, FeatureStats.from_features(features[order[half : 2 * half]]))


def _device(accelerator: accelerate.Accelerator | None) -> torch.device:
    if accelerator is not None:
        return accelerator.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_extractors(
    metrics: Sequence[str],
    *,
    feature_extractors: Mapping[str, FeatureExtractor] | None = None,
    inception_weights: str | Path | None = None,
    dinov2_model: str = DINOV2_DEFAULT,
    accelerator: accelerate.Accelerator | None = None,
) -> dict[str, FeatureExtractor]:
    """The extractors `metrics` need ("inception", "dinov2", "digits"), on the accelerator's device.

    `feature_extractors` supplies ready ones by kind (tests inject small random networks this way); the others are
    loaded, the main process first (it may download weights). Missing weights raise `MissingWeightsError` here,
    before any sampling.
    """
    extractors = {}
    for kind in dict.fromkeys(EXTRACTOR_OF[m] for m in metrics if m != "nll"):
        if feature_extractors and kind in feature_extractors:
            extractor = feature_extractors[kind]
        else:
            with accelerator.main_process_first() if accelerator else contextlib.nullcontext():
                extractor = build_feature_extractor(
                    kind, inception_weights=inception_weights, dinov2_model=dinov2_model
                )
        extractors[kind] = extractor.to(_device(accelerator))
    return extractors


def _check_channels(sample_channels: int, reference: ImageDataset | None) -> None:
    if reference is not None and sample_channels != reference.channels:
        raise ConfigError(
            f"the samples have {sample_channels} channel(s) but the reference images have {reference.channels}; "
            "pass --channels to match the model"
        )


def evaluate_pipeline(
    pipeline: DDPMPipeline,
    metric: str,
    num_samples: int,
    sampler: str,
    num_inference_steps: int | None,
    seed: int,
    reference: ImageDataset,
    accelerator: accelerate.Accelerator | None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    nll_clip_denoised: bool = True,
    feature_extractors: Mapping[str, FeatureExtractor] | None = None,
) -> dict[str, float]:
    """One metric of a pipeline in memory, for the training loop's `--eval_every`; writes no files.

    Samples `num_samples` images (for nll: scores the first `num_samples` rows of `reference`), compares them
    with all of `reference`, and returns the metric's values (e.g. the four digits_* values); `result_entries`
    turns them into eval_results.json entries. Reference statistics are kept in memory, so repeated calls with the
    same reference compute them once. Call it on every process.
    """
    metrics = check_metrics([metric])
    extractors = build_extractors(metrics, feature_extractors=feature_extractors, accelerator=accelerator)
    samples = None
    if metric != "nll":
        _check_sizes(metrics, extractors, num_samples, len(reference))
        _check_channels(pipeline.unet.config.in_channels, reference)
        samples = generate(
            pipeline, num_samples, sampler=sampler, num_inference_steps=num_inference_steps, seed=seed,
            batch_size=batch_size, accelerator=accelerator, progress=False,
        )  # fmt: skip
    return _compute_metrics(
        metrics, samples=samples, reference=reference, rows=range(len(reference)), pipeline=pipeline,
        extractors=extractors, num_samples=num_samples, batch_size=batch_size, seed=seed, stats_cache_dir=None,
        labels=None, accelerator=accelerator, nll_clip_denoised=nll_clip_denoised,
    )  # fmt: skip


def _training_dataset(folder: Path | None) -> dict[str, Any]:
    """The dataset arguments a training run recorded in its training_summary.json ({} if there is none)."""
    summary = folder / "training_summary.json" if folder else None
    if summary is None or not summary.is_file():
        return {}
    config = json.loads(summary.read_text()).get("config", {})
    names = ("dataset_name", "dataset_config_name", "train_data_dir", "image_column", "center_crop", "cache_dir")
    return {name: config[name] for name in names if name in config}


def _sample_size(sample_size: int | Sequence[int]) -> int:
    return sample_size if isinstance(sample_size, int) else sample_size[0]


def evaluate(
    model: str,
    evaluation: EvaluationArguments | None = None,
    sampling: SamplingArguments | None = None,
    data: DataArguments | None = None,
    *,
    accelerator: accelerate.Accelerator | None = None,
    feature_extractors: Mapping[str, FeatureExtractor] | None = None,
) -> dict[str, float]:
    """Evaluate `model` (a pipeline folder or Hub id) as scripts/evaluate.py does; returns {value name: value} on
    every process.

    `evaluation` says what to measure and where the results go, `sampling` how the samples are drawn (sampler
    default "ddpm"; with `evaluation.samples`, how those were made, for the record), `data` the reference images
    (when it names no dataset: those of the run's training_summary.json, else the built-in digits; resolution and
    channels default to the model's, or the samples'). Defaults: the dataclasses' own. `accelerator` spreads
    sampling, feature extraction and NLL over its processes; only the main process writes.
    `feature_extractors`: ready extractors by kind ("inception", "dinov2", "digits") instead of the standard ones.
    """
    evaluation = evaluation or EvaluationArguments()
    sampling = sampling or SamplingArguments()
    data = data or DataArguments()
    metrics = evaluation.metric_names
    folder = Path(model) if Path(model).is_dir() else None
    generating = evaluation.samples is None and any(m != "nll" for m in metrics)
    sampler = sampling.sampler or "ddpm"
    steps = sampling.num_inference_steps or default_steps(sampler)
    extractors = build_extractors(
        metrics, feature_extractors=feature_extractors, inception_weights=evaluation.inception_weights,
        dinov2_model=evaluation.dinov2_model, accelerator=accelerator,
    )  # fmt: skip
    pipeline = None
    if evaluation.samples is None or "nll" in metrics:
        pipeline = load_pipeline(model, allow_pickle=sampling.allow_pickle).to(_device(accelerator))
        if sampling.torch_compile:
            compile_for_sampling(pipeline, sampling.batch_size)
    samples = None
    if evaluation.samples is not None:
        samples = load_images(evaluation.samples)
        if evaluation.num_images is not None and evaluation.num_images > len(samples):
            raise ConfigError(
                f"--num_images is {evaluation.num_images} but --samples {evaluation.samples} holds only "
                f"{len(samples)} images"
            )
        samples = samples[: evaluation.num_images]
    n = len(samples) if samples is not None else evaluation.num_images or DEFAULT_NUM_SAMPLES

    config = pipeline.unet.config if pipeline is not None else None
    sample_channels = samples.shape[1] if samples is not None else config.in_channels
    resolution = data.resolution or (samples.shape[-1] if config is None else _sample_size(config.sample_size))
    if data.dataset_name is None and data.train_data_dir is None:
        data = replace(data, **_training_dataset(folder))
    reference, rows = None, range(0)
    heldout_last = evaluation.heldout_last
    if metrics != ["inception_score"]:
        with accelerator.main_process_first() if accelerator else contextlib.nullcontext():
            reference = load_data(data, resolution, evaluation.channels or sample_channels)
        if heldout_last is not None and heldout_last > len(reference):
            raise ConfigError(f"--heldout_last is {heldout_last} but the reference split has {len(reference)} images")
        rows = range(len(reference) - (heldout_last or len(reference)), len(reference))
        _check_channels(sample_channels, reference)
    _check_sizes(metrics, extractors, n, len(rows))

    if generating:
        samples = generate(
            pipeline, n, sampler=sampler, num_inference_steps=steps, seed=sampling.seed,
            batch_size=sampling.batch_size, accelerator=accelerator, progress=is_main(accelerator),
        )  # fmt: skip
    dataset = dataset_label(data.dataset_name, data.train_data_dir)
    rows_label = split_label(data.split, last=heldout_last)
    stats_cache_dir = evaluation.stats_cache_dir if evaluation.stats_cache_dir is not None else DEFAULT_STATS_CACHE
    results = _compute_metrics(
        metrics, samples=samples, reference=reference, rows=rows, pipeline=pipeline, extractors=extractors,
        num_samples=n, batch_size=sampling.batch_size, seed=sampling.seed, stats_cache_dir=stats_cache_dir,
        labels={"dataset": dataset, "config": data.dataset_config_name, "split": rows_label},
        accelerator=accelerator, nll_clip_denoised=evaluation.nll_clip_denoised,
    )  # fmt: skip

    output_json = evaluation.output
    if output_json is None and folder is not None:
        output_json = folder / RESULTS_FILE
    if output_json is not None and is_main(accelerator):
        setup = (sampler, steps) if generating else (sampling.sampler, sampling.num_inference_steps)
        entries = result_entries(
            results, sampler=setup[0], num_inference_steps=setup[1], num_samples=n, num_reference=len(rows),
            seed=sampling.seed, batch_size=sampling.batch_size, nll_clip_denoised=evaluation.nll_clip_denoised,
            dataset=dataset, split=rows_label,
        )  # fmt: skip
        save_results(output_json, entries, model_folder=folder if evaluation.model_card else None)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return results
