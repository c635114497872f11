"""The model card rendered from a training output folder: Hub-valid metadata, usable snippets, graceful gaps."""

from __future__ import annotations

import json
import logging
import re
import runpy
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_without_hf_ddpm
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from hf_ddpm.model_card import TAGS, card_was_edited, render_model_card, template_path, write_model_card

REPO = "alice/ddpm-mnist"
SECRET = "hf_" + "Secret0token" * 3
CONFIG = {
    "preset": "digits-16",
    "dataset_name": "ylecun/mnist",
    "resolution": 16,
    "train_batch_size": 16,
    "gradient_accumulation_steps": 2,
    "learning_rate": 0.001,
    "max_train_steps": 2000,
    "mixed_precision": "bf16",
    "prediction_type": "epsilon",
    "use_ema": True,
    "hub_model_id": REPO,
    "hub_token": SECRET,
    "seed": 0,
}
RESULTS = {
    "global_step": 2000,
    "num_parameters": 1_512_345,
    "world_size": 4,
    "global_batch_size": 128,
    "wall_time_s": 3725.3,
    "images_per_second": 68.75,
    "final_loss": 0.0345,
    "hardware": "4x NVIDIA A100",
    "num_train_images": 60000,
    "dataset": "ylecun/mnist",
}
NO_NLL = {"batch_size": None, "clip_denoised": None}
EVALUATIONS = [
    {"metric": "fid", "value": 12.3456, "sampler": "ddpm", "num_inference_steps": 1000, "num_samples": 10000,
     "seed": 0, **NO_NLL, "dataset": "ylecun/mnist", "split": "test"},
    {"metric": "fid", "value": 14.1, "sampler": "dpmsolver++", "num_inference_steps": 20, "num_samples": 10000,
     "seed": 0, **NO_NLL, "dataset": "ylecun/mnist", "split": "test"},
    {"metric": "nll_bpd", "value": 1.23, "sampler": None, "num_inference_steps": None, "num_samples": 500,
     "seed": 3, "batch_size": 32, "clip_denoised": True, "dataset": "ylecun/mnist", "split": "test"},
    {"metric": "nll_bpd", "value": 1.31, "sampler": None, "num_inference_steps": None, "num_samples": 500,
     "seed": 3, "batch_size": 32, "clip_denoised": False, "dataset": "ylecun/mnist", "split": "test"},
]  # fmt: skip


def make_output(folder: Path, config: dict | None = None, evaluations: list | None = None) -> Path:
    """The JSON side of a training output (the card does not read weights)."""
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 16, "in_channels": 1}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    (folder / "samples.png").write_bytes(b"\x89PNG")
    summary = {"config": CONFIG if config is None else config, "results": RESULTS}
    (folder / "training_summary.json").write_text(json.dumps(summary))
    if evaluations is not None:
        (folder / "eval_results.json").write_text(json.dumps({"results": evaluations}))
    return folder


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_card_metadata_parses_with_huggingface_hub_and_round_trips_the_metrics(tmp_path: Path) -> None:
    path = write_model_card(make_output(tmp_path / "out", evaluations=EVALUATIONS), repo_id=REPO)

    card = ModelCard.load(path)
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.tags == TAGS
    assert card.data.datasets == ["ylecun/mnist"]
    assert card.data.model_name == "ddpm-mnist"

    metadata = metadata_load(path)
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "ddpm-mnist"
    assert [(r.metric_type, r.metric_value, r.dataset_type, r.dataset_split) for r in results] == [
        (e["metric"], e["value"], e["dataset"], e["split"]) for e in EVALUATIONS
    ]
    assert results[1].metric_args == {"sampler": "dpmsolver++", "num_inference_steps": 20, "num_samples": 10000,
                                      "seed": 0}  # fmt: skip
    assert results[1].metric_name == "FID (dpmsolver++, 20 steps, 10000 samples)"
    assert results[2].metric_args == {"num_samples": 500, "seed": 3, "batch_size": 32, "clip_denoised": True}
    assert results[2].metric_name == "NLL (bits/dim), clipped x_0 (500 samples)"
    assert results[3].metric_name == "NLL (bits/dim), unclipped x_0 (500 samples)"
    assert {r.task_type for r in results} == {"unconditional-image-generation"}
    assert [r.metric_value for r in card.data.eval_results] == [e["value"] for e in EVALUATIONS]


