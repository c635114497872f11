"""Training images streamed shard by shard (`--streaming`): no cache, any size, resumable exactly.

    >>> stream = open_stream(args, resolution=32, channels=3, seed=0, rank=0, world_size=1)
    >>> x0 = stream.batch(0, generator, random_flip=True)            # micro-step 0, float (B, 3, 32, 32)
    >>> state = stream.state_dict()                                  # into the checkpoint; load_state_dict resumes

The source is a `datasets` `IterableDataset` (what `load_dataset(..., streaming=True)` builds: a Hub id, or a
local folder of parquet / arrow / webdataset tar shards / image files), read one shard at a time
(`IterableDataset.shard`), so that a row is named by its shard and a position is a shard and a row in it. Every
epoch the shards are put in an order seeded by (seed, epoch), the same on every process; with N processes and a
shard count that N divides, process r reads shards r, r + N, ... of that order (whole shards of its own), else
every process reads every shard and keeps 1 row in N (the log says which). `--max_train_samples M` makes an epoch
the first M rows, shards in their stored order (the rows the cache would take), 1 row in N per process.

Shuffling is by windows: the process's rows are cut into windows of `--shuffle_buffer_size` rows, each permuted by
its own generator (`distributed.Stream.STREAM_WINDOWS`, keyed by seed, epoch, window and rank). Unlike a rolling
buffer (`IterableDataset.shuffle`, whose content a checkpoint cannot hold), a window is fully described by where it
starts (the shard, the rows of it read and `IterableDataset.state_dict()` of that shard) and how many of its rows
were used, so the position saved in a checkpoint re-reads at most one window and goes on with the very same images
in the same order. The price: a row never moves out of its window, so the mixing is that of the window plus the
per-epoch shard order.

The main process reads and shuffles encoded images; `--dataloader_num_workers` torch DataLoader workers decode and
resize them with `hf_ddpm.data`'s own code (the pixels of the cached path), batch by batch and in order. A rank's
epoch ends when its share runs out; the last incomplete batch is dropped. A bad image raises a `DataError` naming
it (webdataset: shard and key; image folders: the file; parquet / arrow: its row in its shard's file, and the file
name its image stored, if any), or is skipped and counted with `--skip_bad_images` (its batch is one image short).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from typing import TYPE_CHECKING, Any

import datasets
import torch
from datasets.table import InMemoryTable

from hf_ddpm.cli import one_line
from hf_ddpm.data import (
    _DECODE_ERRORS,
    _FEATURES,
    DataArguments,
    ImageDataset,
    _as_data_error,
    _find_image_column,
    _open_image,
    _prepare,
)
from hf_ddpm.distributed import Stream, seeded_generator
from hf_ddpm.errors import DataError

if TYPE_CHECKING:
    from hf_ddpm.training_args import TrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class StreamPosition:
    """Where a process is in its stream, after its last batch: window `window` of epoch `epoch` starts at
    `window_start` (a `_Cursor.position`: the shard, its rows read and `datasets`' state in it; {} at the start of
    the epoch) and its first `offset` shuffled rows are used."""

    epoch: int = 0
    window: int = 0
    window_start: dict[str, Any] = field(default_factory=dict)
    offset: int = 0
    num_images: int = 0  # images delivered so far, all epochs
    num_skipped: int = 0  # bad images skipped so far (--skip_bad_images)


@dataclass
class _RawBatch:
    """Encoded images of one micro-batch, what to call each in messages, and the position after the batch."""

    values: list[Any]
    names: list[str]
    position: StreamPosition


@dataclass
class _DecodedBatch:
    rows: dict[str, list[Any]]  # the columns of data._FEATURES
    names: list[str]  # of the rows kept
    skipped: list[str]
    error: str | None  # raised in the training process, where it stays one line
    position: StreamPosition


class _Decoder(torch.utils.data.Dataset):
    """What DataLoader workers run: a `_RawBatch` in, decoded rows out (the `_RawBatch` is the "index")."""

    def __init__(self, settings: dict[str, Any], skip_bad_images: bool, flag: str) -> None:
        self.settings, self.skip_bad_images, self.flag = settings, skip_bad_images, flag

    def __getitem__(self, raw: _RawBatch) -> _DecodedBatch:  # type: ignore[override]
        rows: dict[str, list[Any]] = {"pixels": [], "height": [], "width": []}
        kept, skipped = [], []
        for value, name in zip(raw.values, raw.names, strict=True):
            try:
                image = _prepare(_open_image(value), **self.settings)
            except _DECODE_ERRORS as exc:
                if not self.skip_bad_images:
                    error = (f"{self.flag}: {name} is not a readable image ({one_line(exc)}); fix or remove it, or "
                             "pass --skip_bad_images to skip bad images")  # fmt: skip
                    return _DecodedBatch(rows, kept, skipped, error, raw.position)
                skipped.append(f"{name} ({one_line(exc)})")
                continue
            rows["pixels"].append(image.tobytes())
            rows["height"].append(image.shape[1])
            rows["width"].append(image.shape[2])
            kept.append(name)
        return _DecodedBatch(rows, kept, skipped, None, raw.position)


def _keep(batch: _DecodedBatch) -> _DecodedBatch:
    return batch


class ImageStream:
    """This process's micro-batches of a streamed dataset, in a seeded order that a checkpoint can resume."""

    def __init__(
        self,
        shards: Shards,
        *,
        resolution: int,
        channels: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        shuffle_buffer_size: int,
        num_workers: int = 0,
        center_crop: bool = True,
        random_crop: bool = False,
        skip_bad_images: bool = False,
    ) -> None:
        self.resolution, self.channels = resolution, channels
        self.random_crop, self.num_workers = random_crop, num_workers
        # the sampler holds no reference back to this stream, so dropping the stream stops its workers at once
        self.reader = _Reader(shards, batch_size, shuffle_buffer_size, seed, rank, world_size, StreamPosition())
        settings = {"resolution": resolution, "channels": channels, "keep_aspect": center_crop or random_crop,
                    "crop": center_crop and not random_crop}  # fmt: skip
        self.decoder = _Decoder(settings, skip_bad_images, shards.flag)
        self.position = StreamPosition()  # after the last batch handed out
        self._iterator: Iterator[_DecodedBatch] | None = None
        self._last: tuple[int, ImageDataset, list[str]] | None = None  # micro-step, its images and their names

    def batch(self, micro_step: int, generator: torch.Generator, random_flip: bool = False) -> torch.Tensor:
        """float32 (B, C, R, R) in [-1, 1]: the next micro-batch, or the last one again if `micro_step` is the last
        one asked for; augmented as `ImageDataset.get_batch` does, from `generator`."""
        if self._last is None or self._last[0] != micro_step:
            self._last = (micro_step, *self._next())
        images = self._last[1]
        return images.get_batch(range(len(images)), generator, random_flip=random_flip)

    def names(self) -> list[str]:
        """What the rows of the last batch are called (a webdataset key, a file path or a stream row)."""
        return self._last[2] if self._last else []

    def close(self) -> None:
        """Stop the DataLoader workers; a later batch starts new ones where the stream is."""
        self._iterator = None

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out (JSON-serialisable)."""
        return asdict(self.position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batch whose position `state` is (from `state_dict`)."""
        if state["window_start"] and "shard" not in state["window_start"]:
            raise DataError("the checkpoint's stream position is of an hf_ddpm older than shard-by-shard streaming; "
                            "resume it with that version, or start a new run")  # fmt: skip
        self.close()
        self.position, self._last = StreamPosition(**state), None

    def _next(self) -> tuple[ImageDataset, list[str]]:
        if self._iterator is None:
            reader = replace(self.reader, start=self.position)
            loader = torch.utils.data.DataLoader(self.decoder, batch_size=None, sampler=reader,
                                                 num_workers=self.num_workers, collate_fn=_keep)  # fmt: skip
            self._iterator = iter(loader)
        while True:  # a batch whose every image was skipped is passed over
            decoded = next(self._iterator)
            if decoded.error:
                raise DataError(decoded.error)
            for skipped in decoded.skipped:
                logger.warning("skipping %s: not a readable image (--skip_bad_images)", skipped)
            decoded.position.num_skipped = self.position.num_skipped + len(decoded.skipped)
            decoded.position.num_images = self.position.num_images + len(decoded.names)
            self.position = decoded.position
            if decoded.names:
                # a fixed fingerprint: hashing every batch's pixels would cost more than decoding them
                table = InMemoryTable.from_pydict(decoded.rows, schema=_FEATURES.arrow_schema)
                data = datasets.Dataset(table, info=datasets.DatasetInfo(features=_FEATURES), fingerprint="stream")
                return ImageDataset(data, self.channels, self.resolution, random_crop=self.random_crop), decoded.names


