"""Open an image file as an RGB picture of the size the model needs."""
from __future__ import annotations

import contextlib
import errno
import functools
import io
import logging
import math
import numbers
import os
import signal
import struct
import threading
import time
import unicodedata
import warnings
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

# Pillow refuses images above twice its MAX_IMAGE_PIXELS (89,478,485); we apply the
# same limit ourselves so the reason is ours. A caller may lower it per call; raising
# it would also need Pillow's process-wide setting raised. It is what bounds memory:
# decoding takes up to about 16 bytes per pixel (a WebP animation: libwebp's two
# canvases and Pillow's copy), some 2.2 GB per process for a 1.9 KB WebP that
# declares 139 megapixels, so a caller short of memory lowers it.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
# Per-file limit on decoding, in seconds, for the index pipeline. The largest
# images let through (about 170 megapixels) decode in 1 to 6 s on a 2-core
# VM (WebP slowest); 60 s leaves room for a slower machine and for the model
# competing for the CPU. A false limit hit costs more than a slow file: a
# failed file is not retried until it changes.
DEFAULT_DECODE_TIMEOUT = 60.0
# Errors of the process, not of a file (too many open files, out of memory in the
# kernel): raised as OSError, never as a DecodeError, since a file recorded as
# failed is not tried again until it changes.
PROCESS_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})
# Canvas for transparent pixels: most transparent images (logos, products,
# cut-outs) are designed to be seen on white.
BACKGROUND = (255, 255, 255)
ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the picture upright (as ImageOps.exif_transpose).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Longest reason kept: it is stored in the database and printed on one line.
MAX_REASON = 300


class DecodeError(Exception):
    """An image file could not be turned into pixels; str() is the reason."""


@dataclass(frozen=True)
class Decoded:
    """Pixels resized for the model, plus the file's upright size (and a grey copy for local
    features when asked for)."""

    pixels: np.ndarray  # uint8, H x W x 3
    width: int
    height: int
    gray: np.ndarray | None = None  # uint8, H x W


@functools.cache
def register_plugins() -> frozenset[str]:
    """Register optional Pillow plugins; return the names of those available."""
    found = set()
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        found.add("heif")
    except Exception as exc:  # noqa: BLE001 - plugin absent or broken: format unsupported
        log.debug("no HEIF support: %s", exc)
    from PIL import features

    if features.check("avif"):
        found.add("avif")
    else:
        try:
            import pillow_avif  # noqa: F401

            found.add("avif")
        except Exception as exc:  # noqa: BLE001
            log.debug("no AVIF support: %s", exc)
    return frozenset(found)


def target_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """(w, h) with the longest side set to ``longest``, aspect ratio kept."""
    scale = longest / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


# --- time limit -------------------------------------------------------------------------


class TimeLimitExpired(BaseException):
    """A time_limit ran out; ``args[0]`` is that time_limit. A BaseException, so
    that the ``except Exception`` clauses inside Pillow's plugins cannot swallow it."""


class time_limit:
    """Raise TimeLimitExpired in the block once ``seconds`` of wall-clock time have passed.

    Uses SIGALRM and the process's real-time interval timer, so it works only
    in the main thread on a POSIX system; elsewhere, or with ``seconds`` None
    or 0, the block runs unlimited. The handler fires between Python
    bytecodes: Pillow feeds its decoders in chunks of 64 KB from a Python
    loop, so a slow decode is interrupted at the next chunk, but a single
    call into C that never returns (libwebp, libheif and libtiff decode a
    whole image in one call) is not. The previous handler and any timer set
    before (by an outer scope) are restored on exit.
    """

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.armed = False

    def __enter__(self) -> time_limit:
        if not self.seconds or self.seconds <= 0 or not hasattr(signal, "setitimer"):
            return self
        if threading.current_thread() is not threading.main_thread():
            return self
        previous = signal.getsignal(signal.SIGALRM)
        if previous is None:
            # A handler installed outside Python: we could not put it back.
            log.debug("SIGALRM is handled outside Python; decoding runs without a time limit")
            return self
        outer_delay, outer_interval = signal.getitimer(signal.ITIMER_REAL)
        if outer_delay and outer_delay <= self.seconds:
            return self  # an outer timer fires first anyway; leave it alone
        self.previous, self.outer = previous, (outer_delay, outer_interval)
        self.started = time.monotonic()
        self.armed = True
        signal.signal(signal.SIGALRM, self._expire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def _expire(self, signum, frame) -> None:
        # A signal already on its way when the block ends must not raise outside it.
        if self.armed:
            raise TimeLimitExpired(self)

    def __exit__(self, *exc) -> bool:
        if not self.armed:
            return False
        try:
            self.armed = False
        finally:
            # Disarm before putting the old handler back: a SIGALRM under the
            # default disposition would kill the process.
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
            delay, interval = self.outer
            if delay:
                left = delay - (time.monotonic() - self.started)
                signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6), interval)
        return False