def test_card_body_has_samples_usage_training_and_evaluation(tmp_path: Path) -> None:
    text = str(render_model_card(make_output(tmp_path / "out", evaluations=EVALUATIONS), repo_id=REPO))

    assert "# ddpm-mnist" in text and "![samples](samples.png)" in text
    plain, fast = python_blocks(text)
    assert f'DDPMPipeline.from_pretrained("{REPO}")' in plain and f'DDPMPipeline.from_pretrained("{REPO}")' in fast
    # the card names dpmsolver++-20, the best-measured few-step sampler; the model saved no scheduler config
    assert "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config" in fast
    assert 'timestep_spacing="trailing", thresholding=True' in fast
    assert "num_inference_steps=20" in fast and "np.random.SeedSequence((0, i))" in fast
    for block in (plain, fast):
        compile(block, "snippet", "exec")
    for row in [
        "| Preset | `digits-16` |",
        "| Parameters | 1.51M (1,512,345) |",
        "| Dataset | [ylecun/mnist](https://huggingface.co/datasets/ylecun/mnist) (60,000 images) |",
        "| Resolution | 16×16 |",
        "| Training steps | 2000 |",
        "| Batch size per device | 16 |",
        "| Global batch size | 128 (4 process(es) × 2 accumulation step(s)) |",
        "| Learning rate | 0.001 |",
        "| Mixed precision | bf16 |",
        "| EMA | yes |",
        "| Hardware | 4x NVIDIA A100 |",
        "| Wall time | 1h 02m 05s |",
        "| Throughput | 68.8 images/s |",
        "| FID | 12.35 | ddpm | 1000 | 10,000 | 0 | ylecun/mnist / test |",
        "| NLL (bits/dim), clipped x_0 | 1.23 | – | – | 500 | 3 | ylecun/mnist / test |",
        "| NLL (bits/dim), unclipped x_0 | 1.31 | – | – | 500 | 3 | ylecun/mnist / test |",
    ]:
        assert row in text, row
    assert "16×16 grayscale images" in text
    assert "Not evaluated yet." not in text


def test_card_shows_the_evaluate_command_that_measures_each_figure_again(tmp_path: Path) -> None:
    heldout = {"metric": "digits_fd", "value": 30.5, "sampler": "ddim", "num_inference_steps": 50, "num_samples": 256,
               "seed": 7, **NO_NLL, "dataset": "builtin:digits", "split": "train[-297:]"}  # fmt: skip
    evaluations = [*EVALUATIONS, heldout]
    text = str(render_model_card(make_output(tmp_path / "out", evaluations=evaluations), repo_id=REPO))

    commands = re.findall(r"^python scripts/evaluate\.py .*$", text, flags=re.MULTILINE)
    assert len(commands) == len(evaluations)
    parse_args = runpy.run_path(str(REPO_ROOT / "scripts" / "evaluate.py"))["parse_args"]
    for entry, command in zip(evaluations, commands, strict=True):
        model, measure, sampling, data = parse_args(shlex.split(command)[2:])
        assert model == REPO
        assert (sampling.sampler, sampling.num_inference_steps, measure.num_images, sampling.seed) == (
            entry["sampler"], entry["num_inference_steps"], entry["num_samples"], entry["seed"])  # fmt: skip
        if entry["metric"] == "nll_bpd":
            assert (measure.metrics, sampling.batch_size, measure.nll_clip_denoised) == (
                "nll", 32, entry["clip_denoised"])  # fmt: skip
        split = f"{data.split}[-{measure.heldout_last}:]" if measure.heldout_last else data.split
        assert split == entry["split"]
        # the run's own training data is evaluate.py's default reference; another dataset is named
        assert data.dataset_name == (None if entry["dataset"] == "ylecun/mnist" else entry["dataset"])
    assert parse_args(shlex.split(commands[-1])[2:])[1].metrics == "digits"


def test_sampler_quality_claims_come_only_from_eval_results(tmp_path: Path) -> None:
    unmeasured = str(render_model_card(make_output(tmp_path / "a", evaluations=EVALUATIONS[:1])))
    measured = str(render_model_card(make_output(tmp_path / "b", evaluations=EVALUATIONS)))
    for text in (unmeasured, measured):
        assert "similar quality" not in text
    assert "20 steps instead of 1000 (its sample quality on this model has not been measured)" in unmeasured
    few_steps_only = [e for e in EVALUATIONS if e["sampler"] == "dpmsolver++"]  # no DDPM-1000 figure to compare
    assert "measured here with `dpmsolver++` at 20 steps: FID 14.1)" in str(
        render_model_card(make_output(tmp_path / "c", evaluations=few_steps_only)))  # fmt: skip
    assert "SDE-DPM-Solver++(2M)" in unmeasured, "unmeasured, the card recommends hf_ddpm's recommended sampler"
    assert ("(measured here with `dpmsolver++` at 20 steps: FID 14.1, against 12.35 with `ddpm` at "
            "1000 steps)") in measured  # fmt: skip


def test_entries_without_seed_or_clipping_say_so(tmp_path: Path) -> None:
    old = [{"metric": "nll_bpd", "value": 1.5, "sampler": None, "num_inference_steps": None, "num_samples": 100,
            "dataset": "ylecun/mnist", "split": "test"}]  # fmt: skip
    text = str(render_model_card(make_output(tmp_path / "out", evaluations=old)))
    assert "| NLL (bits/dim), x_0 clipping not recorded | 1.5 | – | – | 100 | – | ylecun/mnist / test |" in text
    assert "python scripts/evaluate.py" not in text
    assert "Not reproducible from this card (" in text and "): NLL (bits/dim), x_0 clipping not recorded." in text


