"""The loader on malformed input: property tests (Hypothesis), the time limit, regressions.

The property, for any bytes in a file: open_image returns a Decoded whose pixels
are uint8 H x W x 3 with the longest side as asked, or raises DecodeError with a
non-empty one-line reason; never another exception, never the time limit, and
no file left open. Runs are derandomized (the same examples on every run) and
write no example database. bench/fuzz.py runs the same families at scale.
"""
from __future__ import annotations

import functools
import io
import multiprocessing
import os
import signal
import struct
import tempfile
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from PIL import Image, ImageFile

from conftest import make_photo, png_header, save_photo
from indexer.decode import (DEFAULT_MAX_PIXELS, UPRIGHT, Decoded, DecodeError, TimeLimitExpired,
                            open_image, register_plugins, time_limit)

LONGEST = 40  # below the seeds' 96 px, so JPEG draft mode runs too
LIMIT = 10.0  # the time limit given to every fuzzed decode; none may reach it
# Explicit budgets (about 20 s in all on 2 cores); derandomized: the same examples on
# every run, so CI is reproducible; no example database written into the repository.
FUZZ = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
FUZZ_SLOW = settings(FUZZ, max_examples=300)  # examples that encode a picture first
# Hypothesis also caches constants it finds in the source under ./.hypothesis: keep that
# out of the repository too.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(tempfile.mkdtemp(prefix="lookalike-hypothesis-"))
FDS = Path("/proc/self/fd")


def save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@functools.cache
def seeds() -> dict[str, bytes]:
    """Small valid files in the formats the README names; each name starts with its format."""
    p = make_photo(7, (96, 64))
    rgba = p.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(p.size))
    pal = p.quantize(16)
    frames = [make_photo(i, (48, 32)) for i in range(3)]
    return {
        "jpeg": save(p, "JPEG", quality=90),
        "jpeg-progressive": save(p, "JPEG", quality=80, progressive=True),
        "png": save(p, "PNG"),
        "png-rgba": save(rgba, "PNG"),
        "png-palette": save(pal, "PNG", transparency=0),
        "png-16bit": save(Image.fromarray(np.asarray(p.convert("L"), np.uint16) * 257), "PNG"),
        "webp-lossy": save(p, "WEBP", quality=80),
        "webp-lossless": save(rgba, "WEBP", lossless=True),
        "webp-anim": save(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "gif": save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "tiff": save(p, "TIFF"),
        "tiff-lzw": save(p, "TIFF", compression="tiff_lzw"),
        "bmp": save(p, "BMP"),
    }


SEED_NAMES = sorted(seeds())


def open_fds() -> int | None:
    return len(os.listdir(FDS)) if FDS.is_dir() else None


class _no_warnings_escape:
    """Fail if open_image lets a warning out (a worker would print it; -W error would raise it)."""

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self.caught = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        assert not self.caught, [str(w.message) for w in self.caught]
        return False


def decode(tmp_path: Path, data: bytes, **kw) -> Decoded | str:
    """open_image on ``data`` in a file: the Decoded, or the DecodeError's reason.

    Fails on anything else: another exception, a reason that is empty, not one
    line or from open_image's catch-all for unforeseen exceptions, the time
    limit, a warning let out, or a file descriptor left open.
    """
    path = tmp_path / "input"
    path.write_bytes(data)
    fds = open_fds()
    start = time.monotonic()
    try:
        with _no_warnings_escape():
            result = open_image(path, LONGEST, timeout=LIMIT, **kw)
    except DecodeError as exc:
        result = str(exc)
        assert result and result.splitlines() == [result] and result == result.strip(), repr(result)
        assert not result.startswith("unexpected error"), result  # word it in decode.py
        assert "took longer" not in result, result
    assert time.monotonic() - start < LIMIT
    assert open_fds() == fds, "a file was left open"
    if isinstance(result, Decoded):
        px = result.pixels
        assert px.dtype == np.uint8 and px.ndim == 3 and px.shape[2] == 3, (px.dtype, px.shape)
        assert max(px.shape[:2]) == LONGEST, px.shape
        assert result.width >= 1 and result.height >= 1
    return result


# --- random bytes ------------------------------------------------------------------------

SIGNATURES = [b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"II*\x00",
              b"MM\x00*", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"RIFF\x00\x00\x00\x00WEBPVP8L",
              b"RIFF\x00\x00\x00\x00WEBPVP8X", b"\x00\x00\x01\x00", b"\x00\x00\x00\x1cftypavif",
              b"\x00\x00\x00\x18ftypheic", b"\xff\x4f\xff\x51", b"8BPS", b"P6\n"]


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes(tmp_path, data):
    decode(tmp_path, data)


@FUZZ
@given(signature=st.sampled_from(SIGNATURES), data=st.binary(max_size=2048))
def test_random_bytes_behind_a_signature(tmp_path, signature, data):
    decode(tmp_path, signature + data)


# --- mutated real files ------------------------------------------------------------------


@FUZZ
@given(name=st.sampled_from(SEED_NAMES), fraction=st.floats(0, 1, exclude_max=True))
def test_truncated(tmp_path, name, fraction):
    data = seeds()[name]
    decode(tmp_path, data[: int(len(data) * fraction)])


@FUZZ
@given(name=st.sampled_from(SEED_NAMES), header=st.booleans(),
       flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 7)), min_size=1, max_size=24))
