"""Tests for hf_ddpm.data: every fixture image is written here, nothing is downloaded."""

from __future__ import annotations

import io

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from hf_ddpm import data
from hf_ddpm.data import BUILTIN_DIGITS, EpochOrder, digits_images, digits_labels, load_image_dataset
from hf_ddpm.errors import DataError

RGB = (200, 100, 50)


def _luma(rgb: tuple[int, int, int]) -> int:
    """ITU-R 601-2 luma, the grayscale every source is converted with."""
    return round(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _palette(index: int) -> Image.Image:
    """A solid palette image of entry `index`: 0 is opaque (10, 200, 30), 1 is transparent."""
    image = Image.new("P", (8, 6), index)
    image.putpalette([10, 200, 30, 0, 0, 0])
    image.info["transparency"] = 1
    return image


def _gray_with_trns() -> Image.Image:
    image = Image.new("L", (8, 6), 100)
    image.info["transparency"] = 100  # a grayscale PNG whose value 100 is transparent (tRNS chunk)
    return image


# file name -> (solid image, its expected RGB after conversion); sorted names fix the row order.
MODES = {
    "00_1.png": (Image.new("1", (8, 6), 1), (255, 255, 255)),
    "01_l.png": (Image.new("L", (8, 6), 100), (100, 100, 100)),
    "02_l_black.png": (Image.new("L", (8, 6), 0), (0, 0, 0)),
    "03_la_opaque.png": (Image.new("LA", (8, 6), (100, 255)), (100, 100, 100)),
    "04_la_clear.png": (Image.new("LA", (8, 6), (100, 0)), (255, 255, 255)),
    "05_l_trns.png": (_gray_with_trns(), (255, 255, 255)),
    "06_rgb.png": (Image.new("RGB", (8, 6), RGB), RGB),
    "07_rgba_clear.png": (Image.new("RGBA", (8, 6), (*RGB, 0)), (255, 255, 255)),
    "08_rgba_fifth.png": (Image.new("RGBA", (8, 6), (*RGB, 51)), (244, 224, 214)),  # 0.2 * RGB + 0.8 * white
    "09_cmyk.tiff": (Image.new("CMYK", (8, 6), (0, 255, 255, 0)), (255, 0, 0)),
    "10_p.png": (_palette(0), (10, 200, 30)),
    "11_p_clear.png": (_palette(1), (255, 255, 255)),
    "12_i16.png": (Image.new("I;16", (8, 6), 77 * 257), (77, 77, 77)),  # scaled: clipping would give 255
    "13_i16_max.png": (Image.new("I;16", (8, 6), 65535), (255, 255, 255)),
    "14_i32.tiff": (Image.new("I", (8, 6), 128 * 257), (128, 128, 128)),
    "15_f.tiff": (Image.new("F", (8, 6), 99.6), (100, 100, 100)),
}


def _save(image: Image.Image, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _gradient(width: int, height: int) -> Image.Image:
    """RGB image whose red grows left to right and green top to bottom, so every crop is distinguishable."""
    x = np.linspace(0, 255, width).round().astype(np.uint8)
    y = np.linspace(0, 255, height).round().astype(np.uint8)
    rgb = np.stack(np.broadcast_arrays(x[None, :], y[:, None], np.uint8(90)), axis=-1)
    return Image.fromarray(np.ascontiguousarray(rgb))


def _chw(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).transpose(2, 0, 1)


def _image_dataset(n: int, color: int = 0) -> datasets.Dataset:
    images = [Image.new("RGB", (6, 6), (color + i, 0, 0)) for i in range(n)]
    return datasets.Dataset.from_dict(
        {"img": images, "label": list(range(n))},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")}),
    )


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "hf_cache")


# --- built-in digits ---------------------------------------------------------------------------------------


def test_digits_images_are_the_sklearn_digits():
    native = digits_images(8)
    assert native.shape == (1797, 1, 8, 8) and native.dtype == np.uint8
    np.testing.assert_array_equal(native[:, 0], np.round(load_digits().images * 255 / 16))

    images, labels = digits_images(16), digits_labels()
    assert images.shape == (1797, 1, 16, 16) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    assert labels.shape == (1797,) and sorted(set(labels.tolist())) == list(range(10))
    means = np.stack([images[labels == k, 0].mean(0) for k in range(10)]).astype(np.float64)
    distances = np.abs(means[:, None] - means[None, :]).mean(axis=(2, 3))
    assert distances[~np.eye(10, dtype=bool)].min() > 5  # every class has its own mean image
    centre = means[:, 6:10, 6:10].mean(axis=(1, 2))
    assert centre[1] > 100 > centre[0]  # a "1" has ink in the middle, a "0" a hole


def test_builtin_digits_dataset_is_the_default():
    ds = load_image_dataset(resolution=16, channels=3)
    assert (len(ds), ds.channels, ds.resolution, ds.num_skipped) == (1797, 3, 16, 0)
    pixels = ds.pixels()
    assert pixels.dtype == torch.uint8 and pixels.shape == (1797, 3, 16, 16)
    np.testing.assert_array_equal(pixels.numpy(), np.repeat(digits_images(16), 3, axis=1))

    small = load_image_dataset(BUILTIN_DIGITS, resolution=8, channels=1, max_train_samples=10)
    assert len(small) == 10 and small.pixels().shape == (10, 1, 8, 8)


def test_get_batch_scaling_is_exact_and_deterministic():
    ds = load_image_dataset(BUILTIN_DIGITS, resolution=8, channels=1)
    indices = [3, 1, 4, 1, 5, 9, 2, 6]
    batch = ds.get_batch(indices)
    assert batch.dtype == torch.float32 and batch.shape == (8, 1, 8, 8)
    assert torch.equal(batch, ds.pixels(indices).float() / 127.5 - 1)
    assert batch.min() == -1.0 and batch.max() == 1.0  # 0 -> -1 and 255 -> 1 exactly

    def flipped(seed: int) -> torch.Tensor:
        return ds.get_batch(indices, torch.Generator().manual_seed(seed), random_flip=True)

    assert torch.equal(flipped(7), flipped(7))
    assert not torch.equal(flipped(7), flipped(8))


# --- image folders: modes, geometry, augmentation ---------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_converts_every_mode(tmp_path, cache_dir, channels):
    for name, (image, _) in MODES.items():
        _save(image, tmp_path / "images" / name)
    ds = load_image_dataset(
        train_data_dir=str(tmp_path / "images"), resolution=4, channels=channels, cache_dir=cache_dir
    )
    assert len(ds) == len(MODES) and ds.channels == channels
    pixels = ds.pixels().numpy()
    assert pixels.shape == (len(MODES), channels, 4, 4)
    for name, row in zip(MODES, pixels, strict=True):
        rgb = MODES[name][1]
        expected = rgb if channels == 3 else (_luma(rgb),)
        np.testing.assert_array_equal(row, np.broadcast_to(np.reshape(expected, (-1, 1, 1)), row.shape), name)
    batch = ds.get_batch(range(len(ds)))
    assert batch[0].eq(1).all() and batch[2].eq(-1).all()  # white -> 1, black -> -1


def test_centre_crop_squash_and_random_crop(tmp_path, cache_dir):
    landscape, portrait = _gradient(40, 20), _gradient(20, 40)
    _save(landscape, tmp_path / "images" / "a_landscape.png")
    _save(portrait, tmp_path / "images" / "b_portrait.png")
    folder = str(tmp_path / "images")

    centre = load_image_dataset(train_data_dir=folder, resolution=10, cache_dir=cache_dir).pixels().numpy()
    np.testing.assert_array_equal(centre[0], _chw(landscape.resize((20, 10), Image.BICUBIC))[:, :, 5:15])
    np.testing.assert_array_equal(centre[1], _chw(portrait.resize((10, 20), Image.BICUBIC))[:, 5:15, :])

    squash = load_image_dataset(train_data_dir=folder, resolution=10, center_crop=False, cache_dir=cache_dir)
    np.testing.assert_array_equal(squash.pixels().numpy()[0], _chw(landscape.resize((10, 10), Image.BICUBIC)))

    ds = load_image_dataset(train_data_dir=folder, resolution=10, random_crop=True, cache_dir=cache_dir)
    assert ds.random_crop and (ds.data["height"], ds.data["width"]) == ([10, 20], [20, 10])
    np.testing.assert_array_equal(ds.pixels().numpy(), centre)  # the evaluation view is the centre crop
    full = [_chw(landscape.resize((20, 10), Image.BICUBIC)), _chw(portrait.resize((10, 20), Image.BICUBIC))]
    windows = [
        [full[0][:, :, o : o + 10] for o in range(11)],  # every horizontal crop of the landscape
        [full[1][:, o : o + 10, :] for o in range(11)],  # every vertical crop of the portrait
    ]
    offsets: list[set[int]] = [set(), set()]
    for seed in range(12):
        batch = ds.get_batch([0, 1], torch.Generator().manual_seed(seed))
        assert torch.equal(batch, ds.get_batch([0, 1], torch.Generator().manual_seed(seed)))
        crops = ((batch + 1) * 127.5).round().to(torch.uint8).numpy()
        for row in range(2):
            matches = [o for o, window in enumerate(windows[row]) if np.array_equal(crops[row], window)]
            assert len(matches) == 1
            offsets[row].update(matches)
    assert len(offsets[0]) > 3 and len(offsets[1]) > 3  # the crop really moves with the generator


def test_random_flip(tmp_path, cache_dir):
    _save(_gradient(12, 12), tmp_path / "images" / "gradient.png")
    ds = load_image_dataset(train_data_dir=str(tmp_path / "images"), resolution=8, cache_dir=cache_dir)
    base = ds.get_batch([0])[0]
    assert torch.equal(ds.get_batch([0] * 16, random_flip=False), base.expand(16, -1, -1, -1))
    batch = ds.get_batch([0] * 16, torch.Generator().manual_seed(0), random_flip=True)
    flipped = [bool(torch.equal(image, base.flip(-1))) for image in batch]
    unflipped = [bool(torch.equal(image, base)) for image in batch]
    assert all(f != u for f, u in zip(flipped, unflipped, strict=True))  # each is exactly one of the two
    assert any(flipped) and any(unflipped)
    assert torch.equal(batch, ds.get_batch([0] * 16, torch.Generator().manual_seed(0), random_flip=True))


def test_decodes_once_and_reuses_the_arrow_cache(tmp_path, cache_dir, monkeypatch):
    for i in range(3):
        _save(Image.new("RGB", (10, 8), (i, 50, 60)), tmp_path / "images" / f"{i}.png")
    calls = []
    open_image = data._open_image
    monkeypatch.setattr(data, "_open_image", lambda value: calls.append(value) or open_image(value))
    folder = str(tmp_path / "images")

    first = load_image_dataset(train_data_dir=folder, resolution=4, cache_dir=cache_dir)
    assert len(calls) == 3 and first.data.cache_files  # memory-mapped arrow, not an in-memory table
    second = load_image_dataset(train_data_dir=folder, resolution=4, cache_dir=cache_dir)
    assert len(calls) == 3 and second.data.cache_files == first.data.cache_files
    assert torch.equal(second.pixels(), first.pixels())
    load_image_dataset(train_data_dir=folder, resolution=6, cache_dir=cache_dir)  # new settings: decode again
    assert len(calls) == 6


# --- other sources ------------------------------------------------------------------------------------------


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    _image_dataset(3, color=10).save_to_disk(tmp_path / "single")
    ds = load_image_dataset(str(tmp_path / "single"), resolution=4)
    assert len(ds) == 3
    np.testing.assert_array_equal(ds.pixels()[:, 0, 0, 0].numpy(), [10, 11, 12])

    datasets.DatasetDict({"train": _image_dataset(4), "test": _image_dataset(2, color=100)}).save_to_disk(
        tmp_path / "dict"
    )
    test = load_image_dataset(str(tmp_path / "dict"), split="test", resolution=4)
    np.testing.assert_array_equal(test.pixels()[:, 0, 0, 0].numpy(), [100, 101])
    assert len(load_image_dataset(str(tmp_path / "dict"), resolution=4)) == 4
    with pytest.raises(DataError, match=r"no split 'validation'.*--split.*\['test', 'train'\]"):
        load_image_dataset(str(tmp_path / "dict"), split="validation")


def test_local_folder_laid_out_as_a_hub_repo(tmp_path, cache_dir):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "extra").mkdir()
    _image_dataset(3, color=20).to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    _image_dataset(2, color=70).to_parquet(str(repo / "extra" / "validation-00000-of-00001.parquet"))
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "- config_name: extra\n  data_files:\n  - split: validation\n    path: extra/validation-*\n"
        "---\n# A tiny test dataset\n"
    )
    train = load_image_dataset(str(repo), resolution=4, cache_dir=cache_dir)
    np.testing.assert_array_equal(train.pixels()[:, 0, 0, 0].numpy(), [20, 21, 22])
    extra = load_image_dataset(
        str(repo), dataset_config_name="extra", split="validation", resolution=4, cache_dir=cache_dir
    )
    np.testing.assert_array_equal(extra.pixels()[:, 0, 0, 0].numpy(), [70, 71])
    with pytest.raises(DataError, match=r"no split 'train'.*--split.*\['validation'\]"):
        load_image_dataset(str(repo), dataset_config_name="extra", cache_dir=cache_dir)
    with pytest.raises(DataError, match="could not load --dataset_name.*'nope'"):
        load_image_dataset(str(repo), dataset_config_name="nope", cache_dir=cache_dir)


