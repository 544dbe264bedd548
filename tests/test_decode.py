"""indexer.decode.open_image: size, orientation, draft, modes, formats and clear errors."""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from conftest import png_header, make_photo, save_photo
from indexer.decode import DEFAULT_MAX_PIXELS, Decoded, DecodeError, open_image, target_size

T = Image.Transpose


def mad(a, b) -> float:
    """Mean absolute difference of two uint8 arrays of the same shape."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def rgb(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def check_decoded(d: Decoded, width: int, height: int, longest: int) -> None:
    assert isinstance(d, Decoded)
    assert (d.width, d.height) == (width, height)
    assert d.pixels.dtype == np.uint8 and d.pixels.ndim == 3 and d.pixels.shape[2] == 3
    h, w = d.pixels.shape[:2]
    assert max(w, h) == longest
    # Aspect ratio kept: the short side is the exact one, rounded (but at least 1 pixel).
    exact = min(width, height) * longest / max(width, height)
    assert abs(min(w, h) - max(1.0, exact)) <= 0.5 + 1e-9
    assert (w >= h) == (width >= height)


@contextlib.contextmanager
def no_unclosed_files():
    """Fail if a file opened inside the block is left for the garbage collector to close."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text and "\r" not in text, repr(text)
    return text.lower()


# --- size ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, longest",
    [((96, 64), 48), ((64, 96), 48), ((200, 37), 50), ((37, 200), 64), ((12, 8), 48), ((300, 1), 30)],
)
def test_longest_side_and_aspect_ratio(tmp_path: Path, size, longest):
    path = save_photo(tmp_path / "p.png", seed=1, size=size)
    d = open_image(path, longest)
    check_decoded(d, size[0], size[1], longest)


def test_resize_keeps_whole_picture_no_crop(tmp_path: Path):
    """The result is the whole picture scaled down: it matches a plain resize of it."""
    src = make_photo(2, (240, 160))
    path = tmp_path / "p.png"
    src.save(path)
    d = open_image(path, 120)
    assert d.pixels.shape == (80, 120, 3)
    assert mad(d.pixels, rgb(src.resize((120, 80), Image.Resampling.BICUBIC))) < 3
    # A centre crop, or a squash to a square, would differ a lot.
    crop = src.crop((40, 0, 200, 160)).resize((120, 80), Image.Resampling.BICUBIC)
    assert mad(d.pixels, rgb(crop)) > 15


def test_small_image_is_upscaled(tmp_path: Path):
    src = make_photo(3, (16, 12))
    path = tmp_path / "small.png"
    src.save(path)
    d = open_image(path, 64)
    check_decoded(d, 16, 12, 64)
    assert d.pixels.shape == (48, 64, 3)
    assert mad(d.pixels, rgb(src.resize((64, 48), Image.Resampling.BICUBIC))) < 3


def test_same_size_is_exact(tmp_path: Path):
    src = make_photo(4, (40, 30))
    path = tmp_path / "p.png"
    src.save(path)
    d = open_image(path, 40)
    assert np.array_equal(d.pixels, rgb(src))


def test_pil_image_source(tmp_path: Path):
    src = make_photo(5, (60, 40))
    d = open_image(src, 30)
    check_decoded(d, 60, 40, 30)
    assert mad(d.pixels, rgb(src.resize((30, 20), Image.Resampling.BICUBIC))) < 3


def test_target_size():
    assert target_size(4000, 3000, 448) == (448, 336)
    assert target_size(3000, 4000, 448) == (336, 448)
    assert target_size(10000, 1, 100) == (100, 1)


# --- EXIF orientation ---------------------------------------------------------------------

# Orientation tag -> what to do to the upright picture so that applying the tag undoes it.
STORE = {
    2: T.FLIP_LEFT_RIGHT,
    3: T.ROTATE_180,
    4: T.FLIP_TOP_BOTTOM,
    5: T.TRANSPOSE,
    6: T.ROTATE_90,
    7: T.TRANSVERSE,
    8: T.ROTATE_270,
}


def save_oriented(path: Path, upright: Image.Image, orientation: int, **kw) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright.transpose(STORE[orientation]).save(path, exif=exif.tobytes(), **kw)


