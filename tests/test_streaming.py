"""--streaming: the pixels of the cached path, a seeded order that resumes exactly, bad images, two ranks."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO_ROOT
from hub_server import HubServer
from huggingface_hub import HfApi, constants
from PIL import Image
from safetensors.torch import load_file
from test_hub import client_env
from test_training import FAST, stopped_after_first_checkpoint, weights

from hf_ddpm import checkpointing
from hf_ddpm.data import load_image_dataset
from hf_ddpm.errors import ConfigError, DataError, TrainingError
from hf_ddpm.streaming import ImageStream, load_stream, open_stream
from hf_ddpm.trainer import Trainer
from hf_ddpm.training_args import parse_training_args

SHARDS, PER_SHARD = 4, 15
STREAM_FAST = FAST[: FAST.index("--max_train_samples")] + FAST[FAST.index("--max_train_samples") + 2 :]


def write_shards(folder: Path, bad: set[str] = frozenset()) -> Path:
    """SHARDS webdataset tars of PER_SHARD PNGs of varied, non-square sizes; keys in `bad` hold broken bytes."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for shard in range(SHARDS):
        with tarfile.open(folder / f"train-{shard:05d}.tar", "w") as tar:
            for row in range(PER_SHARD):
                key = f"{shard:02d}{row:04d}"
                height, width = rng.integers(8, 24, size=2)
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
                payload = b"not a png" if key in bad else buffer.getvalue()
                info = tarfile.TarInfo(f"{key}.png")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("stream") / "shards")


def stream_args(shards: Path, *extra: str) -> list[str]:
    return [*STREAM_FAST, "--streaming", "--dataset_name", str(shards), "--shuffle_buffer_size", "7", *extra]


def make_stream(shards: Path, *extra: str, batch_size: int = 4, rank: int = 0, world_size: int = 1) -> ImageStream:
    args = parse_training_args([*stream_args(shards, "--max_train_steps", "1", *extra),
                                "--train_batch_size", str(batch_size)])  # fmt: skip
    return open_stream(args, 8, 3, seed=args.seed, rank=rank, world_size=world_size)


def recording(trainer: Trainer) -> list[list[str]]:
    """What each micro-batch of `trainer`'s stream holds, appended as they are drawn."""
    seen: list[list[str]] = []
    batch = trainer.stream.batch

    def recorded(*args, **kwargs):
        images = batch(*args, **kwargs)
        seen.append(trainer.stream.names())
        return images

    trainer.stream.batch = recorded
    return seen


def names(stream: ImageStream, steps: range) -> list[list[str]]:
    seen = []
    for step in steps:
        stream.batch(step, torch.Generator().manual_seed(step))
        seen.append(stream.names())
    return seen


