"""Evaluate a DDPM: sample quality (FID, KID, IS, FD_DINOv2, the offline digits metric) and NLL in bits/dim.

    >>> from hf_ddpm.evaluation import EvaluationArguments, evaluate
    >>> from hf_ddpm.sampling import SamplingArguments
    >>> measure = EvaluationArguments(metrics="digits,nll", num_images=1000)
    >>> results = evaluate("output", measure, SamplingArguments(sampler="dpmsolver++"))
    >>> sorted(results)                 # also merged into output/eval_results.json, shown on output/README.md
    ['digits_class_entropy', 'digits_confidence', 'digits_fd', 'digits_fd_real_halves', 'nll_bpd']

The modules, one job each:

* `evaluator`: `evaluate` (a saved model, what scripts/evaluate.py runs, configured by `EvaluationArguments`,
  `hf_ddpm.sampling.SamplingArguments` and `hf_ddpm.data.DataArguments`) and `evaluate_pipeline` (a pipeline in
  memory, for `--eval_every`): samples, reference images, features and NLL over accelerate processes.
* `metrics`: Fréchet distance, KID, Inception Score and the digits summaries on plain feature arrays.
* `feature_extractors`: the networks behind them, uint8 images in, features out; `inception`: the TF-Inception
  port; `digits_classifier`: the small shipped CNN of the offline digits metric.
* `results`: eval_results.json entries (each value with what reproduces it), merged into the file, and the model
  card refreshed.

Metrics (names for `metrics`) and the values they report:

* fid -> "fid", kid -> "kid" (mean over subsets), inception_score -> "inception_score" (mean over 10 splits):
  TF-Inception features / logits. fd_dinov2 -> "fd_dinov2": DINOv2 ViT-B/14 CLS features.
* digits -> "digits_confidence" (fraction of samples whose top softmax probability is > 0.9),
  "digits_class_entropy" (entropy of the predicted-class histogram / log 10; 1 = all digits equally often),
  "digits_fd" (Fréchet distance of the digits classifier's penultimate features, samples vs reference) and
  "digits_fd_real_halves" (the same between two random halves of the reference: a floor for digits_fd; with
  N/2 images per half it carries more finite-sample bias than digits_fd, so read it as an order of magnitude).
* nll -> "nll_bpd": the negative variational bound in bits/dim (all T terms plus the prior, Ho et al. eq. 5 with
  the discretised decoder) averaged over the first `--num_images` reference images. By default every term clamps
  the predicted x_0 to [-1, 1] before forming the posterior mean, as the DDPM paper's code and improved-diffusion
  report NLL (`--no_nll_clip_denoised`: the unclipped bound); eval_results.json records which. Evaluate held-out
  images: `--split test`, or `--heldout_last N` for the last N rows of a split (the built-in digits have a single
  split: train with `--max_train_samples 1797-N`, evaluate with `--heldout_last N`).

Work is spread over accelerate processes: samples by `generate`; feature extraction and NLL in fixed global
batches, process p taking a contiguous run of them, gathered in order. Each batch is computed exactly as in a
single process (NLL noise is seeded per batch), so the results do not depend on the number of processes.
Reference statistics are cached as .npz (mu, sigma, features) in `--stats_cache_dir` (default
~/.cache/hf_ddpm/stats), keyed by extractor, dataset, config, split, resolution, channels, rows and the dataset's
content fingerprint; they are always computed from un-augmented pixels (`ImageDataset.pixels`).
"""

from hf_ddpm.evaluation.evaluator import (
    DEFAULT_BATCH_SIZE,
    METRICS,
    EvaluationArguments,
    distributed_batches,
    evaluate,
    evaluate_pipeline,
    extract_features,
    nll_bits_per_dim,
)
from hf_ddpm.evaluation.results import (
    RESULTS_FILE,
    dataset_label,
    merge_eval_results,
    result_entries,
    split_label,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "METRICS",
    "EvaluationArguments",
    "RESULTS_FILE",
    "dataset_label",
    "distributed_batches",
    "evaluate",
    "evaluate_pipeline",
    "extract_features",
    "merge_eval_results",
    "nll_bits_per_dim",
    "result_entries",
    "split_label",
]