def test_bit_flips(tmp_path, name, header, flips):
    data = bytearray(seeds()[name])
    span = min(len(data), 256) if header else len(data)  # headers are where parsers branch
    for at, bit in flips:
        data[at % span] ^= 1 << bit
    decode(tmp_path, bytes(data))


@FUZZ
@given(name=st.sampled_from(SEED_NAMES), op=st.sampled_from(["insert", "delete", "duplicate"]),
       at=st.floats(0, 1, exclude_max=True), run=st.binary(min_size=1, max_size=300))
def test_byte_runs(tmp_path, name, op, at, run):
    data = bytearray(seeds()[name])
    i = int(len(data) * at)
    if op == "insert":
        data[i:i] = run
    elif op == "delete":
        del data[i:i + len(run)]
    else:
        data[i:i] = data[i:i + len(run)]
    decode(tmp_path, bytes(data))


# --- absurd dimensions --------------------------------------------------------------------


def patch_png(data: bytes, w: int, h: int) -> bytes:
    d = bytearray(data)
    struct.pack_into(">II", d, 16, w, h)
    struct.pack_into(">I", d, 29, zlib.crc32(bytes(d[12:29])))  # the header's checksum, fixed up
    return bytes(d)


def patch_jpeg(data: bytes, w: int, h: int) -> bytes:
    d = bytearray(data)
    for marker in (b"\xff\xc0", b"\xff\xc2"):  # baseline or progressive start of frame
        at = data.find(marker)
        if at > 0:
            struct.pack_into(">HH", d, at + 5, h & 0xFFFF, w & 0xFFFF)
    return bytes(d)


def patch_gif(data: bytes, w: int, h: int) -> bytes:
    """The logical screen and the first frame's size (GIF89a written by Pillow)."""
    d = bytearray(data)
    struct.pack_into("<HH", d, 6, w & 0xFFFF, h & 0xFFFF)
    at = 13 + (3 << ((d[10] & 7) + 1) if d[10] & 0x80 else 0)
    while at < len(d) and d[at] == 0x21:  # skip extensions
        at += 2
        while at < len(d) and d[at]:
            at += d[at] + 1
        at += 1
    if at + 9 <= len(d) and d[at] == 0x2C:
        struct.pack_into("<HH", d, at + 5, w & 0xFFFF, h & 0xFFFF)
    return bytes(d)


