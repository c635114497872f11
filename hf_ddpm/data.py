"""Training images through the `datasets` library: load once, decode and resize once, augment on tensors.

    >>> from hf_ddpm.data import load_image_dataset
    >>> data = load_image_dataset("builtin:digits", resolution=16, channels=1)
    >>> data.get_batch([0, 5, 7], torch.Generator().manual_seed(0), random_flip=True).shape
    torch.Size([3, 1, 16, 16])

Sources: scikit-learn's bundled handwritten digits (`BUILTIN_DIGITS`, the offline default), a Hub dataset id,
a local folder laid out like a Hub dataset repo, a `save_to_disk` folder, or a folder of image files
(`train_data_dir`, read by datasets' "imagefolder" builder).

Design:

* Every image is decoded, converted to `channels` and resized with PIL's antialiased bicubic filter (what
  clean-fid recommends) exactly once, by a `Dataset.map` whose fingerprint covers the source dataset, the
  settings, this file and the Pillow version. File-backed sources therefore get an Arrow cache file that later
  runs memory-map instead of decoding again; in-memory sources (the built-in digits) are simply kept.
* Rows are stored as raw uint8 CHW bytes plus their height and width. With `center_crop` every row is the
  `resolution` square, cropped once at decode time; with `random_crop` the row keeps the short-side-resized
  image (short side == `resolution`, variable long side, no padding) and `get_batch` cuts the square window at
  a position drawn from the caller's generator every time the row is batched, so each epoch sees other crops.
  An image that is square after resizing has a single window: `random_crop` changes nothing for it (nor for
  the built-in digits, which are square). With neither, the image is squashed square.
* Alpha (LA, RGBA, PA, palette or grayscale/RGB with tRNS transparency) is composited onto white:
  transparent images (icons, sprites, logos, line art) are drawn to be seen on a light page, whereas dropping
  alpha exposes whatever colour the encoder left under transparent pixels and black hides dark strokes.
* High bit depth is scaled, never clipped: 16-bit (I;16*) and 32-bit integer (I, which Pillow uses for many
  16-bit files) map 0..65535 to 0..255; float (F) follows Pillow's own convention that values are 0..255.
* Problems are reported as `DataError` (one line, naming the file/column/split and the CLI flag that fixes it)
  while the dataset is prepared, before any training step.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL
import torch
from datasets.fingerprint import Hasher
from PIL import Image
from sklearn.datasets import load_digits

from hf_ddpm.cli import one_line
from hf_ddpm.distributed import Stream, seeded_generator
from hf_ddpm.errors import DataError

logger = logging.getLogger(__name__)

BUILTIN_DIGITS = "builtin:digits"

# Column names tried, in order, when no column has the datasets.Image feature.
_IMAGE_COLUMN_NAMES = ("image", "img", "images", "pixel_values", "picture", "photo")
# What a broken, truncated, non-image or unconvertible cell raises while being decoded and converted.
_DECODE_ERRORS = (OSError, ValueError, TypeError, EOFError, Image.DecompressionBombError)
# What datasets and huggingface_hub raise for a missing/unreachable dataset, a bad config or unreadable files.
_LOAD_ERRORS = (datasets.exceptions.DatasetsError, OSError, ValueError)
# Stored row layout: uint8 CHW pixels as bytes, plus the row's own height and width.
_FEATURES = datasets.Features(
    {"pixels": datasets.Value("binary"), "height": datasets.Value("int32"), "width": datasets.Value("int32")}
)
# Part of the decode cache key, so editing the preprocessing code (or upgrading Pillow) invalidates the cache.
_CODE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest() + PIL.__version__


@dataclass
class DataArguments:
    """Which images, and how they are decoded: the training set of scripts/train.py (`TrainingArguments` adds the
    training-only options) and the reference images of scripts/evaluate.py. `load_data` loads them."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": f"Hub dataset id, local dataset repo, save_to_disk folder, or {BUILTIN_DIGITS} (default; "
                  "evaluate.py: the run's training data first)"},
    )  # fmt: skip
    dataset_config_name: str | None = field(default=None, metadata={"help": "dataset configuration name"})
    split: str = field(default="train", metadata={"help": "dataset split (evaluate.py: e.g. test, for held-out NLL)"})
    train_data_dir: str | None = field(default=None, metadata={"help": "a folder of image files instead"})
    image_column: str | None = field(default=None, metadata={"help": "image column (found automatically if unset)"})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache directory"})
    resolution: int | None = field(default=None, metadata={"help": "image size (default: the model's sample_size)"})
    center_crop: bool = field(
        default=True, metadata={"help": "centre-crop after resizing the short side (--no_center_crop: squash)"}
    )


