"""The evaluation driver end to end on a tiny untrained model, with small random feature extractors injected."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PYTHON, REPO_ROOT
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from hf_ddpm import evaluation
from hf_ddpm.data import digits_images, load_image_dataset
from hf_ddpm.errors import MissingWeightsError
from hf_ddpm.evaluation import EvaluationArguments, evaluate, evaluate_pipeline, evaluator, extract_features
from hf_ddpm.evaluation.feature_extractors import DINOv2Features, FeatureExtractor
from hf_ddpm.pipeline import DDPMPipeline
from hf_ddpm.presets import build_unet
from hf_ddpm.sampling import SamplingArguments, image_generators
from hf_ddpm.scheduler import DDPMScheduler

ENTRY_KEYS = {"metric", "value", "sampler", "num_inference_steps", "num_samples", "seed", "batch_size", "clip_denoised",
              "dataset", "split"}  # fmt: skip


class TinyFeatures(FeatureExtractor):
    """A seeded random conv net standing in for Inception: features (B, 16) and logits (B, 10)."""

    feature_dim = 16

    def __init__(self, name: str = "tiny-random", seed: int = 0):
        super().__init__()
        self.name = name
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8 * 4 * 4, self.feature_dim)
        self.classes = nn.Linear(self.feature_dim, 10)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float().expand(-1, 3, -1, -1) / 255
        features = torch.tanh(self.head(F.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4).flatten(1)))
        return {"features": features, "logits": 5 * self.classes(features)}


def tiny_dinov2() -> DINOv2Features:
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=14, patch_size=7
    )
    return DINOv2Features(Dinov2Model(config), image_size=14)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """An untrained tiny-8 (grayscale 8x8) pipeline with a 10-step schedule, so that NLL has 10 + 1 terms."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    DDPMPipeline(unet=build_unet("tiny-8"), scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(folder)
    return folder


@pytest.fixture
def model_dir(saved_model, tmp_path) -> Path:
    """A fresh copy of the saved model per test (evaluate writes eval_results.json and README.md into it)."""
    return Path(shutil.copytree(saved_model, tmp_path / "model"))


@pytest.mark.parametrize("clip_denoised", [True, False])
def test_nll_through_the_evaluation_path_equals_the_summed_vlb_terms(saved_model, clip_denoised):
    pipeline = DDPMPipeline.from_pretrained(saved_model)
    images = torch.from_numpy(digits_images(8))[:6]
    # batches of 4 and 2 images
    got = evaluation.nll_bits_per_dim(pipeline, images, batch_size=4, seed=3, clip_denoised=clip_denoised)

    scheduler, unet = pipeline.scheduler, pipeline.unet
    expected = []
    for batch_index, rows in enumerate(([0, 1, 2, 3], [4, 5])):
        x0 = images[rows].float() / 127.5 - 1
        generator = image_generators(3, [batch_index])[0]
        total = scheduler.prior_bpd(x0)  # L_T
        for t in reversed(range(scheduler.config.num_train_timesteps)):  # eps drawn for t = T-1 first
            noise = torch.randn(x0.shape, generator=generator)
            timesteps = torch.full((len(rows),), t)
            xt = scheduler.q_sample(x0, timesteps, noise)
            with torch.no_grad():
                output = unet(xt, timesteps).sample
                total = total + scheduler.vlb_terms(output, x0, xt, timesteps, clip_denoised=clip_denoised)
        expected.append(total)
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)
    if clip_denoised:  # the default is the paper's clipped bound
        torch.testing.assert_close(evaluation.nll_bits_per_dim(pipeline, images, batch_size=4, seed=3), got)


def test_evaluate_end_to_end_writes_the_agreed_schema(model_dir, tmp_path):
    extractors = {"inception": TinyFeatures("tiny-inception"), "dinov2": tiny_dinov2()}
    measure = dict(num_images=24, heldout_last=60, stats_cache_dir=str(tmp_path / "stats"))
    sampling = SamplingArguments(sampler="ddim", num_inference_steps=2, batch_size=12)
    metrics = "fid,kid,inception_score,fd_dinov2,nll"
    results = evaluate(str(model_dir), EvaluationArguments(metrics, **measure), sampling, feature_extractors=extractors)
    assert set(results) == {"fid", "kid", "inception_score", "fd_dinov2", "nll_bpd"}
    assert all(isinstance(v, float) and v == v for v in results.values())
    assert results["fid"] > 0 and results["fd_dinov2"] > 0 and results["nll_bpd"] > 0
    assert 1 <= results["inception_score"] <= 10

    entries = {e["metric"]: e for e in json.loads((model_dir / "eval_results.json").read_text())["results"]}
    assert set(entries) == {"fid", "kid", "inception_score", "fd_dinov2", "nll_bpd"}
    assert all(set(entry) == ENTRY_KEYS for entry in entries.values())
    assert entries["fid"] == {"metric": "fid", "value": results["fid"], "sampler": "ddim", "num_inference_steps": 2,
                              "num_samples": 24, "seed": 0, "batch_size": None, "clip_denoised": None,
                              "dataset": "builtin:digits", "split": "train[-60:]"}  # fmt: skip
    assert entries["nll_bpd"]["sampler"] is None and entries["nll_bpd"]["num_samples"] == 24
    assert entries["nll_bpd"]["clip_denoised"] is True and entries["nll_bpd"]["batch_size"] == 12
    assert "FID" in (model_dir / "README.md").read_text()
    cached = sorted(p.name for p in (tmp_path / "stats").iterdir())
    assert len(cached) == 2 and cached[0].startswith("dinov2-") and cached[1].startswith("tiny-inception-")

    # Again: reference statistics come from the cache, and the new fid replaces the old entry.
    again = evaluate(str(model_dir), EvaluationArguments("fid", **measure), sampling, feature_extractors=extractors)
    assert again["fid"] == pytest.approx(results["fid"], rel=1e-9)
    report = json.loads((model_dir / "eval_results.json").read_text())["results"]
    assert [e["metric"] for e in report].count("fid") == 1 and len(report) == 5