def patch_tiff(data: bytes, w: int, h: int) -> bytes:
    d = bytearray(data)
    order = "<" if d[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", d, 4)
    (n,) = struct.unpack_from(order + "H", d, ifd)
    for k in range(n):
        at = ifd + 2 + 12 * k
        (tag,) = struct.unpack_from(order + "H", d, at)
        if tag in (256, 257):  # ImageWidth, ImageLength, rewritten as LONG
            struct.pack_into(order + "HII", d, at + 2, 4, 1, w if tag == 256 else h)
    return bytes(d)


def patch_bmp(data: bytes, w: int, h: int) -> bytes:
    d = bytearray(data)
    struct.pack_into("<II", d, 18, w, h)  # signed on reading: a negative height is top-down
    return bytes(d)


def patch_webp(data: bytes, w: int, h: int) -> bytes:
    d = bytearray(data)
    if d[12:16] == b"VP8X":  # the canvas of an animation, 24 bits each
        d[24:27] = ((w - 1) & 0xFFFFFF).to_bytes(3, "little")
        d[27:30] = ((h - 1) & 0xFFFFFF).to_bytes(3, "little")
    elif d[12:16] == b"VP8 ":  # 14 bits each, plus 2 bits of scale
        struct.pack_into("<HH", d, 26, w & 0xFFFF, h & 0xFFFF)
    elif d[12:16] == b"VP8L":
        bits = int.from_bytes(d[21:25], "little") & ~0x0FFFFFFF
        bits |= ((w - 1) & 0x3FFF) | (((h - 1) & 0x3FFF) << 14)
        d[21:25] = bits.to_bytes(4, "little")
    return bytes(d)


PATCHERS = {"png": patch_png, "jpeg": patch_jpeg, "gif": patch_gif, "tiff": patch_tiff, "bmp": patch_bmp,
            "webp": patch_webp}
EDGES = [0, 1, 2, 255, 256, 4097, 13000, 16383, 16384, 30000, 65535, 65536, 1 << 20, (1 << 31) - 1,
         1 << 31, (1 << 32) - 1]
dims = st.one_of(st.sampled_from(EDGES), st.integers(0, (1 << 32) - 1))
GUARD = 4_000_000  # a low limit, so that declared sizes between it and Pillow's own meet our guard


def declared_size(data: bytes) -> tuple[int, int] | None:
    """The size Pillow reads from the header, or None when it cannot open the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Image.DecompressionBombError:
        return (DEFAULT_MAX_PIXELS, 2)
    except Exception:  # noqa: BLE001 - not even a header: nothing to compare
        return None


@FUZZ
@given(name=st.sampled_from([n for n in SEED_NAMES if n.split("-")[0] in PATCHERS]), w=dims, h=dims)
def test_absurd_dimensions_are_refused_before_decoding(tmp_path, name, w, h):
    """A header declaring more pixels than allowed is refused by the size alone.

    The file's data is for 96 x 64 pixels: if the guard ran after decoding started,
    the reason would be a truncated or damaged file instead (and memory for the
    declared size would have been allocated first).
    """
    data = PATCHERS[name.split("-")[0]](seeds()[name], w, h)
    size = declared_size(data)
    result = decode(tmp_path, data, max_pixels=GUARD)
    if size is not None and size[0] * size[1] > GUARD:
        assert isinstance(result, str) and result.startswith("decompression bomb"), (size, result)
    if isinstance(result, Decoded):
        assert size is not None and size[0] * size[1] <= GUARD


def test_absurd_dimensions_in_every_patched_format(tmp_path):
    """The patchers above really change the size Pillow reads (else the property is void)."""
    for name in SEED_NAMES:
        fmt = name.split("-")[0]
        if fmt in PATCHERS:
            assert declared_size(PATCHERS[fmt](seeds()[name], 5000, 3000)) == (5000, 3000), name


@pytest.mark.parametrize("w, h", [(30000, 30000), (65535, 65535), (1 << 31, 2), (3000, 2000)])
def test_bomb_headers_refused_without_allocating(tmp_path, w, h):
    """Header-only PNGs: refused quickly, whatever the size, with the limit named."""
    start = time.monotonic()
    result = decode(tmp_path, png_header(w, h), max_pixels=1_000_000)
    assert isinstance(result, str) and result.startswith("decompression bomb"), result
    assert time.monotonic() - start < 1.0


# --- EXIF ---------------------------------------------------------------------------------

# TIFF type -> struct code of one value (a rational's numerator for 5 and 10)
INT_TYPES = {1: "B", 3: "H", 4: "I", 5: "I", 6: "b", 8: "h", 9: "i", 10: "i"}


def exif_blob(value: int, kind: int = 3, count: int = 1, order: str = "<", extra: bytes = b"",
              n_extra: int = 0) -> bytes:
    """``Exif\\0\\0`` + a little TIFF holding one Orientation entry of TIFF type ``kind`` with
    ``count`` copies of ``value`` (at most 8 written: a larger count points past the end)."""
    code = {**INT_TYPES, 2: "s", 5: "II", 7: "s", 10: "II", 11: "f", 12: "d"}[kind]
    if kind in (5, 10):  # value / 1, the numerator read as signed for SRATIONAL
        one = struct.pack(order + code, value & 0xFFFFFFFF, 1)
    elif kind in (2, 7):
        one = str(value).encode()[:1]
    elif kind in (11, 12):
        one = struct.pack(order + code, float(value))
    else:
        bits = 8 * struct.calcsize(code)
        one = struct.pack(order + code.upper(), value & ((1 << bits) - 1))
    packed = one * min(count, 8)
    n = 1 + n_extra
    data_at = 8 + 2 + 12 * n + 4
    entry = struct.pack(order + "HHI", 0x0112, kind, count)
    fits = len(one) * count <= 4
    entry += packed.ljust(4, b"\0") if fits else struct.pack(order + "I", data_at)
    tail = b"" if fits else packed
    head = (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(order + "I", 8)
    return b"Exif\x00\x00" + head + struct.pack(order + "H", n) + entry + extra + b"\0\0\0\0" + tail


def expected_orientation(value: int, kind: int, count: int) -> int:
    """What the EXIF above means: a whole number 1-8 of a numeric type. As Pillow reads
    it: BYTE and UNDEFINED are bytes and ASCII is text, not numbers; of several values
    the first counts; no value, or values past the end, mean no tag."""
    if count == 0 or count > 8 or kind in (1, 2, 7):
        return 1
    if kind in INT_TYPES:
        code = INT_TYPES[kind]
        value = struct.unpack(code, struct.pack(code.upper(), value & ((1 << 8 * struct.calcsize(code)) - 1)))[0]
    return value if 1 <= value <= 8 else 1


def carry_exif(fmt: str, stored: Image.Image, blob: bytes) -> bytes:
    if fmt == "JPEG":
        return save(stored, "JPEG", quality=95, exif=blob)
    return save(stored, fmt, exif=blob.removeprefix(b"Exif\x00\x00"), **({"lossless": True} if fmt == "WEBP" else {}))


def check_upright(d: Decoded, stored: Image.Image, orientation: int, fmt: str) -> None:
    """``d`` is ``stored`` turned by ``orientation``, and reports the upright size."""
    upright = stored.transpose(UPRIGHT[orientation]) if orientation in UPRIGHT else stored
    assert (d.width, d.height) == upright.size
    ref = np.asarray(upright.resize(d.pixels.shape[1::-1], Image.Resampling.BICUBIC, reducing_gap=3.0))
    diff = np.abs(d.pixels.astype(int) - ref).mean()
    assert diff < (6 if fmt == "JPEG" else 1), diff  # JPEG: lossy, and decoded in draft mode


@FUZZ_SLOW
@given(fmt=st.sampled_from(["JPEG", "PNG", "WEBP"]),
       value=st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 255, 256, 262, 65535, (1 << 32) - 1]),
       kind=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
       count=st.sampled_from([1, 1, 1, 0, 2, 3, 1000, (1 << 32) - 1]),
       order=st.sampled_from("<>"))
def test_exif_orientation_any_value_or_type(tmp_path, fmt, value, kind, count, order):
    """A bad orientation (0, 9, 65535, a string, bytes, no value...) is ignored; a good one applied."""
    stored = make_photo(8, (96, 64))
    d = decode(tmp_path, carry_exif(fmt, stored, exif_blob(value, kind, count, order)))
    assert isinstance(d, Decoded), d  # the picture is fine: bad metadata must not lose it
    check_upright(d, stored, expected_orientation(value, kind, count), fmt)


@FUZZ_SLOW
@given(fmt=st.sampled_from(["JPEG", "PNG", "WEBP"]), tiff_header=st.booleans(), junk=st.binary(max_size=200))
def test_exif_garbage_never_loses_the_picture(tmp_path, fmt, tiff_header, junk):
    stored = make_photo(9, (96, 64))
    blob = b"Exif\x00\x00" + (b"MM\x00*" if tiff_header else b"") + junk
    d = decode(tmp_path, carry_exif(fmt, stored, blob))
    assert isinstance(d, Decoded), d
    assert (d.width, d.height) in ((96, 64), (64, 96))


# --- regressions found by fuzzing -----------------------------------------------------------


def test_regression_exif_not_a_tiff_header(tmp_path):
    """Was: "not a TIFF file (header ...)" and the whole picture refused (WebP and PNG)."""
    for fmt in ("WEBP", "PNG"):
        d = decode(tmp_path, carry_exif(fmt, make_photo(10, (96, 64)), b"Exif\x00\x00<j\x06aD\xa8\xfdo"))
        assert isinstance(d, Decoded) and (d.width, d.height) == (96, 64), d


def test_regression_exif_header_cut_short(tmp_path):
    """Was: struct.error "unpack requires a buffer of 4 bytes" from a 5-byte EXIF."""
    d = decode(tmp_path, carry_exif("WEBP", make_photo(10, (96, 64)), b"Exif\x00\x00II*\x00\x87"))
    assert isinstance(d, Decoded), d


def test_regression_exif_odd_entry_next_to_a_good_orientation(tmp_path):
    """Was: "required argument is not an integer" (ImageOps.exif_transpose writing the EXIF
    back) for an Interop pointer of type UNDEFINED; now the orientation alone is used."""
    interop = struct.pack(">HHI", 0xA005, 7, 1) + b"\xff\xff\xff\xf0"
    stored = make_photo(11, (96, 64))
    d = decode(tmp_path, carry_exif("JPEG", stored, exif_blob(6, 3, 1, ">", interop, 1)))
    assert isinstance(d, Decoded), d
    check_upright(d, stored, 6, "JPEG")


def test_regression_exif_float_orientation_still_turns(tmp_path):
    """A DOUBLE 6.0 means 6, as ImageOps.exif_transpose reads it; 6.5 means nothing."""
    stored = make_photo(12, (96, 64))
    d = decode(tmp_path, carry_exif("PNG", stored, exif_blob(6, 12)))
    check_upright(d, stored, 6, "PNG")


@pytest.mark.skipif("avif" not in register_plugins(), reason="no AVIF support")
def test_regression_avif_runtime_error(tmp_path):
    """Was: RuntimeError "Failed to decode frame 0: Decoding of color planes failed" out of
    open_image (Pillow's AVIF plugin), a traceback for `lookalike query`."""
    data = save(make_photo(3, (96, 64)), "AVIF", quality=60)
    payload = data.find(b"mdat") + 4
    broken = data[:payload] + bytes(len(data) - payload)  # the coded picture zeroed
    result = decode(tmp_path, broken)
    assert isinstance(result, str) and result.startswith("damaged: Failed to decode"), result


def test_regression_worker_catch_all_gives_one_line(tmp_path, monkeypatch):
    """The pipeline's last-resort message is one line even for a multi-line exception."""
    from indexer import pipeline

    def boom(*a, **kw):
        raise RuntimeError("first\nsecond\r\nthird")

    monkeypatch.setattr(pipeline, "open_image", boom)
    _, px, _, _, err, _ = pipeline._Files([str(tmp_path / "x.png")], 32, DEFAULT_MAX_PIXELS)[0]
    assert px is None and err == "RuntimeError: first second third"


# --- PNG text bombs and Pillow's warnings ----------------------------------------------------


def png_with_chunks(*chunks: tuple[bytes, bytes]) -> bytes:
    """A real 8 x 8 PNG with extra chunks inserted after IHDR."""
    data = save(make_photo(13, (8, 8)), "PNG")
    extra = b"".join(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
                     for kind, body in chunks)
    return data[:33] + extra + data[33:]


@pytest.mark.parametrize("chunks", [
    [(b"zTXt", b"Comment\0\0" + zlib.compress(b"a" * 8_000_000, 9))],
    [(b"iTXt", b"XML:com.adobe.xmp\0\1\0\0\0" + zlib.compress(b"<x>" * 3_000_000, 9))],
    [(b"iCCP", b"icc\0\0" + zlib.compress(bytes(5_000_000), 9))],
    [(b"zTXt", b"k%d\0\0" % i + zlib.compress(b"b" * 1_000_000, 9)) for i in range(70)],
], ids=["zTXt", "iTXt", "iCCP", "many-zTXt"])
def test_png_text_chunk_bombs(tmp_path, chunks):
    """Metadata that inflates past Pillow's 1 MB per chunk (64 MB in all) is named as a bomb."""
    data = png_with_chunks(*chunks)
    assert len(data) < 200_000
    result = decode(tmp_path, data)
    assert isinstance(result, str) and result.startswith("decompression bomb: a compressed PNG"), result


def test_pillow_warnings_do_not_escape(tmp_path):
    """Pillow warns about odd EXIF and large images; open_image logs those, never lets a
    warning out (a DataLoader worker would print it; under -W error it would raise)."""
    bad_exif = tmp_path / "bad-exif.jpg"
    bad_exif.write_bytes(carry_exif("JPEG", make_photo(14, (96, 64)), exif_blob(6, 3, 2)))
    big = tmp_path / "big.png"
    Image.new("1", (10000, 9000)).save(big)  # 90 MP: above Pillow's warning threshold
    for path in (bad_exif, big):
        with warnings.catch_warnings(record=True) as raw:
            warnings.simplefilter("always")
            with Image.open(path) as im:
                im.getexif().get(0x0112)  # tags are parsed on first access
        assert raw, path  # Pillow does warn about this file
        with _no_warnings_escape():
            d = open_image(path, 16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert np.array_equal(open_image(path, 16).pixels, d.pixels)
    assert (d.width, d.height) == (10000, 9000)


# --- time limit ---------------------------------------------------------------------------


class SlowImageFile(ImageFile.ImageFile):
    """A test-only format whose decoder never finishes: a stand-in for a decoder that hangs."""

    format = "SLOWTEST"

    def _open(self):
        if self.fp.read(8) != b"SLOWIMG\n":
            raise SyntaxError("not a slow test image")
        self._mode, self._size = "RGB", (24, 16)
        self.tile = [ImageFile._Tile("slowtest", (0, 0, 24, 16), 8, None)]


class SlowDecoder(ImageFile.PyDecoder):
    _pulls_fd = True

    def decode(self, buffer):
        # Sleeps in a loop, as a stuck decoder would spin; gives up after 20 s only so
        # that a broken time limit fails the test instead of hanging it.
        give_up = time.monotonic() + 20
        while time.monotonic() < give_up:
            time.sleep(0.01)
        raise OSError("the slow test decoder gave up: no time limit stopped it")


@pytest.fixture
def slow_format(monkeypatch):
    """Register SLOWTEST with Pillow for one test (DataLoader workers forked from here inherit it)."""
    Image.init()
    monkeypatch.setitem(Image.OPEN, "SLOWTEST", (SlowImageFile, lambda prefix: prefix[:8] == b"SLOWIMG\n"))
    monkeypatch.setattr(Image, "ID", ["SLOWTEST", *Image.ID])
    monkeypatch.setitem(Image.DECODERS, "slowtest", SlowDecoder)
    return b"SLOWIMG\n" + bytes(64)


def test_hanging_decoder_is_stopped_by_the_limit(tmp_path, slow_format):
    path = tmp_path / "slow.img"
    path.write_bytes(slow_format)
    before = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    with pytest.raises(DecodeError) as exc:
        open_image(path, 16, timeout=0.3)
    assert str(exc.value) == "decoding took longer than 0.3 s"
    assert 0.3 <= time.monotonic() - start < 2.0
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_real_pillow_decode_is_interrupted_midway(tmp_path):
    """A real PNG of 100 megapixels (zeros, 100 KB on disk): the limit stops Pillow's own
    chunked decoding loop well before it ends, not after."""
    row = b"\0" * 10_001
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(10_000)) + z.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path = tmp_path / "zeros.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 10_000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    start = time.monotonic()
    open_image(path, 16)
    full = time.monotonic() - start
    limit = full / 20
    start = time.monotonic()
    with pytest.raises(DecodeError, match="took longer than"):
        open_image(path, 16, timeout=limit)
    assert time.monotonic() - start < full / 2, (full, limit)


def test_limit_leaves_no_alarm_behind(tmp_path):
    """After the scope: the old handler is back, no timer runs, and none fires later."""
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(a))
    try:
        path = save_photo(tmp_path / "p.png", seed=1)
        for _ in range(20):
            open_image(path, 16, timeout=0.05)
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        time.sleep(0.15)
        assert not fired
        assert signal.getsignal(signal.SIGALRM) is not None and signal.getsignal(signal.SIGALRM) != previous
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_limit_keeps_an_outer_timer(tmp_path):
    """A timer the caller had armed keeps running, with its own handler, through a decode."""
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(time.monotonic()))
    try:
        start = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        open_image(save_photo(tmp_path / "p.png", seed=2), 16, timeout=5)
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 29.0 < left <= 30.0 - (time.monotonic() - start) + 0.01
        signal.setitimer(signal.ITIMER_REAL, 0.05)  # and it still reaches the caller's handler
        time.sleep(0.2)
        assert fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_outer_limit_wins_when_shorter(slow_format, tmp_path):
    """Nested limits: the inner one does not extend an outer one that ends sooner, and
    the outer one's expiry reaches its owner, not taken for the inner one's."""
    path = tmp_path / "slow.img"
    path.write_bytes(slow_format)
    start = time.monotonic()
    with pytest.raises(TimeLimitExpired) as exc, time_limit(0.2) as outer:
        open_image(path, 16, timeout=30)
    assert exc.value.args[0] is outer
    assert time.monotonic() - start < 2.0
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_limit_off_the_main_thread_is_skipped(tmp_path):
    """Signals only reach the main thread: elsewhere decoding runs unlimited, without error."""
    path = save_photo(tmp_path / "p.jpg", seed=3)
    out = []
    t = threading.Thread(target=lambda: out.append(open_image(path, 16, timeout=0.5)))
    t.start()
    t.join(10)
    assert out and out[0].pixels.shape[1] == 16
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.fixture(scope="module")
def encoder():
    from indexer.backbone import resolve_weights
    from indexer.encoder import Encoder
    from indexer.recipe import make_recipe

    _, sha = resolve_weights("efficientnet_lite0")
    return Encoder(make_recipe("efficientnet_lite0", weights_sha256=sha, image_size=64))