def test_hub_id_offline_is_a_data_error(monkeypatch, cache_dir):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    expected = "could not load --dataset_name nobody/no-such-dataset: .*HF_HUB_OFFLINE.*--train_data_dir"
    with pytest.raises(DataError, match=expected) as e:
        load_image_dataset("nobody/no-such-dataset", cache_dir=cache_dir)
    assert "\n" not in str(e.value)


# --- bad data -----------------------------------------------------------------------------------------------


def _folder_with_bad_images(tmp_path) -> str:
    folder = tmp_path / "images"
    _save(Image.new("RGB", (6, 6), RGB), folder / "a_good.png")
    (folder / "b_text.png").write_text("this is not an image")
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    (folder / "c_truncated.png").write_bytes(_png_bytes(Image.fromarray(noise))[:1500])  # valid header
    _save(Image.new("L", (6, 6), 9), folder / "d_good.png")
    return str(folder)


@pytest.mark.parametrize("bad", ["b_text.png", "c_truncated.png"])
def test_bad_image_names_the_file(tmp_path, cache_dir, bad):
    folder = _folder_with_bad_images(tmp_path)
    if bad == "c_truncated.png":
        (tmp_path / "images" / "b_text.png").unlink()
    expected = rf"images/{bad} \(row \d\) is not a readable image .*; .*--skip_bad_images"
    with pytest.raises(DataError, match=expected) as e:
        load_image_dataset(train_data_dir=folder, resolution=4, cache_dir=cache_dir)
    assert "\n" not in str(e.value)