@dataclass
class Shards:
    """A streamed split as its shards, each read alone (`IterableDataset.shard`), and what to call each."""

    source: datasets.IterableDataset  # images still encoded
    column: str  # the image column
    flag: str  # the flag that named the split, for messages
    names: list[str]  # shard i's data file, or "i of N" where datasets' shards are not one file each
    max_rows: int | None = None  # --max_train_samples: an epoch is the first rows, shards in their stored order

    @property
    def count(self) -> int:
        return self.source.num_shards

    def whole(self, world_size: int) -> bool:
        """Whether each of `world_size` processes can read whole shards of its own."""
        return self.max_rows is None and self.count % world_size == 0

    def order(self, epoch: int, seed: int, rank: int, world_size: int) -> list[int]:
        """The shards process `rank` reads in epoch `epoch`, in order: a permutation seeded by (seed, epoch), the
        same on every process, dealt out in turn when whole shards divide evenly, else all of it (the stored order
        with --max_train_samples)."""
        if self.max_rows is not None:
            return list(range(self.count))
        order = torch.randperm(self.count, generator=seeded_generator(Stream.STREAM_SHARDS, seed, epoch)).tolist()
        return order[rank::world_size] if self.whole(world_size) else order

    def name(self, row: dict[str, Any], shard: int, index: int) -> str:
        """What to call row `index` of shard `shard` in messages: a webdataset shard and key, an image file, or the
        row of its shard (with the file name an embedded image stored, if any)."""
        if "__url__" in row and "__key__" in row:
            return f"shard {row['__url__']} key {row['__key__']}"
        value = row[self.column]
        path = value.get("path") if isinstance(value, dict) else None
        if path and not value.get("bytes"):
            return str(path)  # the row is a reference to this file
        where = f"row {index} of shard {self.names[shard]}"
        return f"{path} ({where})" if path else where