def digits_images(resolution: int) -> np.ndarray:
    """scikit-learn's 1797 real 8x8 handwritten digits as uint8 (N, 1, resolution, resolution), ink bright.

    The 0..16 intensities are scaled to 0..255 and upscaled with PIL bicubic: the same filter as every other
    source here (so a digits model and its evaluation see one pipeline), and it rings less than Lanczos on
    these hard-edged 8x8 glyphs.
    """
    _check_positive("resolution", resolution)
    raw = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
    return np.stack([_prepare(Image.fromarray(d), resolution, 1, keep_aspect=True, crop=True) for d in raw])


def digits_labels() -> np.ndarray:
    """(N,) int class labels 0..9 of `digits_images`, same order."""
    return load_digits().target


@dataclass(frozen=True)
class ImageDataset:
    """Decoded, resized uint8 images held in a datasets.Dataset (memory-mapped arrow when from files).

    `data` has columns `pixels` (uint8 CHW bytes), `height` and `width`; rows are `resolution` squares unless
    the dataset was built with `random_crop`, in which case the short side is `resolution`.
    """

    data: datasets.Dataset
    channels: int
    resolution: int
    random_crop: bool = False
    num_skipped: int = 0  # bad images skipped with skip_bad_images

    def __len__(self) -> int:
        return len(self.data)

    def get_batch(
        self, indices: Sequence[int], generator: torch.Generator | None = None, random_flip: bool = False
    ) -> torch.Tensor:
        """float32 (B, C, R, R) in [-1, 1] (0 -> -1, 255 -> 1) for the given rows.

        Augmentation draws only from `generator` (torch's global generator when None), afresh on every call:
        first one crop position per row if the dataset was built with `random_crop` (drawn for square rows too,
        where every position gives the same window), then one flip decision per row if `random_flip`.
        """
        n = len(indices)
        positions = torch.rand(n, generator=generator).tolist() if self.random_crop else [0.5] * n
        images = torch.from_numpy(self._crops(indices, positions)).float() / 127.5 - 1
        if random_flip:
            flip = torch.rand(n, generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images

    def pixels(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """uint8 (B, C, R, R) centre view of the given rows (all when None), no augmentation."""
        indices = range(len(self)) if indices is None else indices
        return torch.from_numpy(self._crops(indices, [0.5] * len(indices)))

    def _crops(self, indices: Sequence[int], positions: Sequence[float]) -> np.ndarray:
        rows = self.data[[int(i) for i in indices]]
        columns = (rows["pixels"], rows["height"], rows["width"], positions)
        crops = []
        for pixels, height, width, position in zip(*columns, strict=True):
            array = np.frombuffer(pixels, np.uint8).reshape(self.channels, height, width)
            crops.append(_crop(array, self.resolution, position))
        return np.stack(crops)


class EpochOrder:
    """The rows each process trains on at micro-step m, from (seed, m, rank) alone, so a resumed run goes on
    exactly where it stopped without replaying batches.

    Each epoch is a fresh permutation of the rows (`distributed.Stream.EPOCH_ORDER`, seeded from (seed, epoch)),
    cut into global micro-batches of `global_micro_batch` rows; rows left over at the end of a permutation wait
    for a later epoch. Process r takes `batch_size` rows at offset r * batch_size of the global micro-batch.
    """

    def __init__(self, num_rows: int, global_micro_batch: int, seed: int) -> None:
        self.micro_steps_per_epoch = num_rows // global_micro_batch
        self.num_rows, self.global_micro_batch, self.seed = num_rows, global_micro_batch, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, micro_step: int, process_index: int, batch_size: int) -> list[int]:
        """The rows of process `process_index` at `micro_step`."""
        epoch, position = divmod(micro_step, self.micro_steps_per_epoch)
        if epoch != self._epoch:  # one permutation is kept: consecutive micro-steps share it
            generator = seeded_generator(Stream.EPOCH_ORDER, self.seed, epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_rows, generator=generator)
        start = position * self.global_micro_batch + process_index * batch_size
        return self._perm[start : start + batch_size].tolist()


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    train_data_dir: str | None = None,
    image_column: str | None = None,
    resolution: int = 32,
    channels: int = 3,
    center_crop: bool = True,
    random_crop: bool = False,
    cache_dir: str | None = None,
    skip_bad_images: bool = False,
    max_train_samples: int | None = None,
) -> ImageDataset:
    """Load, decode and resize a training set once; see the module docstring for sources and design.

    `dataset_name` is a Hub id, a local Hub-style dataset folder, a `save_to_disk` folder (a saved
    DatasetDict is indexed by `split`, a saved Dataset is used whole) or `BUILTIN_DIGITS` (all 1797 digits;
    the default when neither `dataset_name` nor `train_data_dir` is given). `train_data_dir` is a folder of
    image files, searched recursively. `max_train_samples` keeps the first rows of the split.
    Geometry: `random_crop` (which takes precedence over `center_crop`) keeps the short-side-resized image and
    crops a random window in every `get_batch`, a no-op for images that are square after resizing and ignored for
    the square built-in digits; otherwise `center_crop` resizes the short side and centre-crops once, here; with
    both False the image is squashed square.
    """
    _check_positive("resolution", resolution)
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}; fix --channels")
    if max_train_samples is not None:
        _check_positive("max_train_samples", max_train_samples)
    if dataset_name is not None and train_data_dir is not None:
        raise DataError("both --dataset_name and --train_data_dir were given; pass only one of them")

    if train_data_dir is None and dataset_name in (None, BUILTIN_DIGITS):
        images = np.repeat(digits_images(resolution)[:max_train_samples], channels, axis=1)
        rows = {"pixels": [image.tobytes() for image in images], "height": [resolution] * len(images)}
        rows["width"] = rows["height"]
        return ImageDataset(datasets.Dataset.from_dict(rows, features=_FEATURES), channels, resolution)

    source, flag = _load_split(dataset_name, dataset_config_name, split, train_data_dir, cache_dir)
    column = _find_image_column(source.features, image_column, flag)
    if max_train_samples is not None:
        source = source.select(range(min(max_train_samples, len(source))))
    if len(source) == 0:
        raise DataError(f"{flag} split {split!r} has no rows; pick another --split or add data")
    if isinstance(source.features[column], datasets.Image):
        source = source.cast_column(column, datasets.Image(decode=False))  # we decode, to report bad files

    settings = {
        "column": column,
        "resolution": resolution,
        "channels": channels,
        "keep_aspect": center_crop or random_crop,
        "crop": center_crop and not random_crop,
        "skip_bad_images": skip_bad_images,
    }
    data = source.map(
        _decode_batch,
        fn_kwargs=settings,
        batched=True,
        with_indices=True,
        remove_columns=source.column_names,
        features=_FEATURES,
        new_fingerprint=Hasher.hash([source._fingerprint, settings, _CODE_DIGEST]),
        desc=f"Decoding and resizing images to {resolution}px",
    )
    num_skipped = len(source) - len(data)
    if len(data) == 0:
        raise DataError(f"all {len(source)} images of {flag} are unreadable (see the log); fix the data")
    if num_skipped:
        logger.warning("skipped %d unreadable image(s) of %s (--skip_bad_images)", num_skipped, flag)
    return ImageDataset(data, channels, resolution, random_crop=random_crop, num_skipped=num_skipped)