def test_card_never_contains_a_token(tmp_path: Path) -> None:
    config = {**CONFIG, "push_token": "another-secret"}
    text = str(render_model_card(make_output(tmp_path / "out", config=config)))
    assert SECRET not in text and "another-secret" not in text and "hub_token" not in text
    assert "hub_model_id: alice/ddpm-mnist" in text, "the other training arguments are listed"


def test_missing_fields_render_gracefully(tmp_path: Path) -> None:
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")

    card = render_model_card(folder)
    text = str(card)
    assert "No training summary was found." in text and "Not evaluated yet." in text
    assert "![samples]" not in text and "All training arguments" not in text
    assert f'DDPMPipeline.from_pretrained("{folder}")' in text, "without a repo id the snippet loads the folder"
    assert ModelCard(text).data.to_dict() == {
        "library_name": "diffusers",
        "license": "apache-2.0",
        "pipeline_tag": "unconditional-image-generation",
        "tags": TAGS,
    }


def test_builtin_or_local_datasets_are_not_listed_as_hub_datasets(tmp_path: Path) -> None:
    config = {**CONFIG, "dataset_name": "builtin:digits"}
    out = make_output(tmp_path / "out", config=config)
    summary = json.loads((out / "training_summary.json").read_text())
    summary["results"]["dataset"] = "builtin:digits"
    (out / "training_summary.json").write_text(json.dumps(summary))

    card = render_model_card(out, base_model="google/ddpm-cifar10-32")
    assert card.data.datasets is None
    assert card.data.base_model == "google/ddpm-cifar10-32"
    assert "| Dataset | builtin:digits (60,000 images) |" in str(card)
    assert "Fine-tuned from [google/ddpm-cifar10-32](https://huggingface.co/google/ddpm-cifar10-32)." in str(card)


def test_repo_id_defaults_to_the_runs_hub_model_id(tmp_path: Path) -> None:
    text = str(render_model_card(make_output(tmp_path / "out")))
    assert f'DDPMPipeline.from_pretrained("{REPO}")' in text


@pytest.mark.parametrize(
    ("edit", "edited"),
    [(lambda t: t, False), (lambda t: t.replace("## Usage", "## How to use"), True), (lambda t: "# mine\n", True)],
    ids=["untouched", "edited", "foreign"],
)
def test_card_was_edited_tells_generated_cards_from_edited_ones(
    tmp_path: Path, edit: Callable[[str], str], edited: bool
) -> None:
    path = write_model_card(make_output(tmp_path / "out"), repo_id=REPO)
    assert card_was_edited(edit(path.read_text(encoding="utf-8"))) is edited


def test_write_model_card_keeps_a_hand_edited_card_unless_told_to_overwrite(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = make_output(tmp_path / "out", evaluations=EVALUATIONS[:1])
    path = write_model_card(out, repo_id=REPO)
    path.write_text(path.read_text(encoding="utf-8").replace("## Usage", "## How to use"), encoding="utf-8")
    edited = path.read_text(encoding="utf-8")
    (out / "eval_results.json").write_text(json.dumps({"results": EVALUATIONS}))

    with caplog.at_level(logging.WARNING, logger="hf_ddpm.model_card"):
        assert write_model_card(out, repo_id=REPO) == path
    assert path.read_text(encoding="utf-8") == edited
    assert f"kept {path}: it was edited by hand" in caplog.text
    write_model_card(out, repo_id=REPO, overwrite=True)
    assert "## Usage" in path.read_text(encoding="utf-8") and "unclipped x_0" in path.read_text(encoding="utf-8")


def test_template_is_found_in_the_checkout() -> None:
    assert template_path() == Path(__file__).resolve().parents[1] / "model_cards" / "ddpm.md.jinja"


@pytest.mark.parametrize("learned_variance", [False, True])
def test_every_snippet_the_card_shows_runs_in_plain_diffusers_for_its_model_kind(tmp_path, learned_variance):
    """Each python block of the card, run where hf_ddpm cannot be imported, samples the model it is written for;
    a learned-variance model gets the DDPM snippet only (plain diffusers' other schedulers crash on 2C outputs)."""
    import torch

    from hf_ddpm.pipeline import DDPMPipeline
    from hf_ddpm.presets import build_unet, learned_variance_unet
    from hf_ddpm.trainer import make_noise_scheduler
    from hf_ddpm.training_args import TrainingArguments

    torch.manual_seed(0)
    unet = build_unet("tiny-8")
    variance = "learned_range" if learned_variance else "fixed_small"
    if learned_variance:
        unet = learned_variance_unet(unet)
    scheduler = make_noise_scheduler(TrainingArguments(variance_type=variance))
    folder = tmp_path / "model"
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    blocks = python_blocks(str(render_model_card(folder)))
    assert len(blocks) == (1 if learned_variance else 2)
    for block in blocks:
        run_without_hf_ddpm(block.replace("batch_size=16", "batch_size=2").replace("range(16)", "range(2)"),
                            cwd=tmp_path)  # fmt: skip
        assert (tmp_path / "sample.png").is_file()