class _Cursor:
    """One process's rows of one epoch, shard after shard from a saved position on, and where it is between rows."""

    def __init__(self, shards: Shards, order: list[int], start: dict[str, Any]) -> None:
        self.shards, self.order = shards, order
        self.shard = start.get("shard", 0)  # place in `order` of the shard being read
        self.row = start.get("row", 0)  # rows of that shard read
        self.read = start.get("read", 0)  # rows of the epoch read, all shards
        self.state = start.get("state", {})  # datasets' position in that shard ({}: its start)
        self.dataset: datasets.IterableDataset | None = None  # that shard, once reading

    def position(self) -> dict[str, Any]:
        """Where the next row is (JSON-serialisable), what `start` takes."""
        state = self.state if self.dataset is None else self.dataset.state_dict()
        return {"shard": self.shard, "row": self.row, "read": self.read, "state": state}

    def rows(self, rank: int, stride: int) -> Iterator[tuple[dict[str, Any], str]]:
        """(row, its name) for the epoch's rows read i-th with i % stride == rank % stride, in order."""
        shards = self.shards
        while self.shard < len(self.order):
            index = self.order[self.shard]
            self.dataset = shards.source.shard(num_shards=shards.count, index=index)
            self.dataset.load_state_dict(self.state)
            for row in self.dataset:
                if self.read == shards.max_rows:
                    return
                self.row, self.read = self.row + 1, self.read + 1
                if (self.read - 1) % stride == rank % stride:
                    yield row, shards.name(row, index, self.row - 1)
            self.shard, self.row, self.state, self.dataset = self.shard + 1, 0, {}, None