def load_data(
    args: DataArguments,
    resolution: int,
    channels: int,
    *,
    random_crop: bool = False,
    skip_bad_images: bool = False,
    max_train_samples: int | None = None,
) -> ImageDataset:
    """The images `args` names, as `load_image_dataset` loads them, at the model's `resolution` (the caller
    resolves `args.resolution`) and `channels`: the training set, with its training-only options, or evaluation's
    reference images."""
    options = {f.name: getattr(args, f.name) for f in fields(DataArguments) if f.name != "resolution"}
    return load_image_dataset(
        **options, resolution=resolution, channels=channels, random_crop=random_crop,
        skip_bad_images=skip_bad_images, max_train_samples=max_train_samples,
    )  # fmt: skip


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}; fix --{name}")


@contextmanager
def _as_data_error(flag: str, hint: str) -> Iterator[None]:
    """Re-raise what datasets / huggingface_hub raise while loading as a one-line DataError."""
    try:
        yield
    except DataError:
        raise
    except _LOAD_ERRORS as exc:
        raise DataError(f"could not load {flag}: {one_line(exc)}; {hint}") from None


def _load_split(
    dataset_name: str | None,
    config_name: str | None,
    split: str,
    train_data_dir: str | None,
    cache_dir: str | None,
) -> tuple[datasets.Dataset, str]:
    """The raw split (images still encoded) and the CLI flag that named its source, for messages."""
    if train_data_dir is not None:
        path, data_dir, flag = "imagefolder", train_data_dir, f"--train_data_dir {train_data_dir}"
        hint = "point --train_data_dir at a folder that contains image files (searched recursively)"
    else:
        path, data_dir, flag = dataset_name, None, f"--dataset_name {dataset_name}"
        hint = (
            "check the --dataset_name id or path, unset HF_HUB_OFFLINE if it must be downloaded, "
            "or pass a local folder of images with --train_data_dir"
        )
        markers = (datasets.config.DATASETDICT_JSON_FILENAME, datasets.config.DATASET_STATE_JSON_FILENAME)
        if any((Path(dataset_name) / marker).is_file() for marker in markers):  # a save_to_disk folder
            with _as_data_error(flag, hint):
                saved = datasets.load_from_disk(dataset_name)
            if isinstance(saved, datasets.DatasetDict):
                _check_split(split, saved, flag)
                return saved[split], flag
            return saved, flag

    with _as_data_error(flag, hint):
        builder = datasets.load_dataset_builder(path, name=config_name, data_dir=data_dir, cache_dir=cache_dir)
        _check_split(split, builder.config.data_files or builder.info.splits or {}, flag)
        builder.download_and_prepare()
        return builder.as_dataset(split=split), flag