@pytest.mark.parametrize("orientation", [3, 6, 8, 2, 4, 5, 7])
def test_exif_orientation_jpeg(tmp_path: Path, orientation: int):
    upright = make_photo(10, (96, 64))
    path = tmp_path / "o.jpg"
    save_oriented(path, upright, orientation, quality=95)
    with Image.open(path) as raw:
        stored_size = raw.size
    d = open_image(path, 96)
    check_decoded(d, 96, 64, 96)
    if orientation in (5, 6, 7, 8):
        assert stored_size == (64, 96)  # the file really is sideways
    expected = rgb(upright)
    assert mad(d.pixels, expected) < 6
    # The test can tell: the picture as stored (unrotated) is far from upright.
    stored = upright.transpose(STORE[orientation])
    if stored.size == upright.size:
        assert mad(rgb(stored), expected) > 20


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_scaled_and_png(tmp_path: Path, orientation: int):
    upright = make_photo(11, (120, 80))
    path = tmp_path / "o.png"
    save_oriented(path, upright, orientation)
    d = open_image(path, 60)
    check_decoded(d, 120, 80, 60)
    assert mad(d.pixels, rgb(upright.resize((60, 40), Image.Resampling.BICUBIC))) < 3


def test_exif_orientation_large_jpeg_with_draft(tmp_path: Path):
    """Draft decoding and orientation together: a big sideways JPEG comes out upright."""
    upright = make_photo(12, (160, 120)).resize((1600, 1200), Image.Resampling.BICUBIC)
    path = tmp_path / "big.jpg"
    save_oriented(path, upright, 6, quality=90)
    d = open_image(path, 160)
    check_decoded(d, 1600, 1200, 160)
    assert mad(d.pixels, rgb(upright.resize((160, 120), Image.Resampling.BICUBIC))) < 4


# --- JPEG draft ---------------------------------------------------------------------------