@dataclass
class _Reader:
    """The DataLoader's sampler, run in the training process: reads this process's shards of the stream from
    `start` and cuts its shuffled windows into micro-batches of encoded images (a fresh pass each time it is
    iterated)."""

    shards: Shards
    batch_size: int
    buffer_size: int
    seed: int
    rank: int
    world_size: int
    start: StreamPosition

    def __iter__(self) -> Iterator[_RawBatch]:
        """Encoded micro-batches from `start` on, epoch after epoch."""
        start = self.start
        epoch, window, window_start, offset = start.epoch, start.window, start.window_start, start.offset
        while True:
            cursor = _Cursor(self.shards, self.shards.order(epoch, self.seed, self.rank, self.world_size), window_start)
            rows = cursor.rows(self.rank, 1 if self.shards.whole(self.world_size) else self.world_size)
            values: list[Any] = []
            names: list[str] = []
            delivered = False
            while window_rows := list(islice(rows, self.buffer_size)):
                next_start = cursor.position()
                generator = seeded_generator(Stream.STREAM_WINDOWS, self.seed, epoch, window, self.rank)
                order = torch.randperm(len(window_rows), generator=generator).tolist()
                for used, index in enumerate(order[offset:], start=offset + 1):
                    row, name = window_rows[index]
                    values.append(row[self.shards.column])
                    names.append(name)
                    if len(values) == self.batch_size:
                        yield _RawBatch(values, names, StreamPosition(epoch, window, window_start, used))
                        values, names, delivered = [], [], True
                window, window_start, offset = window + 1, next_start, 0
            resumed_at_its_end = epoch == start.epoch and (start.window or start.offset)
            if not delivered and not resumed_at_its_end:
                raise DataError(
                    f"{self.shards.flag}: process {self.rank}'s share of the stream has fewer than --train_batch_size "
                    f"{self.batch_size} images; lower --train_batch_size or use fewer processes"
                )
            logger.info("process %d: epoch %d of the stream done", self.rank, epoch)
            epoch, window, window_start, offset = epoch + 1, 0, {}, 0


def load_stream(args: DataArguments) -> Shards:
    """The raw streamed split `args` names (images still encoded), as its shards."""
    if args.dataset_name is None and args.train_data_dir is None:
        raise DataError("--streaming needs --dataset_name (a Hub id or a local folder of shards) or --train_data_dir")
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise DataError("both --dataset_name and --train_data_dir were given; pass only one of them")
    if args.train_data_dir is not None:
        path, data_dir, flag = "imagefolder", args.train_data_dir, f"--train_data_dir {args.train_data_dir}"
    else:
        path, data_dir, flag = args.dataset_name, None, f"--dataset_name {args.dataset_name}"
    hint = "check the id or path (a folder of parquet, arrow, webdataset .tar or image files), or unset HF_HUB_OFFLINE"
    with _as_data_error(flag, hint):  # what load_dataset(..., streaming=True) does, keeping the builder's file list
        builder = datasets.load_dataset_builder(path, name=args.dataset_config_name, data_dir=data_dir,
                                                cache_dir=args.cache_dir)  # fmt: skip
        source = builder.as_streaming_dataset(split=args.split)
    if source.features is None:
        raise DataError(f"{flag}: the stream does not say its columns; name the image column with --image_column")
    column = _find_image_column(source.features, args.image_column, flag)
    if isinstance(source.features[column], datasets.Image):
        source = source.cast_column(column, datasets.Image(decode=False))  # decoded by the workers, bad ones reported
    files = list((builder.config.data_files or {}).get(args.split, []))
    count = source.num_shards
    names = files if len(files) == count else [f"{i} of {count}" for i in range(count)]
    return Shards(source, column, flag, names)


def open_stream(
    args: TrainingArguments, resolution: int, channels: int, *, seed: int, rank: int, world_size: int
) -> ImageStream:
    """This process's `ImageStream` of the training set."""
    shards = replace(load_stream(args), max_rows=args.max_train_samples)
    if world_size > 1 and rank == 0:
        logger.info(
            "--streaming: %d shard(s) over %d processes: %s", shards.count, world_size,
            f"{shards.count // world_size} whole shard(s) per process" if shards.whole(world_size) else
            f"every process reads the first {shards.max_rows} rows and keeps 1 in {world_size}"
            if shards.max_rows is not None else
            f"not a multiple, so every process reads every shard and keeps 1 row in {world_size} (a multiple "
            f"of {world_size} shards would let each read only its own)",
        )  # fmt: skip
    return ImageStream(
        shards, resolution=resolution, channels=channels, batch_size=args.train_batch_size, seed=seed, rank=rank,
        world_size=world_size, shuffle_buffer_size=args.shuffle_buffer_size, num_workers=args.dataloader_num_workers,
        center_crop=args.center_crop, random_crop=args.random_crop, skip_bad_images=args.skip_bad_images,
    )  # fmt: skip