def test_skip_bad_images_counts_and_logs(tmp_path, cache_dir, caplog):
    folder = _folder_with_bad_images(tmp_path)
    settings = {"train_data_dir": folder, "resolution": 4, "skip_bad_images": True, "cache_dir": cache_dir}
    with caplog.at_level("WARNING", logger="hf_ddpm.data"):
        ds = load_image_dataset(**settings)
    assert (len(ds), ds.num_skipped) == (2, 2)
    assert "b_text.png" in caplog.text and "c_truncated.png" in caplog.text
    np.testing.assert_array_equal(ds.pixels()[:, :, 0, 0].numpy(), [RGB, (9, 9, 9)])
    assert load_image_dataset(**settings).num_skipped == 2  # also known when the rows come from the cache

    for good in ("a_good.png", "d_good.png"):
        (tmp_path / "images" / good).unlink()
    with pytest.raises(DataError, match="all 2 images .* are unreadable"):
        load_image_dataset(**settings)


def test_empty_or_missing_folder(tmp_path, cache_dir):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(DataError, match="--train_data_dir .*contains image files") as e:
            load_image_dataset(train_data_dir=str(folder), cache_dir=cache_dir)
        assert "\n" not in str(e.value)


def test_unknown_split(tmp_path, cache_dir):
    _save(Image.new("RGB", (6, 6), RGB), tmp_path / "images" / "a.png")
    with pytest.raises(DataError, match=r"no split 'test'; pass --split with one of \['train'\]"):
        load_image_dataset(train_data_dir=str(tmp_path / "images"), split="test", cache_dir=cache_dir)