def as_other_source(shards: Path, kind: str, folder: Path) -> Path:
    """The images of `shards` as a folder of PNG files, or as parquet shards."""
    if kind == "webdataset":
        return shards
    images = [(f"{info.name}", tar.extractfile(info).read()) for path in sorted(shards.glob("*.tar"))
              for tar in [tarfile.open(path)] for info in tar.getmembers()]  # fmt: skip
    folder.mkdir()
    if kind == "imagefolder":
        for name, payload in images:
            (folder / name).write_bytes(payload)
        return folder
    features = datasets.Features({"image": datasets.Image()})
    for shard in range(2):
        rows = {"image": [{"bytes": payload, "path": None} for _, payload in images[shard::2]]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(folder / f"train-{shard:05d}.parquet")
    return folder


@pytest.mark.parametrize("kind", ["webdataset", "imagefolder", "parquet"])
def test_streamed_images_are_the_cached_pixels(shards, tmp_path, kind):
    """Every image of an epoch once, decoded and resized (short side, centre crop) exactly as the cache does."""
    source = as_other_source(shards, kind, tmp_path / kind)
    flag = "--train_data_dir" if kind == "imagefolder" else "--dataset_name"
    cached = load_image_dataset(**{flag[2:]: str(source)}, resolution=8, channels=3, cache_dir=str(tmp_path / "c"))
    args = parse_training_args([*FAST, "--streaming", flag, str(source), "--max_train_steps", "1",
                                "--train_batch_size", str(SHARDS * PER_SHARD)])  # fmt: skip
    stream = open_stream(args, 8, 3, seed=0, rank=0, world_size=1)  # one batch is the whole epoch
    batch = stream.batch(0, torch.Generator())
    assert len(stream.names()) == len(set(stream.names())) == len(cached) == SHARDS * PER_SHARD
    as_uint8 = ((batch + 1) * 127.5).round().to(torch.uint8)
    assert sorted(x.numpy().tobytes() for x in as_uint8) == sorted(x.numpy().tobytes() for x in cached.pixels())


def test_windows_are_shuffled_epochs_reshuffled_and_a_restored_position_goes_on_exactly(shards):
    straight = make_stream(shards, "--dataloader_num_workers", "2")
    seen = names(straight, range(40))  # 15 batches of 4 per epoch: ends in epoch 2
    epoch0 = [name for batch in seen[:15] for name in batch]
    assert len(set(epoch0)) == 60 and sorted(epoch0) != epoch0, "epoch 0 is every image once, shuffled"
    assert [name for batch in seen[15:30] for name in batch] != epoch0, "epoch 1 is another order"
    for stop in (3, 4, 15, 22):  # inside a window, in one that spans two shards, at an epoch's end, in epoch 1
        first = make_stream(shards, "--dataloader_num_workers", "2")
        head = names(first, range(stop))
        resumed = make_stream(shards)  # and without workers: the order does not depend on them
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert head + names(resumed, range(stop, 40)) == seen, stop
    assert straight.state_dict()["num_images"] == 160 and straight.state_dict()["epoch"] == 2
    older = {**straight.state_dict(), "window_start": {"examples_iterable": {"shard_idx": 1}}}
    with pytest.raises(DataError, match="older than shard-by-shard streaming"):
        make_stream(shards).load_state_dict(older)


def test_the_last_batch_is_served_again_for_the_same_micro_step(shards):
    stream = make_stream(shards)
    a = stream.batch(0, torch.Generator().manual_seed(1), random_flip=True)
    assert torch.equal(a, stream.batch(0, torch.Generator().manual_seed(1), random_flip=True))
    assert not torch.equal(a, stream.batch(1, torch.Generator().manual_seed(1), random_flip=True))


def test_bad_image_names_its_shard_and_key_or_is_skipped_and_counted(tmp_path):
    folder = write_shards(tmp_path / "bad", bad={"010003"})
    stream = make_stream(folder, batch_size=SHARDS * PER_SHARD)
    with pytest.raises(DataError, match=r"shard .*train-00001.tar key 010003 is not a readable image.*--skip_bad"):
        stream.batch(0, torch.Generator())
    stream = make_stream(folder, "--skip_bad_images", batch_size=SHARDS * PER_SHARD)
    assert len(stream.batch(0, torch.Generator())) == SHARDS * PER_SHARD - 1
    assert stream.state_dict()["num_skipped"] == 1 and not any("key 010003" in name for name in stream.names())


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
@pytest.mark.parametrize("path", ["seven.png", None], ids=["stored-file-name", "no-file-name"])
def test_a_bad_parquet_or_arrow_row_is_named_by_its_shard_row_and_stored_file_name(tmp_path, path, kind):
    """A row is named by its shard's file and its row there, and by the file name datasets keeps for an embedded
    image if it has one."""
    good = io.BytesIO()
    Image.new("RGB", (9, 9)).save(good, "PNG")
    (tmp_path / kind).mkdir()
    for shard in range(2):
        images = [{"bytes": good.getvalue(), "path": f"{shard}-{i}.png"} for i in range(4)]
        if shard == 1:
            images[2] = {"bytes": b"no", "path": path}
        rows = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
        if kind == "parquet":
            rows.to_parquet(tmp_path / f"parquet/train-{shard:05d}.parquet")
        else:  # the arrow file save_to_disk writes is one shard
            rows.save_to_disk(tmp_path / "saved")
            shutil.move(next((tmp_path / "saved").glob("*.arrow")), tmp_path / f"arrow/train-{shard:05d}.arrow")
            shutil.rmtree(tmp_path / "saved")
    stream = make_stream(tmp_path / kind, batch_size=8)
    where = rf"row 2 of shard \S*/{kind}/train-00001.{kind}"
    named = rf"seven.png \({where}\)" if path else where
    with pytest.raises(DataError, match=rf": {named} is not a readable image"):
        stream.batch(0, torch.Generator())


def test_a_bad_file_of_a_streamed_image_folder_is_named_by_its_path(shards, tmp_path):
    folder = as_other_source(shards, "imagefolder", tmp_path / "images")
    (folder / "010003.png").write_bytes(b"not a png")
    args = parse_training_args([*STREAM_FAST, "--streaming", "--train_data_dir", str(folder), "--max_train_steps", "1",
                                "--train_batch_size", str(SHARDS * PER_SHARD)])  # fmt: skip
    stream = open_stream(args, 8, 3, seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match=rf": {folder / '010003.png'} is not a readable image"):
        stream.batch(0, torch.Generator())


def test_each_process_reads_whole_shards_of_its_own_reshuffled_every_epoch(shards):
    """In process, for ranks 0 and 1 of 2 over 4 shards: each epoch every image once across the ranks, each rank
    two whole shards (webdataset keys start with their shard), and the ranks' shards change between epochs."""
    streams = [make_stream(shards, world_size=2, rank=rank) for rank in (0, 1)]
    per_epoch = 2 * PER_SHARD // 4  # a rank's batches of 4 in an epoch (2 of its 30 rows dropped)
    seen = [names(stream, range(3 * per_epoch)) for stream in streams]
    dealt = []
    for epoch in range(3):
        share = [[name for batch in rank[epoch * per_epoch : (epoch + 1) * per_epoch] for name in batch]
                 for rank in seen]  # fmt: skip
        assert len(set(share[0] + share[1])) == 2 * per_epoch * 4, "an image was seen twice in an epoch"
        shards_of = [{name.split(" key ")[1][:2] for name in rank} for rank in share]
        assert [len(s) for s in shards_of] == [2, 2] and not shards_of[0] & shards_of[1]
        dealt.append(shards_of[0])
    assert len({frozenset(s) for s in dealt}) > 1, "rank 0 read the same shards every epoch"


def test_max_train_samples_streams_the_first_rows_like_the_cache(shards):
    stream = make_stream(shards, "--max_train_samples", "20", batch_size=20)
    first = names(stream, range(2))  # an epoch is one batch
    keys = [f"00{i:04d}" for i in range(PER_SHARD)] + [f"01{i:04d}" for i in range(20 - PER_SHARD)]
    assert sorted(name.split(" key ")[1] for name in first[0]) == keys
    assert sorted(first[1]) == sorted(first[0]) and first[1] != first[0], "the next epoch: the same rows, reordered"
    halves = [names(make_stream(shards, "--max_train_samples", "20", batch_size=10, world_size=2, rank=rank),
                    range(1))[0] for rank in (0, 1)]  # fmt: skip
    assert sorted(name.split(" key ")[1] for name in halves[0] + halves[1]) == keys, "2 processes: 1 row in 2 each"


def test_streaming_needs_max_train_steps_and_a_dataset(shards, tmp_path):
    with pytest.raises(ConfigError, match="--streaming needs --max_train_steps"):
        parse_training_args(stream_args(shards, "--num_epochs", "2"))
    with pytest.raises(DataError, match="--streaming needs --dataset_name"):
        load_stream(parse_training_args([*FAST, "--streaming", "--max_train_steps", "2"]))
    with pytest.raises(DataError, match="could not load --dataset_name"):
        load_stream(parse_training_args(stream_args(tmp_path / "nowhere", "--max_train_steps", "2")))


def test_streaming_resume_sees_the_same_images_and_ends_bit_exact(shards, tmp_path, monkeypatch):
    # --prefetch_batches is asked for and must be ignored: a stream read ahead would checkpoint a later position
    args = stream_args(shards, "--max_train_steps", "8", "--checkpointing_steps", "4", "--gradient_accumulation_steps",
                       "2", "--random_flip", "--train_batch_size", "5", "--dataloader_num_workers", "1",
                       "--prefetch_batches", "2")  # fmt: skip

    def run(name: str, *extra: str) -> tuple[Path, list[list[str]]]:
        trainer = Trainer(parse_training_args([*args, "--output_dir", str(tmp_path / name), *extra]))
        seen = recording(trainer)
        try:
            trainer.train()
        finally:
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
        return tmp_path / name, seen

    straight, seen = run("straight")  # 16 micro-batches of 5 from 12 per epoch: crosses an epoch
    stopped_after_first_checkpoint(monkeypatch, lambda: run("resumed"))
    resumed, second = run("resumed", "--resume_from_checkpoint", "latest")
    state = json.loads((resumed / "checkpoints/checkpoint-4" / checkpointing.STATE_FILE).read_text())
    assert state["stream_positions"][0]["num_images"] == 40
    assert seen[8:] == second and len(seen) == 16, "the resumed run did not go on with the same images"
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed EMA weights differ from the straight run"
    a = load_file(straight / "checkpoints/checkpoint-8/model.safetensors")
    b = load_file(resumed / "checkpoints/checkpoint-8/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed training weights differ from the straight run"


@pytest.mark.parametrize("num_shards", [SHARDS, SHARDS - 1], ids=["whole-shards", "every-other-row"])
def test_two_processes_never_see_an_image_twice_in_an_epoch(tmp_path, num_shards, shards):
    folder = tmp_path / "shards"
    folder.mkdir()
    for tar in sorted(shards.glob("*.tar"))[:num_shards]:
        os.symlink(tar, folder / tar.name)
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(PYTHON).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO_ROOT / "tests" / "ddp_worker.py"), *stream_args(folder), "--output_dir", str(out),
           "--max_train_steps", "14", "--checkpointing_steps", "14", "--train_batch_size", "4"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "training_summary.json").read_text())["results"]["world_size"] == 2
    expected = "2 whole shard(s) per process" if num_shards == SHARDS else "keeps 1 row in 2"
    assert expected in result.stderr
    rows = [json.loads((out / f"rows{r}.json").read_text()) for r in (0, 1)]
    per_epoch = num_shards * PER_SHARD // 2 // 4  # micro-batches of 4 in one rank's half of an epoch
    for epoch in range(2):
        share = [{name for batch in ranks[epoch * per_epoch : (epoch + 1) * per_epoch] for name in batch}
                 for ranks in rows]  # fmt: skip
        assert all(len(s) == per_epoch * 4 for s in share), "a rank saw an image twice in an epoch"
        assert not share[0] & share[1], "both ranks saw an image in the same epoch"
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_resuming_a_stream_needs_every_process_position(shards, tmp_path):
    args = [*stream_args(shards, "--output_dir", str(tmp_path / "out"), "--checkpointing_steps", "2")]
    Trainer(parse_training_args([*args, "--max_train_steps", "2"])).train()
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    state_file = tmp_path / "out/checkpoints/checkpoint-2" / checkpointing.STATE_FILE
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "stream_positions": state["stream_positions"] * 2}))
    resumed = Trainer(parse_training_args([*args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"]))
    with pytest.raises(TrainingError, match=r"the stream positions of 2 processes; .* same number of processes \(1"):
        resumed.train()


_HUB_STREAM = """
import json, sys, torch
from hf_ddpm.streaming import open_stream
from hf_ddpm.training_args import parse_training_args

def batches(dataset):
    args = parse_training_args([*sys.argv[2:], "--dataset_name", dataset])
    stream = open_stream(args, 8, 3, seed=0, rank=0, world_size=1)
    out = [stream.batch(step, torch.Generator().manual_seed(step), random_flip=True) for step in range(6)]
    stream.close()
    return torch.stack(out)

print(json.dumps({"equal": torch.equal(batches("alice/digits"), batches(sys.argv[1]))}))
"""


def test_a_hub_dataset_id_streams_the_images_its_shards_hold(shards, tmp_path, monkeypatch):
    """`--streaming --dataset_name alice/digits`: datasets finds the repo's parquet shards through huggingface_hub
    and reads them by byte ranges (the fake Hub, online), and the stream serves the very images, in the same order,
    that the same shards on disk give; then a run trains from it and resumes its stream from a checkpoint."""
    local = as_other_source(shards, "parquet", tmp_path / "parquet")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with HubServer(tokens={"hf_alice": "alice"}) as hub:
        api = HfApi(endpoint=hub.url, token="hf_alice")
        api.create_repo("alice/digits", repo_type="dataset")
        api.upload_folder(folder_path=local, path_in_repo="data", repo_id="alice/digits", repo_type="dataset")
        env = {**client_env(hub, tmp_path / "hf-home", tmp_path / "hub-cache"),
               "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"), "OMP_NUM_THREADS": "1"}  # fmt: skip
        flags = [*STREAM_FAST, "--streaming", "--max_train_steps", "6", "--train_batch_size", "5",
                 "--shuffle_buffer_size", "7", "--checkpointing_steps", "3"]  # fmt: skip

        def run(*command: str) -> subprocess.CompletedProcess:
            proc = subprocess.run([PYTHON, *command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=300)  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:]
            return proc

        compared = run("-c", _HUB_STREAM, str(local), *flags)
        assert json.loads(compared.stdout.strip().splitlines()[-1]) == {"equal": True}
        ranged = [r for r in hub.requests_matching("/datasets/alice/digits/resolve/", "GET") if r.status == 206]
        assert ranged, "the parquet shards were not read by byte ranges"

        train = [str(REPO_ROOT / "scripts/train.py"), *flags, "--dataset_name", "alice/digits"]
        run(*train, "--output_dir", "straight")
        checkpoint = tmp_path / "straight/checkpoints/checkpoint-3"
        state = json.loads((checkpoint / checkpointing.STATE_FILE).read_text())
        assert state["stream_positions"][0]["num_images"] == 15
        shutil.copytree(checkpoint, tmp_path / "resumed/checkpoints/checkpoint-3")
        resumed = run(*train, "--output_dir", "resumed", "--resume_from_checkpoint", "latest")
    assert "resum" in resumed.stderr.lower()
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a), "the run resumed from the Hub stream ended with other weights"
