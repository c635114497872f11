"""eval_results.json: each measured value as an entry with what reproduces it, merged into the file, and the
model card that shows them refreshed.

    >>> entries = result_entries({"fid": 12.3}, sampler="ddim", num_inference_steps=50, num_samples=10_000,
    ...                          num_reference=50_000, seed=0, batch_size=64, nll_clip_denoised=True,
    ...                          dataset="uoft-cs/cifar10", split="train")
    >>> save_results("output/eval_results.json", entries, model_folder=Path("output"))   # and output/README.md

`scripts/evaluate.py` and the training loop's `--eval_every` (its `best/` export) write the same schema; the
model card (`hf_ddpm.model_card`) reads it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_ddpm.atomic import write_json
from hf_ddpm.data import BUILTIN_DIGITS
from hf_ddpm.model_card import REFERENCE_ONLY_VALUES, write_model_card

RESULTS_FILE = "eval_results.json"
# A new result replaces an old one with the same key; clipped and unclipped NLL are different results.
_RESULT_KEY = ("metric", "sampler", "num_inference_steps", "clip_denoised", "dataset", "split")


def dataset_label(dataset_name: str | None, train_data_dir: str | None) -> str:
    """The "dataset" of an eval_results.json entry: the folder, else the dataset name, else the built-in digits."""
    return train_data_dir or dataset_name or BUILTIN_DIGITS


def split_label(split: str, first: int | None = None, last: int | None = None) -> str:
    """The "split" of an entry, in datasets' slicing notation: "train", "train[:N]" (first N), "train[-N:]"."""
    if first is not None:
        return f"{split}[:{first}]"
    return f"{split}[-{last}:]" if last is not None else split


def result_entries(
    results: Mapping[str, float],
    *,
    sampler: str | None,
    num_inference_steps: int | None,
    num_samples: int,
    num_reference: int,
    seed: int,
    batch_size: int,
    nll_clip_denoised: bool,
    dataset: str,
    split: str,
) -> list[dict[str, Any]]:
    """The eval_results.json entries of `results` ({value name: value}), each with what reproduces it.

    Every entry has metric, value, sampler, num_inference_steps, num_samples, seed, batch_size, clip_denoised,
    dataset and split. Sample metrics record the sampler and steps that made their `num_samples` samples (None:
    scored from saved samples of unrecorded origin); nll_bpd and digits_fd_real_halves use reference images only,
    so their sampler and steps are None and num_samples counts the reference images used. batch_size and
    clip_denoised change the NLL (its noise is seeded per batch) and are None for every other value.
    """
    counts = {"nll_bpd": min(num_samples, num_reference), "digits_fd_real_halves": num_reference}
    sampling = {"sampler": sampler, "num_inference_steps": num_inference_steps}
    nll_setup = {"batch_size": batch_size, "clip_denoised": nll_clip_denoised}
    return [
        {
            "metric": metric,
            "value": value,
            **{key: None if metric in REFERENCE_ONLY_VALUES else v for key, v in sampling.items()},
            "num_samples": counts.get(metric, num_samples),
            "seed": seed,
            **{key: v if metric == "nll_bpd" else None for key, v in nll_setup.items()},
            "dataset": dataset,
            "split": split,
        }
        for metric, value in results.items()
    ]


def merge_eval_results(path: str | Path, entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Write `entries` into the eval_results.json at `path`, replacing earlier entries with the same
    (metric, sampler, num_inference_steps, clip_denoised, dataset, split); returns the file's new list of results."""
    path = Path(path)
    old = json.loads(path.read_text()).get("results", []) if path.is_file() else []
    new_keys = {tuple(entry[k] for k in _RESULT_KEY) for entry in entries}
    merged = [e for e in old if tuple(e.get(k) for k in _RESULT_KEY) not in new_keys] + [dict(e) for e in entries]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"results": merged})
    return merged


def save_results(path: str | Path, entries: Sequence[Mapping[str, Any]], model_folder: Path | None = None) -> None:
    """`merge_eval_results(path, entries)`, then re-render the model card of `model_folder` if it shows the
    results of `path` (its own eval_results.json); a card edited by hand is kept (see `write_model_card`)."""
    merge_eval_results(path, entries)
    if model_folder is not None and Path(path).resolve() == (model_folder / RESULTS_FILE).resolve():
        write_model_card(model_folder)
