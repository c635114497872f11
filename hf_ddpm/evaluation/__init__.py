"""Evaluation of DDPMs: sample quality (FID, KID, IS, FD_DINOv2, the offline digits metric) and NLL in bits/dim.

    >>> from hf_ddpm.evaluation import evaluate
"""

from hf_ddpm.evaluation.evaluator import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_NUM_SAMPLES,
    METRICS,
    RESULTS_FILE,
    check_metrics,
    dataset_label,
    distributed_batches,
    evaluate,
    evaluate_pipeline,
    extract_features,
    merge_eval_results,
    nll_bits_per_dim,
    result_entries,
    split_label,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_NUM_SAMPLES",
    "METRICS",
    "RESULTS_FILE",
    "check_metrics",
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