def test_large_jpeg_uses_draft_and_matches_full_decode(tmp_path: Path):
    big = make_photo(13, (400, 300)).resize((4000, 3000), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(0)
    noisy = np.clip(np.asarray(big, np.int16) + rng.integers(-8, 9, (3000, 4000, 3)), 0, 255)
    path = tmp_path / "big.jpg"
    Image.fromarray(noisy.astype(np.uint8)).save(path, quality=90)

    d = open_image(path, 448)
    check_decoded(d, 4000, 3000, 448)
    with Image.open(path) as full:
        reference = rgb(full.resize((448, 336), Image.Resampling.BICUBIC, reducing_gap=3.0))
    assert mad(d.pixels, reference) < 3

    # An image handed in is the caller's: it is decoded at full size and left
    # as it was. The pixels then differ a little from the file's draft decode,
    # which shows that the file went through draft mode.
    with Image.open(path) as im:
        d2 = open_image(im, 448)
        assert im.size == (4000, 3000)
    assert (d2.width, d2.height) == (4000, 3000)
    assert not np.array_equal(d2.pixels, d.pixels)
    assert mad(d2.pixels, d.pixels) < 3


# --- modes --------------------------------------------------------------------------------


def test_palette(tmp_path: Path):
    src = make_photo(20, (48, 32)).quantize(16)
    assert src.mode == "P"
    path = tmp_path / "p.png"
    src.save(path)
    d = open_image(path, 48)
    assert np.array_equal(d.pixels, rgb(src))


def half_transparent(colour: tuple[int, int, int]) -> Image.Image:
    """A 20x10 palette image: left half palette index 0 (to be transparent), right half ``colour``."""
    im = Image.new("P", (20, 10), 0)
    im.putpalette([0, 0, 0, *colour] + [0, 0, 0] * 254)
    im.paste(1, (10, 0, 20, 10))
    return im


def test_palette_with_transparency_is_white(tmp_path: Path):
    im = half_transparent((255, 0, 0))
    path = tmp_path / "t.png"
    im.save(path, transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    d = open_image(path, 20)
    assert (d.pixels[:, :10] == 255).all()  # transparent black -> white background
    assert (d.pixels[:, 10:] == [255, 0, 0]).all()


def test_rgba_composited_on_white(tmp_path: Path):
    a = np.zeros((10, 30, 4), np.uint8)
    a[:, :10] = (255, 0, 0, 0)  # fully transparent red
    a[:, 10:20] = (255, 0, 0, 255)  # opaque red
    a[:, 20:] = (0, 0, 255, 128)  # half-transparent blue
    path = tmp_path / "a.png"
    Image.fromarray(a, "RGBA").save(path)
    d = open_image(path, 30)
    assert (d.pixels[:, :10] == 255).all()
    assert (d.pixels[:, 10:20] == [255, 0, 0]).all()
    half = d.pixels[:, 20:].astype(int)
    assert (np.abs(half - [127, 127, 255]) <= 2).all()


def test_la_composited_on_white(tmp_path: Path):
    a = np.zeros((10, 30, 2), np.uint8)
    a[:, :10] = (0, 0)  # transparent black
    a[:, 10:20] = (0, 255)  # opaque black
    a[:, 20:] = (100, 255)
    path = tmp_path / "la.png"
    Image.fromarray(a, "LA").save(path)
    d = open_image(path, 30)
    assert (d.pixels[:, :10] == 255).all()
    assert (d.pixels[:, 10:20] == 0).all()
    assert (d.pixels[:, 20:] == 100).all()


def test_greyscale_l(tmp_path: Path):
    a = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (8, 1))
    path = tmp_path / "l.png"
    Image.fromarray(a, "L").save(path)
    d = open_image(path, 25)
    assert np.array_equal(d.pixels, np.repeat(a[..., None], 3, axis=2))


def test_one_bit(tmp_path: Path):
    a = (np.indices((8, 16)).sum(axis=0) % 2).astype(bool)
    path = tmp_path / "bw.png"
    Image.fromarray(a).save(path)
    with Image.open(path) as check:
        assert check.mode == "1"
    d = open_image(path, 16)
    assert np.array_equal(d.pixels, np.repeat(a[..., None], 3, axis=2).astype(np.uint8) * 255)


@pytest.mark.parametrize(
    "cmyk, rgb_expected",
    [((0, 255, 255, 0), (255, 0, 0)), ((255, 0, 255, 0), (0, 255, 0)), ((0, 0, 0, 0), (255, 255, 255))],
)
def test_cmyk_jpeg_colours(tmp_path: Path, cmyk, rgb_expected):
    path = tmp_path / "c.jpg"
    Image.new("CMYK", (32, 16), cmyk).save(path, quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    d = open_image(path, 32)
    assert (np.abs(d.pixels.astype(int) - rgb_expected) <= 8).all(), d.pixels[0, 0]


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path: Path, ext: str):
    values = np.array([0, 1000, 16384, 32768, 49152, 65535], np.uint16)
    a = np.repeat(values, 4)[None, :].repeat(3, axis=0)  # 3 x 24
    path = tmp_path / f"g16.{ext}"
    Image.fromarray(a).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    d = open_image(path, 24)
    got = d.pixels[1, ::4, 0].astype(int)
    assert (d.pixels[..., 0] == d.pixels[..., 1]).all() and (d.pixels[..., 1] == d.pixels[..., 2]).all()
    assert np.allclose(got, values / 65535 * 255, atol=1), got  # 32768 -> 128, not 255


def test_16_bit_greyscale_resized(tmp_path: Path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.full((20, 40), 32768, np.uint16)).save(path)
    d = open_image(path, 20)
    check_decoded(d, 40, 20, 20)
    assert (np.abs(d.pixels.astype(int) - 128) <= 1).all()


# --- formats ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ext, kw, tol",
    [
        ("tif", {}, 0),
        ("tif", {"compression": "tiff_lzw"}, 0),
        ("bmp", {}, 0),
        ("webp", {"lossless": True}, 0),
        ("webp", {"quality": 90}, 15),
        ("jpg", {"quality": 95}, 15),
        ("png", {}, 0),
    ],
)
def test_formats(tmp_path: Path, ext: str, kw: dict, tol: float):
    src = make_photo(30, (48, 32))
    path = tmp_path / f"f.{ext}"
    src.save(path, **kw)
    d = open_image(path, 48)
    check_decoded(d, 48, 32, 48)
    assert mad(d.pixels, rgb(src)) <= tol  # lossy formats: close to the source
    with Image.open(path) as plain:
        assert np.array_equal(d.pixels, rgb(plain))  # and exactly what Pillow decodes