@pytest.mark.parametrize("workers", [
    0,
    pytest.param(2, marks=pytest.mark.skipif(
        multiprocessing.get_start_method() != "fork",
        reason="the test-only SLOWTEST format reaches DataLoader workers only by fork")),
])
def test_a_hanging_file_fails_and_the_run_goes_on(tmp_path, slow_format, encoder, workers):
    """In a real run (DataLoader workers, or none): the hanging file fails with the
    reason, and the files before and after it still get descriptors."""
    from indexer.pipeline import embed_files

    paths = [save_photo(tmp_path / "a.jpg", seed=1), tmp_path / "hang.img", save_photo(tmp_path / "b.png", seed=2),
             save_photo(tmp_path / "c.webp", seed=3)]
    paths[1].write_bytes(slow_format)
    start = time.monotonic()
    results = {r.index: r for batch in embed_files([str(p) for p in paths], encoder, batch_size=2,
                                                    workers=workers, decode_timeout=1.0) for r in batch}
    assert sorted(results) == [0, 1, 2, 3]
    assert results[1].vector is None and results[1].error == "decoding took longer than 1 s"
    for i in (0, 2, 3):
        assert results[i].error is None and results[i].vector.shape == (encoder.recipe.dim,)
    assert time.monotonic() - start < 30