def test_cli_takes_num_images_or_num_samples_and_records_nll_clipping(model_dir):
    main = runpy.run_path(str(REPO_ROOT / "scripts" / "evaluate.py"))["main"]
    common = [str(model_dir), "--metrics", "nll", "--batch_size", "4", "--seed", "1"]
    main([*common, "--num_images", "4"])
    main([*common, "--num_samples", "4", "--no_nll_clip_denoised"])  # the old name still works
    entries = json.loads((model_dir / "eval_results.json").read_text())["results"]
    assert [(e["clip_denoised"], e["num_samples"], e["seed"], e["batch_size"]) for e in entries] == [
        (True, 4, 1, 4), (False, 4, 1, 4)]  # fmt: skip
    assert entries[0]["value"] != entries[1]["value"]  # an untrained model predicts x_0 outside [-1, 1]
    card = (model_dir / "README.md").read_text()
    assert "| NLL (bits/dim), clipped x_0 |" in card and "| NLL (bits/dim), unclipped x_0 |" in card
    assert "--num_images 4 --seed 1 --batch_size 4 --no_nll_clip_denoised" in card


def test_eval_every_best_export_carries_its_results_and_card(tmp_path):
    from hf_ddpm.trainer import Trainer
    from hf_ddpm.training_args import parse_training_args

    out = tmp_path / "out"
    trainer = Trainer(parse_training_args([
        "--preset", "tiny-8", "--output_dir", str(out), "--max_train_samples", "160", "--report_to", "none",
        "--eval_every", "2", "--eval_metric", "digits", "--eval_num_samples", "70", "--preview_sampler", "ddim",
        "--preview_steps", "2", "--seed", "5",
    ]))  # fmt: skip
    trainer._evaluate(2, train_seconds=1.5)
    best = json.loads((out / "best" / "best_eval.json").read_text())
    values = {k: v for k, v in best.items() if k.startswith("digits")}
    assert trainer.eval_history == [{"global_step": 2, "train_seconds": 1.5, **values}]
    entries = {e["metric"]: e for e in json.loads((out / "best" / "eval_results.json").read_text())["results"]}
    assert all(set(entry) == ENTRY_KEYS for entry in entries.values())
    assert {metric: entry["value"] for metric, entry in entries.items()} == {k: best[k] for k in entries}
    assert entries["digits_fd"] == {
        "metric": "digits_fd", "value": best["digits_fd"], "sampler": "ddim", "num_inference_steps": 2,
        "num_samples": 70, "seed": 5, "batch_size": None, "clip_denoised": None, "dataset": "builtin:digits",
        "split": "train[:160]",
    }  # fmt: skip
    assert entries["digits_fd_real_halves"]["num_samples"] == 160
    card = (out / "best" / "README.md").read_text()
    assert f"| FD (digit classifier features) | {best['digits_fd']:.4g} | ddim | 2 | 70 | 5 |" in card
    assert "--metrics digits --sampler ddim --num_inference_steps 2 --num_images 70 --seed 5" in card


def test_digits_metric_from_saved_samples(model_dir, tmp_path):
    real = torch.from_numpy(digits_images(8))[:100]
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=real.permute(0, 2, 3, 1).numpy())
    out = tmp_path / "results.json"
    stats = str(tmp_path / "stats")
    results = evaluate(str(model_dir), EvaluationArguments("digits", samples=str(samples), output=str(out),
                                                           stats_cache_dir=stats))  # fmt: skip
    assert set(results) == {"digits_confidence", "digits_class_entropy", "digits_fd", "digits_fd_real_halves"}
    assert results["digits_confidence"] > 0.8 and results["digits_class_entropy"] > 0.95  # real digits
    entries = json.loads(out.read_text())["results"]
    assert {e["metric"]: e["num_samples"] for e in entries}["digits_fd_real_halves"] == 1797
    assert not (model_dir / "README.md").exists()  # results went elsewhere: the card is left alone