def test_gif_first_frame(tmp_path: Path):
    frames = [Image.new("RGB", (30, 20), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    with no_unclosed_files():  # Pillow keeps multi-frame files open unless closed
        d = open_image(path, 30)
    check_decoded(d, 30, 20, 30)
    assert (d.pixels == [255, 0, 0]).all()


def test_gif_with_transparency(tmp_path: Path):
    im = half_transparent((0, 0, 255))
    path = tmp_path / "t.gif"
    im.save(path, transparency=0)
    d = open_image(path, 20)
    assert (d.pixels[:, :10] == 255).all()
    assert (d.pixels[:, 10:] == [0, 0, 255]).all()


@pytest.mark.skipif(importlib.util.find_spec("pillow_heif") is None, reason="pillow_heif not installed")
def test_heic(tmp_path: Path):
    src = make_photo(31, (64, 48))
    path = tmp_path / "p.heic"
    open_image(src, 8)  # registers the plugin, so Pillow can also save HEIF
    src.save(path, quality=95)
    d = open_image(path, 64)
    check_decoded(d, 64, 48, 64)
    assert mad(d.pixels, rgb(src)) < 8


@pytest.mark.skipif(not features.check("avif") and importlib.util.find_spec("pillow_avif") is None,
                    reason="no AVIF support in Pillow")
def test_avif(tmp_path: Path):
    src = make_photo(32, (64, 48))
    path = tmp_path / "p.avif"
    open_image(src, 8)  # registers pillow_avif if that is where AVIF comes from
    src.save(path, quality=95)
    d = open_image(path, 64)
    check_decoded(d, 64, 48, 64)
    assert mad(d.pixels, rgb(src)) < 8


# --- bad files ----------------------------------------------------------------------------


def test_empty_file(tmp_path: Path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(DecodeError) as exc:
        open_image(path, 32)
    assert "empty" in one_line(exc)


def test_missing_file(tmp_path: Path):
    with pytest.raises(DecodeError) as exc:
        open_image(tmp_path / "nope.jpg", 32)
    assert "not found" in one_line(exc)


def test_truncated_jpeg(tmp_path: Path):
    data = (save_photo(tmp_path / "whole.jpg", seed=40, size=(200, 150), quality=90)).read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    with no_unclosed_files():
        with pytest.raises(DecodeError) as exc:
            open_image(path, 32)
    assert "truncated" in one_line(exc)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75, 0.9, 0.99])
def test_truncated_jpeg_anywhere_says_truncated(tmp_path: Path, fraction: float):
    """Pillow words this "image file is truncated" or "Truncated File Read": both are named."""
    data = make_jpeg_bytes(tmp_path)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(DecodeError) as exc:
        open_image(path, 32)
    assert "truncated" in one_line(exc)


def test_jpeg_cut_inside_headers_says_truncated(tmp_path: Path):
    data = make_jpeg_bytes(tmp_path)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: data.index(b"\xff\xda") - 5])  # stop before the scan starts
    with pytest.raises(DecodeError) as exc:
        open_image(path, 32)
    assert "truncated" in one_line(exc)


def make_jpeg_bytes(tmp_path: Path) -> bytes:
    return save_photo(tmp_path / "whole.jpg", seed=42, size=(200, 150), quality=90).read_bytes()


def test_truncated_png(tmp_path: Path):
    data = save_photo(tmp_path / "whole.png", seed=41, size=(200, 150)).read_bytes()
    path = tmp_path / "half.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError) as exc:
        open_image(path, 32)
    text = one_line(exc)
    assert "truncated" in text or "damaged" in text


def test_random_bytes_named_jpg(tmp_path: Path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DecodeError) as exc:
        open_image(path, 32)
    assert "not an image" in one_line(exc)


def test_text_named_png(tmp_path: Path):
    path = tmp_path / "readme.png"
    path.write_text("this is not a picture\nreally not\n")
    with pytest.raises(DecodeError) as exc:
        open_image(path, 32)
    assert "not an image" in one_line(exc)


def test_decompression_bomb_default_limit(tmp_path: Path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(30000, 30000))
    assert path.stat().st_size < 200
    assert 30000 * 30000 > DEFAULT_MAX_PIXELS
    with pytest.raises(DecodeError) as exc:
        open_image(path, 32)
    assert "decompression bomb" in one_line(exc)


def test_decompression_bomb_real_image_under_low_limit(tmp_path: Path):
    """A real, small-on-disk image of 4000x4000 pixels: refused under a low limit, fine above."""
    path = tmp_path / "big.png"
    Image.new("1", (4000, 4000)).save(path)
    assert path.stat().st_size < 100_000
    with pytest.raises(DecodeError) as exc:
        open_image(path, 32, max_pixels=1_000_000)
    text = one_line(exc)
    assert "decompression bomb" in text and "4000x4000" in text
    d = open_image(path, 32, max_pixels=16_000_000)
    check_decoded(d, 4000, 4000, 32)


def test_decompression_bomb_declared_size_under_low_limit(tmp_path: Path):
    path = tmp_path / "declared.png"
    path.write_bytes(png_header(12000, 10000))
    with pytest.raises(DecodeError) as exc:
        open_image(path, 32, max_pixels=50_000_000)
    assert "decompression bomb" in one_line(exc)


def test_decompression_bomb_pil_source():
    with pytest.raises(DecodeError) as exc:
        open_image(Image.new("L", (300, 300)), 32, max_pixels=300 * 300 - 1)
    assert "decompression bomb" in one_line(exc)
    d = open_image(Image.new("L", (300, 300)), 32, max_pixels=300 * 300)
    check_decoded(d, 300, 300, 32)


def test_folder_is_not_an_image(tmp_path: Path):
    with pytest.raises(DecodeError) as exc:
        open_image(tmp_path, 32)
    one_line(exc)
