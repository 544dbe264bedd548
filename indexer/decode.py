"""Open an image file as an RGB picture of the size the model needs."""
from __future__ import annotations

import functools
import math
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow refuses images above twice its MAX_IMAGE_PIXELS (89,478,485); we apply the
# same limit ourselves so the reason is ours. A caller may lower it per call; raising
# it would also need Pillow's process-wide setting raised.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
# Canvas for transparent pixels: most transparent images (logos, products,
# cut-outs) are designed to be seen on white.
BACKGROUND = (255, 255, 255)


class DecodeError(Exception):
    """An image file could not be turned into pixels; str() is the reason."""


@dataclass(frozen=True)
class Decoded:
    """Pixels resized for the model, plus the file's upright size."""

    pixels: np.ndarray  # uint8, H x W x 3
    width: int
    height: int


@functools.cache
def register_plugins() -> frozenset[str]:
    """Register optional Pillow plugins; return the names of those available."""
    found = set()
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        found.add("heif")
    except Exception:  # noqa: BLE001 - plugin absent or broken: format unsupported
        pass
    from PIL import features

    if features.check("avif"):
        found.add("avif")
    else:
        try:
            import pillow_avif  # noqa: F401

            found.add("avif")
        except Exception:  # noqa: BLE001
            pass
    return frozenset(found)


def target_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """(w, h) with the longest side set to ``longest``, aspect ratio kept."""
    scale = longest / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own conversion clips wide values to 255; scale instead.
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        if mode == "F" and a.max() <= 1.0:
            top = 1.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
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
        except Exception:  # noqa: BLE001 - a broken profile: fall back to the plain formula
            pass
    return im.convert("RGB")


def open_image(source: "str | os.PathLike | Image.Image", longest: int,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode ``source`` upright, in RGB, with its longest side set to ``longest``.

    Raises DecodeError with a one-line reason for anything that is not a
    readable image within ``max_pixels``.
    """
    register_plugins()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                return _decode(source, longest, max_pixels, own=False)
            if os.path.getsize(source) == 0:
                raise DecodeError("empty file")
            # Close the file on every path: Pillow keeps multi-frame files
            # (GIF, TIFF) and files that failed to load open otherwise.
            with Image.open(source) as im:
                return _decode(im, longest, max_pixels, own=True)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image Pillow can read") from None
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, TypeError, IndexError,
            KeyError, ZeroDivisionError, struct.error) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "truncated" in text.lower() or isinstance(exc, EOFError):
            text = f"truncated or damaged: {text}"
        raise DecodeError(text) from None


def _decode(im: Image.Image, longest: int, max_pixels: int, own: bool) -> Decoded:
    """``own``: the image was opened here, so draft mode may shrink it in place."""
    w, h = im.size
    if w < 1 or h < 1:
        raise DecodeError(f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise DecodeError(
            f"decompression bomb guard: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}"
        )
    # EXIF orientation 5-8 swaps width and height.
    orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
    upright = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    if own and getattr(im, "format", None) == "JPEG":
        scale = longest / max(w, h)
        if scale < 1:
            im.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
    im.load()
    im = ImageOps.exif_transpose(im)
    im = _to_rgb(im)
    size = target_size(im.width, im.height, longest)
    if im.size != size:
        im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return Decoded(np.asarray(im, dtype=np.uint8).copy(), upright[0], upright[1])
