"""Pushing a training output to a Hub and loading it back by repo id, against the local fake Hub (hub_server.py).

Pushes run in-process with the real hf_ddpm.hub code (the endpoint passed explicitly). Loading by repo id runs
in fresh subprocesses, because huggingface_hub and diffusers read HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_CACHE when
imported: one with plain diffusers where hf_ddpm cannot be imported, one with hf_ddpm.hub.load_pipeline, and one
offline from the cache the previous one filled.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from conftest import run_without_hf_ddpm
from hub_server import HubServer
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants
from PIL import Image

import hf_ddpm.hub
import hf_ddpm.trainer
from hf_ddpm.errors import ConfigError
from hf_ddpm.hub import TOKEN_HINT, BackgroundPusher, HubError, check_push_access, load_pipeline, push_to_hub, redact
from hf_ddpm.model_card import card_was_edited, write_model_card
from hf_ddpm.pipeline import DDPMPipeline
from hf_ddpm.trainer import Trainer, train
from hf_ddpm.training_args import parse_training_args

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_" + "Alice0token" * 3  # alice's, shaped like a real token
BOB_TOKEN = "bob-plain-secret-4242"  # valid for bob, not shaped like a token: must be masked by value
BAD_TOKEN = "not-a-valid-token-9876"
READ_TOKEN = "alice-read-only-1234"  # alice's, but it may not write
ORG = "ddpm-lab"  # alice may write there
REPO = "alice/ddpm-tiny"
PIPELINE_FILES = {
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
}
OUTPUT_FILES = PIPELINE_FILES | {"samples.png", "training_summary.json", "eval_results.json"}


def sample_images(pipe, path):  # no annotations: its source also runs in the subprocesses
    """A few DDPM steps, then a few DPM-Solver++ steps as in the card's snippet; saved to `path` (.npz)."""
    import numpy as np
    import torch
    from diffusers import DPMSolverMultistepScheduler

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order in every process
    try:
        out = {
            "ddpm": pipe(
                batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np"
            ).images
        }
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        out["dpm"] = pipe(
            batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images
    finally:
        torch.set_num_threads(threads)
    np.savez(path, **out)


# Run by conftest.run_without_hf_ddpm, whose prologue makes hf_ddpm unimportable (PYTHONPATH points at the
# checkout all the same); the report proves it stayed so.
PLAIN_DIFFUSERS = """
import importlib.util, json, sys
from diffusers import DDPMPipeline
{sample_source}
pipe = DDPMPipeline.from_pretrained({repo!r})
sample_images(pipe, {out!r})
print(json.dumps({{
    "hf_ddpm_importable": importlib.util.find_spec("hf_ddpm") is not None,
    "hf_ddpm_modules": sorted(m for m in sys.modules if m.split(".")[0] == "hf_ddpm"),
    "classes": [type(pipe).__module__, type(pipe.unet).__module__],
}}))
"""

HF_DDPM_LOADS = f"""
import json, sys
from hf_ddpm.hub import HubError, load_pipeline
{inspect.getsource(sample_images)}
cfg = json.loads(sys.argv[1])
pipe = load_pipeline(**cfg["load"])
sample_images(pipe, cfg["out"])
errors = {{}}
for name, kwargs in cfg["errors"].items():
    try:
        load_pipeline(**kwargs)
        errors[name] = None
    except HubError as err:
        errors[name] = str(err)
print(json.dumps({{"class": type(pipe).__module__, "errors": errors}}))
"""


def client_env(hub: HubServer, home: Path, cache: Path, offline: bool = False) -> dict[str, str]:
    """The environment of a fresh process that uses the fake Hub: no login, no xet, its own HF cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "PYTHON", "TRANSFORMERS"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(home),
        HF_HUB_CACHE=str(cache),
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        PYTHONPATH=str(ROOT),
    )
    return env


def run_python(code: str, *args: str, hub: HubServer, cwd: Path, cache: Path, offline: bool = False) -> dict:
    """Run `code` in a fresh interpreter pointed at the fake Hub; return the JSON its last stdout line holds."""
    command = [sys.executable, "-c", code, *args]
    env = client_env(hub, cwd / "hf-home", cache, offline)
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_script(*args: str, hub: HubServer, cwd: Path, token: str | None = None) -> subprocess.CompletedProcess:
    """scripts/push_to_hub.py in a fresh process pointed at the fake Hub (HF_TOKEN=`token` if given)."""
    env = client_env(hub, cwd / "hf-home", cwd / "cache")
    env.update({"HF_TOKEN": token} if token else {})
    command = [sys.executable, str(ROOT / "scripts" / "push_to_hub.py"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def make_output_dir(folder: Path, seed: int = 0) -> Path:
    """A trained-shape output folder: tiny pipeline, samples, summaries, card, checkpoints/ and logs/."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )
    DDPMPipeline(unet, diffusers.DDPMScheduler()).save_pretrained(folder)
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(folder / "samples.png")
    summary = {
        "config": {
            "preset": "tiny-8",
            "dataset_name": "builtin:digits",
            "resolution": 8,
            "train_batch_size": 4,
            "hub_model_id": REPO,
            "seed": seed,
        },
        "results": {
            "global_step": 10,
            "num_parameters": sum(p.numel() for p in unet.parameters()),
            "world_size": 1,
            "global_batch_size": 4,
            "hardware": "2x CPU cores",
            "dataset": "builtin:digits",
        },
    }
    (folder / "training_summary.json").write_text(json.dumps(summary))
    results = [
        {
            "metric": "digits_fd",
            "value": 12.5,
            "sampler": "ddpm",
            "num_inference_steps": 1000,
            "num_samples": 256,
            "dataset": "builtin:digits",
            "split": "train",
        }
    ]
    (folder / "eval_results.json").write_text(json.dumps({"results": results}))
    write_model_card(folder)
    (folder / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-10" / "optimizer.bin").write_bytes(b"\0optimizer state")
    (folder / "logs").mkdir()
    (folder / "logs" / "events.out.tfevents.1.host").write_bytes(b"\0tensorboard")
    return folder


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder` with its mtime and content hash."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_output_dir(tmp_path_factory.mktemp("trained") / "output")


@pytest.fixture
def output_dir(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained output that a test may change."""
    return Path(shutil.copytree(trained, tmp_path / "output"))


@pytest.fixture(autouse=True)
def hub_client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """huggingface_hub in this process: online (conftest sets HF_HUB_OFFLINE=1 and HF_HUB_DISABLE_XET=1), no login."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_ddpm.hub, "RETRY_WAIT_S", 0.01)


@pytest.fixture
def hub() -> Iterator[HubServer]:
    tokens = {TOKEN: "alice", BOB_TOKEN: "bob", READ_TOKEN: "alice"}
    with HubServer(tokens=tokens, orgs={"alice": [ORG]}, read_only={READ_TOKEN}) as server:
        yield server


def push(folder: Path, hub: HubServer, repo_id: str = REPO, **kwargs: Any) -> str:
    return push_to_hub(folder, repo_id, token=kwargs.pop("token", TOKEN), endpoint=hub.url, **kwargs)


# ---------------------------------------------------------------- pushing


def test_push_uploads_pipeline_card_samples_and_metrics_but_not_checkpoints_logs_or_token(
    output_dir: Path, hub: HubServer
) -> None:
    before = snapshot(output_dir)
    url = push(output_dir, hub)

    files = hub.files(REPO)
    assert set(files) == OUTPUT_FILES | {"README.md", ".gitattributes"}
    assert url == f"{hub.url}/{REPO}/commit/{hub.repos[REPO].branches['main']}"
    for path in OUTPUT_FILES:
        assert files[path] == (output_dir / path).read_bytes(), path
    weights = hashlib.sha256(files["unet/diffusion_pytorch_model.safetensors"]).hexdigest()
    assert hub.requests_matching(f"/lfs-upload/{weights}", "PUT"), "weights must go through LFS"
    card = files["README.md"].decode()
    assert f'DDPMPipeline.from_pretrained("{REPO}")' in card and not card_was_edited(card)
    assert snapshot(output_dir) == before, "a push must not change the output folder"
    assert not [path for path in before if TOKEN.encode() in (output_dir / path).read_bytes()]
    assert not [r.path for r in hub.requests if TOKEN.encode() in r.body], "the token was sent as content"


def test_script_pushes_checkpoints_and_logs_when_asked_with_the_hf_token_variable(
    output_dir: Path, hub: HubServer, tmp_path: Path
) -> None:
    proc = run_script(
        str(output_dir), "--hub_model_id", REPO, "--push_checkpoints", "--push_logs", hub=hub, cwd=tmp_path, token=TOKEN
    )

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{hub.url}/{REPO}/commit/{hub.repos[REPO].branches['main']}"
    assert {"checkpoints/checkpoint-10/optimizer.bin", "logs/events.out.tfevents.1.host"} <= set(hub.files(REPO))
    assert {r.user for r in hub.requests_matching("/api/models/")} == {"alice"}
    assert TOKEN not in proc.stdout + proc.stderr


def test_script_reports_a_rejected_token_in_one_line(output_dir: Path, hub: HubServer, tmp_path: Path) -> None:
    proc = run_script(str(output_dir), "--hub_model_id", REPO, "--hub_token", BAD_TOKEN, hub=hub, cwd=tmp_path)

    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: the Hub rejected the token (401): {TOKEN_HINT} with a valid token"]
    assert BAD_TOKEN not in proc.stdout + proc.stderr
    assert REPO not in hub.repos


def test_script_refuses_a_bad_repo_id_in_one_line_before_any_request(
    output_dir: Path, hub: HubServer, tmp_path: Path
) -> None:
    """A bare switch may come before OUTPUT_DIR; the repo id is checked as its flag is parsed."""
    proc = run_script("--push_logs", str(output_dir), "--hub_model_id", "a//b", hub=hub, cwd=tmp_path, token=TOKEN)

    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --hub_model_id a//b is not a valid repo id")
    assert not hub.requests


def test_script_help_shows_defaults_but_not_for_the_required_repo_id() -> None:
    command = [sys.executable, str(ROOT / "scripts" / "push_to_hub.py"), "--help"]
    out = " ".join(subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout.split())
    assert "org/name of the Hub repo (created if missing) --hub_token" in out
    assert "replace a README edited on the Hub (default: False)" in out


def test_private_repo_is_created_private(output_dir: Path, hub: HubServer) -> None:
    push(output_dir, hub, private=True)
    assert hub.repos[REPO].private
    assert hub.files(REPO)["model_index.json"] == (output_dir / "model_index.json").read_bytes()
    with pytest.raises(Exception) as anonymous:
        HfApi(endpoint=hub.url, token=False).model_info(REPO)
    assert anonymous.value.response.status_code == 401


def test_a_name_without_namespace_goes_to_the_tokens_user(output_dir: Path, hub: HubServer) -> None:
    url = push(output_dir, hub, repo_id="ddpm-no-org")
    assert url.startswith(f"{hub.url}/alice/ddpm-no-org/commit/")
    assert 'DDPMPipeline.from_pretrained("alice/ddpm-no-org")' in hub.files("alice/ddpm-no-org")["README.md"].decode()


@pytest.mark.parametrize("fault", [{"status": 503}, {"disconnect": True}], ids=["503", "connection-dropped"])
def test_transient_failure_is_retried_then_succeeds(output_dir: Path, hub: HubServer, fault: dict) -> None:
    hub.fail_next(f"/api/models/{REPO}/commit/", **fault)
    push(output_dir, hub)
    assert len(hub.requests_matching("/commit/main", "POST")) == 2
    assert "model_index.json" in hub.files(REPO)


def test_client_errors_are_not_retried(output_dir: Path, hub: HubServer) -> None:
    hub.fail_next(f"/api/models/{REPO}/commit/", status=422)
    with pytest.raises(HubError, match=f"pushing to {REPO} failed: .*422"):
        push(output_dir, hub)
    assert len(hub.requests_matching("/commit/main", "POST")) == 1


def test_rerunning_a_failed_push_completes_it_without_uploading_again(output_dir: Path, hub: HubServer) -> None:
    hub.fail_next("/commit/", status=500, times=1)
    with pytest.raises(HubError, match="500"):
        push(output_dir, hub, max_retries=0)
    assert set(hub.files(REPO)) == {".gitattributes"}
    uploads = len(hub.requests_matching("/lfs-upload/", "PUT"))

    push(output_dir, hub)
    assert OUTPUT_FILES <= set(hub.files(REPO))
    assert len(hub.requests_matching("/lfs-upload/", "PUT")) == uploads, "LFS objects were uploaded again"
    commits = len(hub.requests_matching("/commit/main", "POST"))
    push(output_dir, hub)
    assert len(hub.requests_matching("/commit/main", "POST")) == commits, "an unchanged folder made a commit"


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (BAD_TOKEN, f"the Hub rejected the token (401): {TOKEN_HINT} with a valid token"),
        (None, f"no Hugging Face token found, and the Hub needs one to push: {TOKEN_HINT}"),
        (BOB_TOKEN, f"the token cannot write to {REPO} (403): {TOKEN_HINT} with a token that has write access"),
    ],
    ids=["bad-token", "no-token", "no-write-access"],
)
def test_token_problems_give_one_clear_line_without_the_token(
    output_dir: Path,
    hub: HubServer,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    token: str | None,
    message: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HubError) as failure:
        push(output_dir, hub, token=token)

    assert str(failure.value).startswith(message) and "\n" not in str(failure.value)
    captured = capsys.readouterr()
    for secret in (TOKEN, BOB_TOKEN, BAD_TOKEN):
        assert secret not in captured.out + captured.err + caplog.text
    assert REPO not in hub.repos


def test_a_readme_edited_on_the_hub_is_kept_unless_overwrite(
    output_dir: Path, hub: HubServer, caplog: pytest.LogCaptureFixture
) -> None:
    push(output_dir, hub)
    (output_dir / "eval_results.json").unlink()  # the card we would push changes: not evaluated any more
    push(output_dir, hub)
    generated = hub.files(REPO)["README.md"].decode()
    assert "Not evaluated yet." in generated, "an untouched generated card must be updated"

    edited = generated.replace("Not evaluated yet.", "Evaluated by hand: looks great.")
    HfApi(endpoint=hub.url, token=TOKEN).create_commit(
        REPO, operations=[CommitOperationAdd("README.md", edited.encode())], commit_message="edit card"
    )
    (output_dir / "samples.png").write_bytes(b"\x89PNG other samples")
    with caplog.at_level(logging.WARNING, logger="hf_ddpm.hub"):
        push(output_dir, hub)
    assert hub.files(REPO)["README.md"].decode() == edited
    assert hub.files(REPO)["samples.png"] == b"\x89PNG other samples", "the rest of the push goes on"
    assert "kept the README.md" in caplog.text and "--overwrite_model_card" in caplog.text

    push(output_dir, hub, overwrite_model_card=True)
    assert hub.files(REPO)["README.md"].decode() == generated


def test_a_readme_edited_locally_is_pushed_as_is(output_dir: Path, hub: HubServer) -> None:
    card = output_dir / "README.md"
    card.write_text(card.read_text() + "\nTrained for a talk; see slides.\n")
    push(output_dir, hub)
    assert hub.files(REPO)["README.md"] == card.read_bytes()


def test_a_file_holding_the_token_is_never_uploaded(output_dir: Path, hub: HubServer) -> None:
    summary = json.loads((output_dir / "training_summary.json").read_text())
    summary["config"]["hub_token"] = BOB_TOKEN
    (output_dir / "training_summary.json").write_text(json.dumps(summary))
    with pytest.raises(HubError, match="refusing to push: training_summary.json") as refused:
        push(output_dir, hub, token=BOB_TOKEN, repo_id="bob/leaky")
    assert BOB_TOKEN not in str(refused.value)
    assert hub.requests == [], "nothing may be sent before the check"


def test_push_refuses_offline_mode_and_non_pipeline_folders(
    output_dir: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(HubError, match="no model_index.json"):
        push(tmp_path, hub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1 is set"):
        push(output_dir, hub)


def test_redact_masks_the_token_and_token_shaped_strings() -> None:
    text = f"Authorization: Bearer {BOB_TOKEN}; other {TOKEN}"
    assert redact(text, BOB_TOKEN) == "Authorization: Bearer ***; other hf_***"


# ---------------------------------------------------------------- loading


def test_plain_diffusers_loads_the_pushed_repo_bit_identically(trained: Path, hub: HubServer, tmp_path: Path) -> None:
    push(trained, hub)
    sample_images(DDPMPipeline.from_pretrained(trained), tmp_path / "local.npz")

    code = PLAIN_DIFFUSERS.format(
        sample_source=inspect.getsource(sample_images), repo=REPO, out=str(tmp_path / "hub.npz")
    )
    env = client_env(hub, tmp_path / "hf-home", tmp_path / "cache")
    report = json.loads(run_without_hf_ddpm(code, cwd=tmp_path, env=env).stdout.strip().splitlines()[-1])

    assert report == {
        "hf_ddpm_importable": False,
        "hf_ddpm_modules": [],
        "classes": ["diffusers.pipelines.ddpm.pipeline_ddpm", "diffusers.models.unets.unet_2d"],
    }
    local, remote = np.load(tmp_path / "local.npz"), np.load(tmp_path / "hub.npz")
    for sampler in ("ddpm", "dpm"):
        assert local[sampler].shape == (2, 8, 8, 1)
        np.testing.assert_array_equal(remote[sampler], local[sampler])


def test_load_pipeline_by_revision_online_then_offline_and_its_errors(
    trained: Path, hub: HubServer, tmp_path: Path
) -> None:
    branch_output = make_output_dir(tmp_path / "other-run", seed=1)
    push(trained, hub)
    push(branch_output, hub, revision="exp")
    push(trained, hub, repo_id="alice/secret", private=True)
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("alice/sd-like")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    api.create_commit(
        "alice/sd-like",
        operations=[CommitOperationAdd("model_index.json", json.dumps(index).encode())],
        commit_message="not a DDPM",
    )
    api.create_repo("alice/unet-only")
    api.create_commit(
        "alice/unet-only", operations=[CommitOperationAdd("unet/config.json", b"{}")], commit_message="no pipeline"
    )
    sample_images(DDPMPipeline.from_pretrained(branch_output), tmp_path / "branch.npz")
    sample_images(DDPMPipeline.from_pretrained(trained), tmp_path / "main.npz")
    cache = tmp_path / "cache"

    config = {
        "load": {"repo_id_or_path": REPO, "revision": "exp"},
        "out": str(tmp_path / "exp.npz"),
        "errors": {
            "missing": {"repo_id_or_path": "alice/missing"},
            "private-no-token": {"repo_id_or_path": "alice/secret"},
            "private-bad-token": {"repo_id_or_path": "alice/secret", "token": BAD_TOKEN},
            "private-other-user": {"repo_id_or_path": "alice/secret", "token": BOB_TOKEN},
            "private-owner": {"repo_id_or_path": "alice/secret", "token": TOKEN},
            "missing-revision": {"repo_id_or_path": REPO, "revision": "nope"},
            "not-ddpm": {"repo_id_or_path": "alice/sd-like"},
            "no-model-index": {"repo_id_or_path": "alice/unet-only"},
        },
    }
    online = run_python(HF_DDPM_LOADS, json.dumps(config), hub=hub, cwd=tmp_path, cache=cache)

    assert online["class"] == "hf_ddpm.pipeline"
    branch, main, exp = (np.load(tmp_path / f"{name}.npz") for name in ("branch", "main", "exp"))
    np.testing.assert_array_equal(exp["ddpm"], branch["ddpm"])
    assert not np.array_equal(exp["ddpm"], main["ddpm"]), "the branch must hold the other run"
    errors = online["errors"]
    assert errors["private-owner"] is None
    assert errors["missing"].startswith("repository alice/missing not found on the Hub")
    assert errors["private-no-token"].endswith(f"if it is private, {TOKEN_HINT}")
    assert errors["private-bad-token"].startswith("the Hub rejected the token (401)")
    assert errors["private-other-user"].startswith("repository alice/secret not found on the Hub, or the token")
    assert errors["missing-revision"].startswith("revision 'nope' does not exist in alice/ddpm-tiny")
    assert errors["not-ddpm"].startswith("alice/sd-like is not a DDPM pipeline: its model_index.json describes")
    assert errors["no-model-index"] == "alice/unet-only is not a DDPM pipeline: the repo has no model_index.json"
    for message in errors.values():
        assert message is None or ("\n" not in message and BAD_TOKEN not in message and BOB_TOKEN not in message)

    requests = len(hub.requests)
    config.update(out=str(tmp_path / "offline.npz"), errors={"not-cached": {"repo_id_or_path": "alice/elsewhere"}})
    offline = run_python(HF_DDPM_LOADS, json.dumps(config), hub=hub, cwd=tmp_path, cache=cache, offline=True)

    assert len(hub.requests) == requests, "offline loading must not touch the network"
    np.testing.assert_array_equal(np.load(tmp_path / "offline.npz")["ddpm"], branch["ddpm"])
    assert offline["errors"]["not-cached"].startswith(
        f"HF_HUB_OFFLINE=1 is set and alice/elsewhere is not in the HF cache ({cache})"
    )


def test_load_pipeline_refuses_local_folders_that_are_not_ddpm_pipelines(tmp_path: Path) -> None:
    with pytest.raises(HubError, match="has no model_index.json"):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": [None, None]}))
    with pytest.raises(HubError, match="is not a DDPM pipeline: its model_index.json describes 'DDPMPipeline'"):
        load_pipeline(tmp_path)
    with pytest.raises(HubError, match="neither a local folder nor a valid Hub repo id"):
        load_pipeline(str(tmp_path / "missing" / "deeper"))


def test_load_pipeline_reads_a_local_training_output(trained: Path) -> None:
    pipe = load_pipeline(trained)
    assert isinstance(pipe, DDPMPipeline)
    assert ModelCard.load(trained / "README.md").data.library_name == "diffusers"


# ---------------------------------------------------------------- pushing from training


def test_training_pushes_every_n_checkpoints_and_at_the_end(hub: HubServer, tmp_path: Path) -> None:
    env = client_env(hub, tmp_path / "hf-home", tmp_path / "cache")
    command = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "--preset", "tiny-8", "--max_train_samples", "32",
        "--train_batch_size", "8", "--max_train_steps", "4", "--checkpointing_steps", "1", "--hub_push_every", "2",
        "--sample_every", "0", "--num_final_images", "4", "--final_sampler", "ddim", "--final_steps", "3",
        "--output_dir", "run", "--push_to_hub", "--hub_model_id", REPO, "--hub_token", TOKEN, "--hub_private_repo",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    repo = hub.repos[REPO]
    assert repo.private
    messages = [c.message for c in repo.commits.values() if "hf_ddpm" in c.message]
    assert any("step 2" in m for m in messages) and any("end of training" in m for m in messages), messages
    files = hub.files(REPO)
    assert PIPELINE_FILES | {"samples.png", "training_summary.json", "README.md"} <= set(files)
    assert not any(name.startswith(("checkpoints/", "logs/")) for name in files)
    assert f'DDPMPipeline.from_pretrained("{REPO}")' in files["README.md"].decode()
    assert TOKEN not in proc.stdout + proc.stderr
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------- access before training, failures during it


def train_args(output_dir: Path, *extra: str) -> list[str]:
    """A few tiny-8 steps that push to REPO."""
    return [
        "--preset", "tiny-8", "--max_train_samples", "16", "--train_batch_size", "8", "--sample_every", "0",
        "--num_final_images", "4", "--final_sampler", "ddim", "--final_steps", "2", "--output_dir", str(output_dir),
        "--push_to_hub", "--hub_model_id", REPO, *extra,
    ]  # fmt: skip


def pusher_for_this_hub(monkeypatch: pytest.MonkeyPatch, hub: HubServer) -> None:
    """In-process training pushes to `hub` (huggingface_hub read HF_ENDPOINT when this process imported it)."""
    monkeypatch.setattr(hf_ddpm.trainer, "BackgroundPusher", functools.partial(BackgroundPusher, endpoint=hub.url))


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (BAD_TOKEN, f"the Hub rejected the token (401): {TOKEN_HINT} with a valid token"),
        (None, f"no Hugging Face token found, and the Hub needs one to push: {TOKEN_HINT}"),
        (BOB_TOKEN, f"the token cannot write to {REPO}: it is bob's, who can write to bob; change --hub_model_id"),
        (READ_TOKEN, f"the token is read-only and cannot push to {REPO}: {TOKEN_HINT} with a write token"),
    ],
    ids=["bad-token", "no-token", "other-namespace", "read-only"],
)
def test_training_checks_hub_access_before_building_anything(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str | None, message: str
) -> None:
    pusher_for_this_hub(monkeypatch, hub)

    def build_model(*args: Any) -> None:
        raise AssertionError("the model was built before the Hub access check")

    monkeypatch.setattr(hf_ddpm.trainer, "build_model", build_model)
    with pytest.raises(HubError) as refused:
        Trainer(parse_training_args(train_args(tmp_path / "run", *(["--hub_token", token] if token else []))))

    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
    assert all(secret not in str(refused.value) for secret in (TOKEN, BOB_TOKEN, BAD_TOKEN, READ_TOKEN))
    assert {r.path for r in hub.requests} <= {"/api/whoami-v2"} and not hub.repos, "the check must create nothing"
    assert not (tmp_path / "run").exists()


def test_access_check_accepts_the_users_and_their_orgs_namespaces_and_names_a_bare_repo(hub: HubServer) -> None:
    assert check_push_access("ddpm-tiny", token=TOKEN, endpoint=hub.url) == REPO
    assert check_push_access(f"{ORG}/ddpm", token=TOKEN, endpoint=hub.url) == f"{ORG}/ddpm"
    with pytest.raises(ConfigError, match="^--hub_model_id alice/not valid! is not a valid repo id"):
        check_push_access("alice/not valid!", token=TOKEN, endpoint=hub.url)
    assert [r.path for r in hub.requests] == ["/api/whoami-v2"] * 3 and not hub.repos


def test_a_failed_intermediate_push_is_logged_once_and_the_next_push_retries_it(
    output_dir: Path, hub: HubServer, caplog: pytest.LogCaptureFixture
) -> None:
    pusher = BackgroundPusher(output_dir, "ddpm-tiny", token=TOKEN, endpoint=hub.url)
    hub.fail_next("/commit/", status=422, times=2)  # a lasting error: two pushes in a row fail
    with caplog.at_level(logging.WARNING, logger="hf_ddpm.hub"):
        for step in (1, 2, 3):
            pusher.push(f"step {step}")
        pusher.wait()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "hf_ddpm.hub"]
    assert len(warnings) == 1 and "training goes on and the next push retries" in warnings[0], warnings
    assert [c.message for c in hub.repos[REPO].commits.values()] == ["initial commit", "hf_ddpm: step 3"]
    assert OUTPUT_FILES <= set(hub.files(REPO))


def test_a_hub_that_keeps_failing_leaves_a_complete_local_run_and_one_line(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pusher_for_this_hub(monkeypatch, hub)
    hub.fail_next("/commit/", status=422, times=100)
    run = tmp_path / "run"
    args = train_args(run, "--hub_token", TOKEN, "--max_train_steps", "3", "--checkpointing_steps", "1",
                      "--hub_push_every", "1")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hf_ddpm.hub"), pytest.raises(HubError) as failure:
        train(parse_training_args(args))

    message = str(failure.value)
    assert message.startswith(f"pushing to {REPO} failed: ") and "\n" not in message and TOKEN not in message
    assert message.endswith(f"push it later with: python scripts/push_to_hub.py {run} --hub_model_id {REPO}")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "hf_ddpm.hub"]
    assert len(warnings) == 1 and "training goes on" in warnings[0], warnings
    assert len(hub.requests_matching("/commit/main", "POST")) == 3, "steps 1 and 2, then the final push"
    assert json.loads((run / "training_summary.json").read_text())["results"]["global_step"] == 3
    for name in [*PIPELINE_FILES, "samples.png", "README.md", "checkpoints/checkpoint-3/model.safetensors"]:
        assert (run / name).is_file(), name


# ---------------------------------------------------------------- a flaky Hub


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The back-off waits of hf_ddpm.hub's retries, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(hf_ddpm.hub.time, "sleep", recorded.append)
    return recorded


@pytest.mark.parametrize(
    ("headers", "expected"),
    [({"Retry-After": "7"}, [7.0]), ({"RateLimit": '"api";r=0;t=12'}, [12.0]), ({}, [0.01])],
    ids=["retry-after", "ratelimit", "no-header"],
)
def test_a_429_is_retried_after_the_wait_the_hub_asks_for(
    output_dir: Path, hub: HubServer, waits: list[float], headers: dict, expected: list[float]
) -> None:
    hub.fail_next(f"/api/models/{REPO}/commit/", status=429, headers=headers)
    push(output_dir, hub)
    assert waits == expected
    assert [r.status for r in hub.requests_matching("/commit/main", "POST")] == [429, 200]
    assert OUTPUT_FILES <= set(hub.files(REPO))


def test_500s_then_success_backs_off_exponentially(output_dir: Path, hub: HubServer, waits: list[float]) -> None:
    hub.fail_next(f"/api/models/{REPO}/commit/", status=500, times=3)
    push(output_dir, hub)
    assert waits == [0.01, 0.02, 0.04]
    assert OUTPUT_FILES <= set(hub.files(REPO))


def test_a_connection_reset_mid_upload_is_retried(output_dir: Path, hub: HubServer) -> None:
    weights = hashlib.sha256((output_dir / "unet/diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    hub.fail_next(f"/lfs-upload/{weights}", disconnect=True)  # the body was sent, the connection then dropped
    push(output_dir, hub)
    assert [r.status for r in hub.requests_matching(f"/lfs-upload/{weights}", "PUT")] == [0, 200]
    assert (
        hub.files(REPO)["unet/diffusion_pytorch_model.safetensors"]
        == (output_dir / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    )


def test_a_commit_whose_answer_is_lost_is_not_made_twice(output_dir: Path, hub: HubServer) -> None:
    hub.fail_next(f"/api/models/{REPO}/commit/", after=True)  # committed, but the client never hears of it
    push(output_dir, hub, commit_message="one push")
    assert [c.message for c in hub.repos[REPO].commits.values()] == ["initial commit", "one push"]
    assert OUTPUT_FILES <= set(hub.files(REPO))


def test_a_token_revoked_mid_run_is_logged_once_training_goes_on_and_the_next_push_retries(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pusher_for_this_hub(monkeypatch, hub)
    real_push, calls = hf_ddpm.hub.push_to_hub, []

    def push_then_revoke(*args: Any, **kwargs: Any) -> str:
        calls.append(1)
        if len(calls) == 4:  # the final push: the token is valid again
            hub.tokens[TOKEN] = "alice"
        try:
            return real_push(*args, **kwargs)
        finally:
            if len(calls) == 1:  # revoked right after the first push
                del hub.tokens[TOKEN]

    monkeypatch.setattr(hf_ddpm.hub, "push_to_hub", push_then_revoke)
    run = tmp_path / "run"
    args = train_args(run, "--hub_token", TOKEN, "--max_train_steps", "4", "--checkpointing_steps", "1",
                      "--hub_push_every", "1")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hf_ddpm.hub"):
        results = train(parse_training_args(args))
    assert results["global_step"] == 4 and len(calls) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "hf_ddpm.hub"]
    assert len(warnings) == 1 and "the Hub rejected the token (401)" in warnings[0], warnings
    assert TOKEN not in caplog.text
    posts = [r.status for r in hub.requests_matching("/commit/main", "POST")]
    assert posts == [200, 200], "the revoked pushes stop at whoami/create_repo; steps 1 and the end commit"
    assert [c.message for c in hub.repos[REPO].commits.values()][-1] == "hf_ddpm: end of training, step 4"