def test_missing_or_ambiguous_image_column(tmp_path):
    datasets.Dataset.from_dict({"label": [1, 2], "text": ["a", "b"]}).save_to_disk(tmp_path / "no_image")
    with pytest.raises(DataError, match=r"no image column among \['label', 'text'\].*--image_column"):
        load_image_dataset(str(tmp_path / "no_image"))
    with pytest.raises(DataError, match=r"no column 'photo' among \['label', 'text'\].*--image_column"):
        load_image_dataset(str(tmp_path / "no_image"), image_column="photo")
    with pytest.raises(DataError, match=r"row 0 is not a readable image \(expected an encoded image"):
        load_image_dataset(str(tmp_path / "no_image"), image_column="label")

    two = datasets.Dataset.from_dict(
        {"img": [Image.new("RGB", (6, 6), RGB)] * 2, "mask": [Image.new("L", (6, 6))] * 2},
        features=datasets.Features({"img": datasets.Image(), "mask": datasets.Image()}),
    )
    two.save_to_disk(tmp_path / "two")
    with pytest.raises(DataError, match=r"several image columns \['img', 'mask'\].*--image_column"):
        load_image_dataset(str(tmp_path / "two"))
    mask = load_image_dataset(str(tmp_path / "two"), image_column="mask", channels=1, resolution=4)
    assert mask.pixels().eq(0).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resolution": 0}, "resolution must be a positive integer"),
        ({"resolution": 8.0}, "resolution must be a positive integer"),
        ({"channels": 2}, "channels must be 1 .* or 3"),
        ({"max_train_samples": 0}, "max_train_samples must be a positive integer"),
        ({"dataset_name": BUILTIN_DIGITS, "train_data_dir": "x"}, "pass only one of them"),
    ],
)
def test_invalid_settings(kwargs, message):
    with pytest.raises(DataError, match=message):
        load_image_dataset(**kwargs)


def test_epoch_order_gives_disjoint_rank_shards_of_one_global_batch_and_new_permutations():
    order = EpochOrder(num_rows=20, global_micro_batch=8, seed=0)
    assert order.micro_steps_per_epoch == 2
    shards = [order.indices(0, rank, 4) for rank in (0, 1)]
    assert len(set(shards[0]) | set(shards[1])) == 8
    epoch0 = order.indices(0, 0, 8) + order.indices(1, 0, 8)
    assert len(set(epoch0)) == 16
    assert order.indices(2, 0, 8) != order.indices(0, 0, 8)  # a fresh permutation each epoch
    assert EpochOrder(20, 8, 0).indices(3, 1, 4) == order.indices(3, 1, 4)  # position alone decides