def _check_split(split: str, available: Iterable[Any], flag: str) -> None:
    """Raise unless `split` is one of the `available` split names (no check when they are not known)."""
    names = sorted(str(name) for name in available)
    if names and split not in names:
        raise DataError(f"{flag} has no split {split!r}; pass --split with one of {names}")


def _find_image_column(features: datasets.Features, image_column: str | None, flag: str) -> str:
    columns = list(features)
    if image_column is not None:
        if image_column not in features:
            raise DataError(f"{flag} has no column {image_column!r} among {columns}; fix --image_column")
        return image_column
    image_features = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if len(image_features) > 1:
        raise DataError(f"{flag} has several image columns {image_features}; choose one with --image_column")
    candidates = image_features or [name for name in _IMAGE_COLUMN_NAMES if name in features]
    if not candidates:
        raise DataError(f"{flag} has no image column among {columns}; name it with --image_column")
    return candidates[0]


def _decode_batch(
    batch: dict[str, list[Any]],
    indices: list[int],
    *,
    column: str,
    resolution: int,
    channels: int,
    keep_aspect: bool,
    crop: bool,
    skip_bad_images: bool,
) -> dict[str, list[Any]]:
    """`Dataset.map` function: encoded images -> rows of `_FEATURES`, bad images raising or skipped."""
    out: dict[str, list[Any]] = {"pixels": [], "height": [], "width": []}
    for value, index in zip(batch[column], indices, strict=True):
        try:
            image = _prepare(_open_image(value), resolution, channels, keep_aspect=keep_aspect, crop=crop)
        except _DECODE_ERRORS as exc:
            path = value.get("path") if isinstance(value, dict) else None
            name = f"{path} (row {index})" if path else f"row {index}"
            if not skip_bad_images:
                raise DataError(
                    f"{name} is not a readable image ({one_line(exc)}); fix or remove it, "
                    "or pass --skip_bad_images to skip bad images"
                ) from None
            logger.warning("skipping %s: not a readable image (%s)", name, one_line(exc))
            continue
        out["pixels"].append(image.tobytes())
        out["height"].append(image.shape[1])
        out["width"].append(image.shape[2])
    return out


def _open_image(value: Any) -> Image.Image:
    """Decode one cell: datasets.Image storage ({"bytes", "path"}; EXIF orientation applied) or file bytes."""
    if isinstance(value, bytes):
        value = {"bytes": value}
    if not isinstance(value, dict):
        raise TypeError(f"expected an encoded image, got {type(value).__name__}")
    return datasets.Image().decode_example({"bytes": value.get("bytes"), "path": value.get("path")})


def _prepare(image: Image.Image, resolution: int, channels: int, *, keep_aspect: bool, crop: bool) -> np.ndarray:
    """Any PIL image -> uint8 (channels, H, W): short side resized to `resolution` if `keep_aspect` (then
    centre-cropped to the square if `crop`), else the whole image resized to the square."""
    image = _to_8bit(image).convert("L" if channels == 1 else "RGB")
    width, height = image.size
    if keep_aspect:
        short = min(width, height)
        size = (round(width * resolution / short), round(height * resolution / short))
    else:
        size = (resolution, resolution)
    image = image.resize(size, Image.Resampling.BICUBIC)
    array = np.asarray(image).reshape(size[1], size[0], channels).transpose(2, 0, 1)
    return _crop(array, resolution, 0.5) if crop else array


def _to_8bit(image: Image.Image) -> Image.Image:
    """L or RGB with 8 bits per channel: high bit depths scaled, alpha composited onto white."""
    if image.mode == "F" or image.mode == "I" or image.mode.startswith("I;16"):
        scale = 1.0 if image.mode == "F" else 255 / 65535
        values = np.asarray(image, dtype=np.float64) * scale
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
    if image.has_transparency_data:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("L" if image.mode in ("1", "L") else "RGB")


def _crop(array: np.ndarray, resolution: int, position: float) -> np.ndarray:
    """The `resolution` square of a (C, H, W) array whose short side is `resolution`, at `position` in [0, 1)
    along the long side (0.5 is the centre)."""
    height, width = array.shape[1:]
    top = int(position * (height - resolution + 1))
    left = int(position * (width - resolution + 1))
    return array[:, top : top + resolution, left : left + resolution]
