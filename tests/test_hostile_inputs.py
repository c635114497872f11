"""A hostile --train_data_dir, made here with PIL and numpy: every file gets its exact pixels or a one-line error.

Read correctly (pixels checked): 16-bit and 32-bit float TIFFs, a CMYK JPEG, palette + transparency, LA,
animated GIF and WebP (the first frame), an EXIF-rotated JPEG (orientation applied), a PNG named .jpg, 1x1 and
20000x20 images. Refused with a one-line DataError naming the file, or skipped and counted with
--skip_bad_images: truncated PNG and JPEG, a zero-byte file, a decompression bomb (Pillow's limit kept and quoted)
and, where the tests do not run as root, a file without read permission. Not listed at all, like any file
without an image extension: text and binary files, and symlink loops (file and folder), which end the walk
instead of hanging it.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_unprivileged, unprivileged_folder
from PIL import Image

from hf_ddpm.data import load_image_dataset
from hf_ddpm.errors import DataError

RGB = (200, 100, 50)
RED, BLUE = (250, 0, 0), (0, 0, 250)
ROOT = os.geteuid() == 0  # root reads files whatever their permission bits


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int, height: int) -> bytes:
    """A 69-byte PNG whose header claims width x height 8-bit grayscale pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def _exif_rotated() -> bytes:
    """16x8 stored, red left half and blue right; EXIF orientation 6 shows it 8x16, red on top."""
    halves = np.zeros((8, 16, 3), np.uint8)
    halves[:, :8], halves[:, 8:] = RED, BLUE
    image = Image.fromarray(halves)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return _encoded(image, "JPEG", exif=exif, quality=95)


def _animated(fmt: str, **options) -> bytes:
    first, second = Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)
    return _encoded(first, fmt, save_all=True, append_images=[second], **options)


def _transparent_palette() -> Image.Image:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([10, 200, 30, 0, 0, 0])
    image.info["transparency"] = 1
    return image


NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
# file -> (its bytes, the 4x4 RGB pixels expected: one colour, or (top row colour, bottom row colour))
GOOD = {
    "a_i16.tiff": (_encoded(Image.new("I;16", (8, 8), 77 * 257), "TIFF"), (77, 77, 77)),
    "b_f32.tiff": (_encoded(Image.new("F", (8, 8), 99.6), "TIFF"), (100, 100, 100)),
    "c_cmyk.jpg": (_encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95), (255, 0, 0)),
    "d_palette_clear.png": (_encoded(_transparent_palette(), "PNG"), (255, 255, 255)),
    "e_la_half.png": (_encoded(Image.new("LA", (8, 8), (50, 128)), "PNG"), (152, 152, 152)),  # (50a + 255(255-a))/255
    "f_anim.gif": (_animated("GIF"), RED),
    "g_anim.webp": (_animated("WEBP", lossless=True), RED),
    "h_exif6.jpg": (_exif_rotated(), (RED, BLUE)),
    "i_png_named.jpg": (_encoded(Image.new("RGB", (8, 8), RGB), "PNG"), RGB),
    "j_1x1.png": (_encoded(Image.new("RGB", (1, 1), RGB), "PNG"), RGB),
    "k_20000x20.png": (_encoded(Image.new("RGB", (20000, 20), RGB), "PNG"), RGB),
    "l_unreadable.png": (_encoded(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG"), (1, 2, 3)),  # root only
}
BAD = {
    "m_truncated.png": (_encoded(NOISE, "PNG")[:3000], "image file is truncated"),
    "n_truncated.jpg": (_encoded(NOISE, "JPEG")[:2000], "image file is truncated"),
    "o_zero_bytes.png": (b"", "cannot identify image file"),
    "p_bomb.png": (_bomb_png(20000, 20000), "Image size \\(400000000 pixels\\) exceeds limit of 178956970 pixels"),
}
IGNORED = ("notes.txt", "blob.bin", "loop_a.png", "loop_b.png", "sub/loop")


def _corpus(folder: Path, names) -> Path:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name in GOOD or name in BAD:
            path.write_bytes((GOOD.get(name) or BAD[name])[0])
    if "l_unreadable.png" in names:
        os.chmod(folder / "l_unreadable.png", 0)
    (folder / "notes.txt").write_text("not an image")
    (folder / "blob.bin").write_bytes(os.urandom(64))
    os.symlink(folder / "loop_b.png", folder / "loop_a.png")  # a file symlink loop with an image extension
    os.symlink(folder / "loop_a.png", folder / "loop_b.png")
    (folder / "sub").mkdir(exist_ok=True)
    os.symlink(folder, folder / "sub" / "loop")  # a folder loop
    return folder


def _expected(colours) -> np.ndarray:
    top, bottom = colours if isinstance(colours[0], tuple) else (colours, colours)
    rows = [top, top, bottom, bottom]
    return np.array(rows, dtype=np.uint8)[:, None, :].repeat(4, axis=1).transpose(2, 0, 1)


def test_hostile_folder_gives_exact_pixels_and_counts_the_bad_files(tmp_path, caplog):
    good = [name for name in GOOD if ROOT or name != "l_unreadable.png"]
    folder = _corpus(tmp_path / "images", [*good, *BAD] + ([] if ROOT else ["l_unreadable.png"]))
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    with caplog.at_level("WARNING", logger="hf_ddpm.data"):
        ds = load_image_dataset(train_data_dir=str(folder), resolution=4, channels=3, skip_bad_images=True,
                                cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's limit is kept
    skipped = len(BAD) + (0 if ROOT else 1)
    assert (len(ds), ds.num_skipped) == (len(good), skipped)
    for name, row in zip(good, ds.pixels().numpy(), strict=True):  # rows come in file-name order
        expected = _expected(GOOD[name][1])
        tolerance = 6 if name.endswith(".jpg") and "png" not in name else 0  # JPEG is lossy
        if name == "h_exif6.jpg":  # the red/blue edge is blurred by the resize: check the outer rows only
            row, expected = row[:, [0, 3]], expected[:, [0, 3]]
        assert np.abs(row.astype(int) - expected).max() <= tolerance, (name, row[:, :, 0].tolist())
    for name, (_, message) in BAD.items():
        assert re.search(rf"{name} \(row \d+\): not a readable image \({message}", caplog.text), name
    assert not any(ignored in caplog.text for ignored in IGNORED)


@pytest.mark.parametrize("bad", [*BAD, *([] if ROOT else ["l_unreadable.png"])])
def test_each_bad_file_alone_is_a_one_line_error_naming_it(tmp_path, bad):
    folder = _corpus(tmp_path / "images", ["j_1x1.png", bad])
    message = BAD[bad][1] if bad in BAD else "Permission denied"
    expected = rf"images/{bad} \(row 1\) is not a readable image \({message}.*\); fix or remove it, or pass --skip_bad"
    with pytest.raises(DataError, match=expected) as caught:
        load_image_dataset(train_data_dir=str(folder), resolution=4, cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(caught.value)


def test_an_unreadable_file_is_a_one_line_error_or_a_counted_skip_where_permission_bits_apply():
    """l_unreadable.png under a root CI: in a child without the capabilities with which root reads it anyway."""
    folder = unprivileged_folder()
    _corpus(folder / "images", ["j_1x1.png", "l_unreadable.png"])
    load = "load_image_dataset(train_data_dir='images', resolution=4, cache_dir='cache{}'{})"
    code = ("import sys; from hf_ddpm.cli import run_cli; from hf_ddpm.data import load_image_dataset; "
            f"sys.exit(run_cli(lambda: {load.format(1, '')}));")  # fmt: skip
    failed = run_unprivileged(code, folder)
    code = ("from hf_ddpm.data import load_image_dataset; "
            f"ds = {load.format(2, ', skip_bad_images=True')}; print(len(ds), ds.num_skipped)")  # fmt: skip
    skipped = run_unprivileged(code, folder)
    shutil.rmtree(folder)
    assert failed.returncode == 1, failed.stderr[-2000:]
    expected = (r"error: \S*/images/l_unreadable.png \(row 1\) is not a readable image \(.*Permission denied.*\); fix "
                r"or remove it, or pass --skip_bad")  # fmt: skip
    assert re.match(expected, failed.stderr.strip().splitlines()[-1]), failed.stderr[-2000:]
    assert skipped.returncode == 0 and skipped.stdout.split() == ["1", "1"], skipped.stderr[-2000:]
