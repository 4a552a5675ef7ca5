"""load_image / probe_image on the unusual files people really have."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lora_trainer.config import ConfigError
from lora_trainer.data import ImageLoadError, load_image, parse_background, probe_image

RED, BLUE, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def close(pixel, expected, tolerance=12):
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected))


def two_halves(size=(40, 20), left=RED, right=BLUE) -> Image.Image:
    im = Image.new("RGB", size, right)
    im.paste(left, (0, 0, size[0] // 2, size[1]))
    return im


def test_exif_rotated_jpeg_is_upright_in_size_and_pixels(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    two_halves((40, 20)).save(path, "JPEG", quality=95, exif=exif.tobytes())

    assert probe_image(path) == (20, 40)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (20, 40)
    assert close(im.getpixel((10, 5)), RED)      # the stored left half is now on top
    assert close(im.getpixel((10, 34)), BLUE)


def test_exif_orientation_in_png_and_webp(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8  # shown rotated 90 degrees counter-clockwise
    for name, options in (("r.png", {}), ("r.webp", {"lossless": True})):
        two_halves((40, 20)).save(tmp_path / name, exif=exif.tobytes(), **options)
        assert probe_image(tmp_path / name) == (20, 40), name
        im = load_image(tmp_path / name)
        assert im.size == (20, 40) and close(im.getpixel((10, 34)), RED), name  # left half ends at the bottom


def test_rgba_is_composited_on_the_chosen_background(tmp_path):
    path = tmp_path / "alpha.png"
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    im.paste((255, 0, 0, 255), (0, 0, 4, 8))
    im.paste((0, 0, 255, 128), (4, 0, 6, 8))
    im.save(path)

    white = load_image(path)
    assert white.mode == "RGB"
    assert white.getpixel((0, 0)) == RED
    assert white.getpixel((7, 0)) == WHITE
    assert close(white.getpixel((4, 0)), (127, 127, 255), 2)  # half-transparent blue on white
    assert load_image(path, background="black").getpixel((7, 0)) == BLACK
    assert load_image(path, background="#00ff00").getpixel((7, 0)) == (0, 255, 0)


def test_palette_with_transparency_and_grayscale_alpha(tmp_path):
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, 4, 8))
    pal.save(tmp_path / "pal.png", transparency=0)
    pal.save(tmp_path / "pal.gif", transparency=0)
    for name in ("pal.png", "pal.gif"):
        im = load_image(tmp_path / name)
        assert im.getpixel((0, 0)) == RED and im.getpixel((7, 7)) == WHITE, name

    la = Image.new("LA", (4, 4), (50, 0))
    la.paste((50, 255), (0, 0, 2, 4))
    la.save(tmp_path / "la.png")
    im = load_image(tmp_path / "la.png", background="black")
    assert im.getpixel((0, 0)) == (50, 50, 50) and im.getpixel((3, 0)) == BLACK


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, "JPEG", quality=95)  # magenta + yellow ink = red
    im = load_image(path)
    assert im.mode == "RGB" and close(im.getpixel((8, 8)), RED, 20)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.zeros((8, 12), dtype=np.uint16)
    values[:, :4] = 65535
    values[:, 4:8] = 128 * 257
    Image.fromarray(values).save(tmp_path / "deep.png")
    im = load_image(tmp_path / "deep.png")
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == WHITE
    assert im.getpixel((5, 0)) == (128, 128, 128)
    assert im.getpixel((10, 0)) == BLACK


def test_grayscale_and_one_bit(tmp_path):
    Image.new("L", (4, 4), 100).save(tmp_path / "gray.png")
    Image.new("1", (4, 4), 1).save(tmp_path / "bw.bmp")
    assert load_image(tmp_path / "gray.png").getpixel((1, 1)) == (100, 100, 100)
    assert load_image(tmp_path / "bw.bmp").getpixel((1, 1)) == WHITE


@pytest.mark.parametrize("fmt,suffix", [("GIF", "gif"), ("WEBP", "webp")])
def test_animated_files_use_the_first_frame(tmp_path, fmt, suffix):
    path = tmp_path / f"anim.{suffix}"
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, (0, 255, 0))]
    options = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3
    im = load_image(path)
    assert close(im.getpixel((8, 8)), RED)


def test_garbage_truncated_and_missing_files_raise_with_path_and_reason(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00" * 100)
    full = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full, "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])

    with pytest.raises(ImageLoadError) as info:
        load_image(garbage)
    assert info.value.path == garbage and "not a readable image" in info.value.reason
    assert str(garbage) in str(info.value)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(cut)
    with pytest.raises(ImageLoadError, match="truncated"):
        probe_image(cut)
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "absent.png")


def test_harmless_trailing_bytes_do_not_reject_a_good_file(tmp_path):
    path = tmp_path / "trailer.jpg"
    buf = io.BytesIO()
    two_halves((64, 32)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue() + b"\x00APPENDED-BY-SOME-CAMERA" * 20)
    assert probe_image(path) == (64, 32)


def test_jpeg_draft_decodes_smaller_but_still_covers_the_request(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (800, 600), RED).save(path, "JPEG")
    im = load_image(path, draft_size=(150, 100))
    assert 150 <= im.size[0] < 800 and 100 <= im.size[1] < 600
    assert load_image(path).size == (800, 600)


def test_damaged_icc_profile_falls_back_to_plain_conversion(tmp_path):
    path = tmp_path / "icc.png"
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path, icc_profile=b"definitely not a profile")
    assert load_image(path).getpixel((0, 0)) == (10, 20, 30)


def test_background_values():
    assert parse_background("white") == WHITE
    assert parse_background("black") == BLACK
    assert parse_background("#102030") == (16, 32, 48)
    assert parse_background([1, 2, 3]) == (1, 2, 3)
    with pytest.raises(ConfigError, match="alpha_background"):
        parse_background("transparentish")