def test_evaluate_pipeline_for_the_training_loop(saved_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipeline = DDPMPipeline.from_pretrained(saved_model)
    reference = load_image_dataset(resolution=8, channels=1, max_train_samples=200)
    evaluator._MEMORY_STATS.clear()
    for _ in range(2):
        values = evaluate_pipeline(pipeline, "digits", 70, "ddim", 2, 0, reference, None)
        assert set(values) == {"digits_confidence", "digits_class_entropy", "digits_fd", "digits_fd_real_halves"}
        assert values["digits_confidence"] < 0.5  # an untrained model draws noise
    assert len(evaluator._MEMORY_STATS) == 1  # the reference was embedded once
    assert list(tmp_path.iterdir()) == []  # no files written


def test_bad_inputs_give_one_line_errors(model_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"^--metrics: unknown metric\(s\) \['bogus'\]; valid metrics: fid, kid, "):
        EvaluationArguments("fid,bogus")
    for bad in ({"num_images": 0}, {"heldout_last": -1}, {"num_images": 2.5}):
        with pytest.raises(ValueError, match=f"^--{next(iter(bad))} must be a positive integer"):
            EvaluationArguments(**bad)
    with pytest.raises(ValueError, match=r"digits: need at least D\+1 = 65 samples .* got 10"):
        evaluate(str(model_dir), EvaluationArguments("digits", num_images=10))
    with pytest.raises(ValueError, match=r"digits: need at least D\+1 = 65 reference images per half .* got 64"):
        evaluate(str(model_dir), EvaluationArguments("digits", num_images=100, heldout_last=129))  # halves of 64
    with pytest.raises(ValueError, match=r"the samples have 1 channel\(s\) but the reference images have 3"):
        evaluate(str(model_dir), EvaluationArguments("digits", num_images=100, channels=3))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="--inception_weights"):
        evaluate(str(model_dir), EvaluationArguments("fid", num_images=3000))
    assert not (model_dir / "eval_results.json").exists()


def test_cli_reports_missing_weights_in_one_line(model_dir, tmp_path):
    result = subprocess.run(
        [PYTHON, str(REPO_ROOT / "scripts" / "evaluate.py"), str(model_dir), "--metrics", "fid"],
        env={**os.environ, "TORCH_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the FID InceptionV3 weights are not on this machine")
    assert "weights-inception-2015-12-05-6726825d.pth" in last and f"{tmp_path}/hub/checkpoints" in last


WORKER = """
import sys
import torch
sys.path.insert(0, {tests!r})
from accelerate import Accelerator
from test_evaluation import TinyFeatures, run_for_gather_test

torch.set_num_threads(1)
accelerator = Accelerator()
assert accelerator.num_processes == 2, f"accelerate started {{accelerator.num_processes}} process(es), not 2"
out = run_for_gather_test({model!r}, {stats!r}, accelerator)
if accelerator.is_main_process:
    torch.save({{"world_size": accelerator.num_processes, **out}}, {result!r})
"""


def run_for_gather_test(model: str, stats: str, accelerator=None) -> dict:
    """What the 2-process test runs in each process, and in one process for comparison."""
    images = torch.randint(0, 256, (23, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    features = extract_features(TinyFeatures(), images, batch_size=5, accelerator=accelerator)
    measure = EvaluationArguments(
        "digits,fid,nll", num_images=66, heldout_last=150, stats_cache_dir=stats, output=str(Path(stats) / "eval.json")
    )
    sampling = SamplingArguments(sampler="ddim", num_inference_steps=2, batch_size=8)
    results = evaluate(
        model, measure, sampling, accelerator=accelerator, feature_extractors={"inception": TinyFeatures()}
    )
    return {"features": features, "results": results}


def test_two_process_gather_equals_one_process(saved_model, tmp_path):
    worker = tmp_path / "worker.py"
    result = tmp_path / "two.pt"
    worker.write_text(WORKER.format(tests=str(Path(__file__).parent), model=str(saved_model),
                                    stats=str(tmp_path / "stats2"), result=str(result)))  # fmt: skip
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }  # both sides run this checkout's hf_ddpm, not another installed copy
    cmd = [str(Path(PYTHON).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(worker)]  # fmt: skip
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    two = torch.load(result)
    assert two["world_size"] == 2
    one = run_for_gather_test(str(saved_model), str(tmp_path / "stats1"))
    for key in ("features", "logits"):
        torch.testing.assert_close(two["features"][key], one["features"][key])
    assert two["results"].keys() == one["results"].keys()
    for name, value in one["results"].items():
        assert two["results"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