# --- decoding ---------------------------------------------------------------------------


def _one_line(text: str) -> str:
    """``text`` as a single printable line of bounded length."""
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in text)
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def _reason(exc: BaseException) -> str:
    """A one-line reason for an exception raised while decoding."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        return _one_line(exc.strerror)  # without the file name: callers add the path
    text = _one_line(str(exc))
    # A KeyError's text is a bare key, meaningless without the type.
    return f"{type(exc).__name__}: {text}" if not text or isinstance(exc, KeyError) else text


def open_image(source: str | os.PathLike | Image.Image, longest: int,
               max_pixels: int = DEFAULT_MAX_PIXELS, timeout: float | None = None,
               box: tuple[float, float, float, float] | None = None,
               gray: int | None = None) -> Decoded:
    """Decode ``source`` upright, in RGB, with its longest side set to ``longest``.

    ``box`` (x0, y0, x1, y1, in pixels of the upright image) keeps only that
    region, which then gets the longest side ``longest``. ``gray``: also give
    the picture (or region) in grey with its longest side ``gray``, never
    enlarged, from the same decode.

    Raises DecodeError with a one-line reason for anything that is not a
    readable image within ``max_pixels``, or, with ``timeout`` (seconds), one
    whose decoding takes longer (see ``time_limit`` for where that applies).
    The default is no limit: the index pipeline passes DEFAULT_DECODE_TIMEOUT in
    its own worker processes, while Searcher decodes in its caller's process,
    from any thread, where SIGALRM is not ours to use.
    """
    register_plugins()
    limit = time_limit(timeout)
    try:
        with limit:
            return _open(source, longest, max_pixels, box, gray)
    except TimeLimitExpired as exc:
        if exc.args[0] is not limit:
            raise  # an outer limit, shorter than ours: its owner reports it
        raise DecodeError(f"decoding took longer than {timeout:g} s") from None


def _open(source, longest: int, max_pixels: int, box=None, gray: int | None = None) -> Decoded:
    """open_image without the time limit: every failure becomes a DecodeError."""
    with _failures(source):
        with warnings.catch_warnings(record=True) as caught:
            # Recorded, not shown: a worker must not print (or, under -W error, raise)
            # Pillow's warnings about odd files; our own guard replaces the bomb warning.
            warnings.simplefilter("always")
            try:
                if isinstance(source, Image.Image):
                    return _decode(source, longest, max_pixels, own=False, box=box, gray=gray)
                if os.path.getsize(source) == 0:
                    raise DecodeError("empty file")
                # Close the file on every path: Pillow keeps multi-frame files
                # (GIF, TIFF) and files that failed to load open otherwise.
                with Image.open(source) as im:
                    return _decode(im, longest, max_pixels, own=True, box=box, gray=gray)
            finally:
                for w in caught:
                    if not issubclass(w.category, Image.DecompressionBombWarning):
                        log.debug("%s: %s: %s", source if not isinstance(source, Image.Image)
                                  else "image", w.category.__name__, w.message)


@contextlib.contextmanager
def _failures(source) -> Iterator[None]:
    """Every failure of reading ``source`` inside as a DecodeError with its reason in words
    (errors of the process, not of the file, pass through)."""
    try:
        yield
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"decompression bomb: {_one_line(str(exc))}") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image Pillow can read") from None
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except IsADirectoryError:
        raise DecodeError("is a folder, not a file") from None
    except MemoryError:
        raise DecodeError("out of memory while decoding") from None
    except ValueError as exc:
        text = str(exc)
        if "Decompressed data too large" in text or "Too much memory used in text chunks" in text:
            # PngImagePlugin's guard against zTXt, iTXt and iCCP chunks that inflate hugely.
            raise DecodeError("decompression bomb: a compressed PNG text or ICC profile chunk "
                              "inflates beyond Pillow's limit") from None
        raise DecodeError(f"damaged: {_reason(exc)}") from None
    except (OSError, SyntaxError, EOFError, TypeError, IndexError, KeyError, ZeroDivisionError,
            OverflowError, RuntimeError, struct.error, zlib.error) as exc:
        if isinstance(exc, OSError) and exc.errno in PROCESS_ERRNOS:
            raise  # the process is short of something, the file may be fine: not its failure
        # What Pillow's plugins raise on damaged data: SyntaxError for a bad header,
        # RuntimeError from the AVIF decoder.
        text = _reason(exc)
        if "truncated" in text.lower() or isinstance(exc, EOFError):
            raise DecodeError(f"truncated or damaged: {text}") from None
        raise DecodeError(f"damaged: {text}") from None
    except Exception as exc:
        # A bad file must never stop the caller. Not a failure we know how to word:
        # kept distinct, so that tests and bench/fuzz.py find it.
        log.debug("unexpected error decoding %s", source, exc_info=True)
        raise DecodeError(f"unexpected error in the decoder: {_reason(exc)}") from None


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation, 1 to 8; 1 when the tag is absent, out of range, of the
    wrong type or the EXIF is damaged: bad metadata must not lose the picture."""
    try:
        value = im.getexif().get(ORIENTATION, 1)
    except Exception as exc:  # noqa: BLE001 - any parse failure: metadata ignored
        log.debug("ignoring damaged EXIF: %s", _reason(exc))
        return 1
    # A whole number of any numeric type counts (as in ImageOps.exif_transpose): a
    # FLOAT or RATIONAL 6 still means 6. Strings, tuples and NaN do not.
    try:
        if (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and float(value).is_integer() and 1 <= value <= 8):
            return int(value)
    except (ValueError, ZeroDivisionError, OverflowError):
        pass
    log.debug("ignoring EXIF orientation %r", value)
    return 1


