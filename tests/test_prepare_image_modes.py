"""Images in every mode users' folders hold, and broken captions: each is read faithfully as 8-bit RGB or
reported in one line naming the file (no pipeline needed; the folder test runs prepare on a tiny one)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from shortcutfm.preparation.inputs import list_image_captions, read_prompt_file
from shortcutfm.preparation.prepare import UnsupportedImage, to_rgb


def reopened(image: Image.Image, fmt: str = "PNG", **kwargs) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return Image.open(io.BytesIO(buffer.getvalue()))


def png_16bit_rgb(array: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (Pillow cannot write one), from (H, W, 3) uint16."""
    height, width, _ = array.shape
    raw = b"".join(b"\x00" + array[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_16bit_grey_is_scaled_not_clipped():
    grey = reopened(Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16)))
    assert grey.mode.startswith("I")
    assert np.asarray(grey.convert("RGB"))[0, 1, 0] == 255  # what plain Pillow conversion does: white
    assert pixels(to_rgb(grey))[0, :, 0].tolist() == [0, 128, 255]


def test_16bit_rgb_keeps_its_colours():
    image = Image.open(io.BytesIO(png_16bit_rgb(np.array([[[0, 257 * 128, 65535], [65535, 0, 257 * 7]]], np.uint16))))
    assert pixels(to_rgb(image)).tolist() == [[[0, 128, 255], [255, 0, 7]]]


def test_transparency_is_composited_on_white():
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [200, 100, 0, 128]]], np.uint8), "RGBA")
    got = pixels(to_rgb(reopened(rgba)))
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == [10, 20, 30]
    assert np.abs(got[0, 2].astype(int) - [227, 177, 127]).max() <= 1  # half over white
    grey_alpha = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")
    assert pixels(to_rgb(reopened(grey_alpha))).tolist() == [[[255, 255, 255], [0, 0, 0]]]


def test_palette_images_with_and_without_a_transparent_index():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    assert pixels(to_rgb(reopened(palette))).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    assert pixels(to_rgb(reopened(palette, transparency=0))).tolist() == [[[255, 255, 255], [0, 0, 255]]]


def test_cmyk_one_bit_and_grey_convert():
    cmyk = Image.new("CMYK", (4, 4), (255, 0, 0, 0))  # full cyan
    got = pixels(to_rgb(reopened(cmyk, "JPEG", quality=100)))
    assert np.abs(got.astype(int) - [0, 255, 255]).max() <= 3
    assert pixels(to_rgb(reopened(Image.new("1", (2, 2), 1)))).tolist() == [[[255] * 3] * 2] * 2
    assert pixels(to_rgb(reopened(Image.new("L", (1, 1), 77)))).tolist() == [[[77, 77, 77]]]


def test_exif_rotation_is_applied():
    image = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8))  # 2 wide, 1 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated = to_rgb(reopened(image, exif=exif.tobytes()))
    assert rotated.size == (1, 2)
    assert pixels(rotated)[:, 0].tolist() == [[255, 0, 0], [0, 0, 255]]


def test_float_images_are_refused_with_the_way_out():
    with pytest.raises(UnsupportedImage, match="32-bit floating-point image.*save it as an 8- or 16-bit PNG"):
        to_rgb(Image.new("F", (2, 2), 0.5))


def test_empty_and_non_utf8_captions_are_named_per_image(tmp_path):
    for name in ("good", "empty", "latin1", "bom"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "good.txt").write_text("a red circle")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("un caf\xe9".encode("latin-1"))
    (tmp_path / "bom.txt").write_bytes("\ufeffa blue square".encode("utf-8"))
    items = {item.relative_name: item for item in list_image_captions(tmp_path)}
    assert items["good.png"].caption == "a red circle" and items["bom.png"].caption == "a blue square"
    assert items["empty.png"].caption is None and "empty.txt is empty" in items["empty.png"].missing_caption_hint
    latin = items["latin1.png"]
    assert latin.caption is None
    assert "latin1.txt is not UTF-8 text (byte 0xe9 at position 6); save it as UTF-8" in latin.missing_caption_hint


def test_non_utf8_prompt_file_and_caption_index_are_one_line_errors(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a cat\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"prompts.txt is not UTF-8 text \(byte 0xff at position 6\)"):
        read_prompt_file(prompts)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="metadata.jsonl is not UTF-8 text"):
        list_image_captions(tmp_path)