def _check_size(w: int, h: int, max_pixels: int) -> None:
    if w < 1 or h < 1:
        raise DecodeError(f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise DecodeError(
            f"decompression bomb guard: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}"
        )


def _decode(im: Image.Image, longest: int, max_pixels: int, own: bool, box=None,
            gray: int | None = None) -> Decoded:
    """``own``: the image was opened here, so draft mode may shrink it in place."""
    w, h = im.size
    # Before load(): Image.open has read the header only, no pixel is decoded yet (libwebp
    # reserves its canvas at open, but the memory is not touched until decoding).
    _check_size(w, h, max_pixels)
    if own and box is None and getattr(im, "format", None) == "JPEG":
        scale = max(longest, gray or 0) / max(w, h)
        if scale < 1:
            im.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
    # A TIFF reads its EXIF from the file, which load() closes; the others read it
    # from metadata, and a PNG only after its pixels (EXIF may follow them).
    exif_first = hasattr(im, "tag_v2")
    if exif_first:
        orientation = _orientation(im)
    im.load()
    if not exif_first:
        orientation = _orientation(im)
    # Some formats (ICO, ICNS) learn their true size only from the loaded frame.
    _check_size(im.width, im.height, max_pixels)
    if orientation in UPRIGHT:
        im = im.transpose(UPRIGHT[orientation])
    # EXIF orientation 5-8 swaps width and height.
    upright = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    im = _to_rgb(im)
    if box is not None:
        im = im.crop(_crop_box(box, upright))
    size = target_size(im.width, im.height, longest)
    gray_px = None
    if gray:
        # From the decoded picture, before it is resized for the model: the draft
        # decode covers both sizes.
        small = im.resize(_never_larger(im.size, gray), Image.Resampling.BICUBIC, reducing_gap=3.0)
        gray_px = np.asarray(small.convert("L"), dtype=np.uint8).copy()
    if im.size != size:
        im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    pixels = np.asarray(im, dtype=np.uint8)
    if pixels.shape != (size[1], size[0], 3):
        raise DecodeError(f"the decoder gave pixels of shape {pixels.shape}, not {size[1]}x{size[0]}x3")
    return Decoded(pixels.copy(), upright[0], upright[1], gray_px)


def _never_larger(size: tuple[int, int], longest: int) -> tuple[int, int]:
    w, h = size
    return size if max(w, h) <= longest else target_size(w, h, longest)


def _crop_box(box, upright: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box`` in pixels of the upright file, checked, as a crop (no draft decoding with a box)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = upright
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise DecodeError(f"box {x0:g},{y0:g},{x1:g},{y1:g} is not inside the {w}x{h} image "
                          "(x0 < x1, y0 < y1, in pixels)")
    return int(x0), int(y0), max(int(x0) + 1, round(x1)), max(int(y0) + 1, round(y1))


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own conversion clips wide values to 255; scale instead. float32
        # and in place: a 170-megapixel scan would take 1.4 GB per float64 copy.
        a = np.array(im, dtype=np.float32)
        if mode == "F":
            a[~np.isfinite(a)] = 0
        peak = float(a.max())
        top = 65535.0 if mode.startswith("I;16") or peak > 255 else 255.0
        if mode == "F" and peak <= 1.0:
            top = 1.0
        a *= 255.0 / top
        a += 0.5
        np.clip(a, 0, 255, out=a)
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info or mode in ("PA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        canvas = Image.new("RGB", im.size, BACKGROUND)
        canvas.paste(im, mask=im.getchannel("A"))
        return canvas
    if mode == "CMYK" and im.info.get("icc_profile"):
        try:
            import io

            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception as exc:  # noqa: BLE001 - a broken profile: fall back to the plain formula
            log.debug("ignoring a broken ICC profile: %s", _reason(exc))
    return im.convert("RGB")


THUMBNAIL_SIZES = (64, 128, 256, 512)
DEFAULT_THUMBNAIL = 256


def thumbnail(source: str | os.PathLike | Image.Image, longest: int = DEFAULT_THUMBNAIL,
              max_pixels: int = DEFAULT_MAX_PIXELS, quality: int = 82) -> bytes:
    """A JPEG of ``source``, upright (EXIF orientation applied), longest side at most ``longest``.

    Never enlarged. Raises DecodeError as open_image does.
    """
    if longest < 1:
        raise ValueError("a thumbnail's longest side must be at least 1")
    decoded = open_image(source, longest, max_pixels)
    im = Image.fromarray(decoded.pixels, "RGB")
    # open_image sets the longest side; a picture smaller than that is not enlarged.
    small = _never_larger((decoded.width, decoded.height), longest)
    if max(small) < max(im.size):
        im = im.resize(small, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue()


# --- uploads ----------------------------------------------------------------------------


class _DeadlineFile(io.BytesIO):
    """Bytes in memory whose reads raise DecodeError once ``deadline`` (time.monotonic) has
    passed: a decode time limit that works in any thread, unlike ``time_limit``."""

    deadline: float | None = None
    timeout: float = 0.0

    def read(self, size: int | None = -1) -> bytes:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DecodeError(f"decoding took longer than {self.timeout:g} s")
        return super().read(size)


def open_upload(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                timeout: float | None = None) -> Image.Image:
    """Open image bytes received over the network, lazily: only the header is read, and
    the declared size is checked against ``max_pixels`` before any pixel is decoded.

    Pass the result to ``open_image`` (or ``Searcher.search``), which decodes it with the
    same guards as a file. Nothing is written to disk. ``timeout`` (seconds, counted from
    this call's return) limits that decoding from any thread: Pillow reads JPEG, PNG, GIF
    and BMP data in chunks of 64 KB as it decodes, and a read after the deadline raises
    DecodeError; formats decoded in one call into C (WebP, AVIF, HEIF, compressed TIFF)
    are bounded by ``max_pixels`` only. Raises DecodeError with a one-line reason.
    """
    register_plugins()
    if not data:
        raise DecodeError("empty file")
    fp = _DeadlineFile(data)
    with _failures("upload"):
        im = Image.open(fp)
        _check_size(im.width, im.height, max_pixels)
    if timeout:
        fp.timeout, fp.deadline = timeout, time.monotonic() + timeout
    return im
