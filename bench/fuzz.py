"""Fuzz the image loader: feed malformed files through ``open_image`` and count what happens.

Every input is derived from ``--seed`` and its number alone, so a run can be
repeated exactly and any input rebuilt. Families, in turn:

  random     random bytes, half of them behind a real format signature
  truncate   a valid seed file cut short
  bitflip    1 to 32 flipped bits (half the time in the first 512 bytes)
  byterun    a run of bytes inserted, deleted, duplicated or overwritten
  header     image dimensions in the header (PNG IHDR, JPEG SOF, GIF screen and
             frame, TIFF tags, BMP, WebP VP8/VP8L/VP8X) set to absurd values, or
             a 16/32-bit field near the start set to an edge value
  exif       EXIF with a bad orientation (0, 9, 65535, wrong type or count),
             garbage, or broken offsets, in JPEG, PNG, WebP and TIFF

Seeds are small generated pictures in JPEG, PNG, WebP, GIF, TIFF, BMP and the
other formats Pillow writes. Inputs run in worker processes, each decode under
open_image's own time limit; the parent also kills a worker that outlives the
limit by far (a hang in C code that the alarm cannot interrupt) or dies
(a segfault), and restarts it. Outcomes: DecodeError, decoded, crash (any other
exception, a DecodeError from open_image's catch-all for unforeseen exceptions,
or a worker that died), hang (the limit was hit). Crash and hang inputs are
saved under a temporary folder as reproducers.

    python bench/fuzz.py --n 12000            # about 30 s on 2 cores
    python bench/fuzz.py --n 2000 --seed 7 --workers 4 --timeout 5
"""
from __future__ import annotations

import argparse
import collections
import io
import multiprocessing as mp
import os
import platform
import random
import re
import resource
import struct
import sys
import tempfile
import time
import traceback
import zlib
from multiprocessing.connection import wait
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
from PIL import Image

from indexer.decode import DEFAULT_MAX_PIXELS, DecodeError, open_image, register_plugins

FAMILIES = ("random", "truncate", "bitflip", "byterun", "header", "exif")
LONGEST = 40  # below the seeds' size, so JPEG draft mode is exercised too
EDGE32 = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
          0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
DIMS = [0, 1, 2, 3, 255, 256, 4097, 13000, 16383, 16384, 30000, 65535, 65536, 1 << 20,
        0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
SIGNATURES = [b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1", b"\xff\xd8\xff\xdb", b"\x89PNG\r\n\x1a\n",
              b"GIF89a", b"GIF87a", b"II*\x00", b"MM\x00*", b"II+\x00", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
              b"RIFF\x00\x00\x00\x00WEBPVP8L", b"RIFF\x00\x00\x00\x00WEBPVP8X", b"\x00\x00\x01\x00",
              b"icns", b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51", b"\x00\x00\x00\x1cftypavif",
              b"\x00\x00\x00\x18ftypheic", b"8BPS", b"P6\n", b"P5\n", b"qoif", b"DDS ", b"\x01\xda",
              b"\x0a\x05\x01\x08", b"#define", b"/* XPM */", b"%!PS-Adobe-3.0", b"\xd7\xcd\xc6\x9a"]


# --- seed files ------------------------------------------------------------------------


def picture(seed: int, size=(96, 64)) -> Image.Image:
    """A seeded picture with blobs, stripes and noise (like tests/conftest.make_photo)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32) + rng.uniform(0, 255, 3)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.4) * min(w, h)
        img[((x - cx) ** 2 + (y - cy) ** 2) < r * r] = rng.uniform(0, 255, 3)
    img += 40 * np.sin((x * 0.7 + y * 0.3) * rng.uniform(0.05, 0.3))[..., None]
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def make_seeds() -> dict[str, bytes]:
    """Small valid files, one per format and variant; each name starts with its format."""
    register_plugins()  # so that AVIF and HEIF can be written where available
    p = picture(1)
    rgba = p.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(p.size))
    pal = p.quantize(16)
    grey16 = Image.fromarray(np.asarray(p.convert("L"), np.uint16) * 257)
    frames = [picture(i, (48, 32)) for i in range(3)]
    seeds = {
        "jpeg": save(p, "JPEG", quality=90),
        "jpeg-progressive": save(p, "JPEG", quality=80, progressive=True),
        "jpeg-exif": save(p, "JPEG", exif=exif_blob(6, 3, 1)),
        "jpeg-grey": save(p.convert("L"), "JPEG"),
        "jpeg-cmyk": save(p.convert("CMYK"), "JPEG"),
        "jpeg-cmyk-icc": save(p.convert("CMYK"), "JPEG", icc_profile=_srgb_profile()),
        "jpeg-420-restart": save(p, "JPEG", subsampling=2, restart_marker_blocks=1),
        "png": save(p, "PNG"),
        "png-rgba": save(rgba, "PNG"),
        "png-palette-trns": save(pal, "PNG", transparency=0),
        "png-16bit": save(grey16, "PNG"),
        "png-interlaced": save(p, "PNG", interlace=True),
        "png-1bit": save(p.convert("1"), "PNG"),
        "png-exif": save(p, "PNG", exif=exif_blob(8, 3, 1)),
        "png-apng": save(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "webp-lossy": save(p, "WEBP", quality=80),
        "webp-lossless": save(p, "WEBP", lossless=True),
        "webp-alpha": save(rgba, "WEBP", quality=80),
        "webp-anim": save(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "webp-exif": save(p, "WEBP", exif=exif_blob(6, 3, 1)),
        "gif": save(pal, "GIF"),
        "gif-anim": save(frames[0], "GIF", save_all=True, append_images=frames[1:], transparency=0),
        "tiff": save(p, "TIFF"),
        "tiff-lzw": save(p, "TIFF", compression="tiff_lzw"),
        "tiff-deflate": save(rgba, "TIFF", compression="tiff_adobe_deflate"),
        "tiff-packbits": save(p.convert("L"), "TIFF", compression="packbits"),
        "tiff-jpeg": save(p, "TIFF", compression="jpeg"),
        "tiff-16bit": save(grey16, "TIFF"),
        "tiff-float": save(Image.fromarray(np.asarray(p.convert("L"), np.float32) / 255), "TIFF"),
        "tiff-multipage": save(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "tiff-tiled": save(p, "TIFF", tile=(16, 16)) if _tiles_supported() else save(p, "TIFF"),
        "bmp": save(p, "BMP"),
        "bmp-palette": save(pal, "BMP"),
        "bmp-rgba": save(rgba, "BMP"),
        "ico": save(p, "ICO", sizes=[(32, 32), (64, 64)]),
        "jpeg2000": save(p, "JPEG2000"),
        "tga": save(p, "TGA", compression="tga_rle"),
        "pcx": save(p, "PCX"),
        "ppm": save(p, "PPM"),
        "sgi": save(p, "SGI"),
        "qoi": save(p, "QOI"),
        "dds": save(rgba, "DDS"),
        "im": save(p, "IM"),
    }
    for name, fmt in (("avif", "AVIF"), ("heic", "HEIF")):
        try:
            seeds[name] = save(p, fmt, quality=60)
        except (KeyError, OSError, ValueError):
            pass  # plugin absent: the format is not fuzzed
    return seeds


def _srgb_profile() -> bytes:
    """An ICC profile for LittleCMS to parse (CMYK JPEGs are converted through theirs)."""
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _tiles_supported() -> bool:
    try:
        save(Image.new("RGB", (32, 32)), "TIFF", tile=(16, 16))
        return True
    except (TypeError, ValueError, OSError):
        return False


# --- EXIF -------------------------------------------------------------------------------

def exif_blob(value: int, kind: int = 3, count: int = 1, order: str = "<", extra=(),
              next_ifd: int = 0) -> bytes:
    """A TIFF-structured EXIF block, prefixed with ``Exif\\0\\0``, holding an Orientation
    entry of TIFF type ``kind`` and ``count`` values all equal to ``value``, plus ``extra``
    raw entries (tag, type, count, 4-byte value/offset)."""
    entries = [(0x0112, kind, count)] + [e[:3] for e in extra]
    head = (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(order + "I", 8)
    n = len(entries)
    data_at = 8 + 2 + 12 * n + 4
    packed = _pack_values(order, kind, value, count)
    body = struct.pack(order + "H", n)
    if len(packed) <= 4:
        body += struct.pack(order + "HHI", 0x0112, kind, count) + packed.ljust(4, b"\0")
        data = b""
    else:
        body += struct.pack(order + "HHII", 0x0112, kind, count, data_at)
        data = packed
    for tag, typ, cnt, raw in extra:
        body += struct.pack(order + "HHI", tag, typ, cnt) + raw
    return b"Exif\x00\x00" + head + body + struct.pack(order + "I", next_ifd) + data


def _pack_values(order: str, kind: int, value: int, count: int) -> bytes:
    v = value & 0xFFFFFFFF
    one = {
        1: struct.pack("B", v & 0xFF), 2: str(value).encode()[:1] or b"0", 3: struct.pack(order + "H", v & 0xFFFF),
        4: struct.pack(order + "I", v), 5: struct.pack(order + "II", v, 1), 6: struct.pack("B", v & 0xFF),
        7: struct.pack("B", v & 0xFF), 8: struct.pack(order + "H", v & 0xFFFF), 9: struct.pack(order + "I", v),
        10: struct.pack(order + "II", v, 0), 11: struct.pack(order + "f", float(value)),
        12: struct.pack(order + "d", float(value)), 13: struct.pack(order + "I", v),
        16: struct.pack(order + "Q", v),
    }.get(kind, struct.pack("B", v & 0xFF))
    return (one * min(count, 64))


def exif_input(rng: random.Random, seeds: dict[str, bytes]) -> bytes:
    """A small valid picture whose EXIF is bad in one of several ways."""
    order = rng.choice("<>")
    how = rng.randrange(6)
    if how <= 1:  # a bad orientation value, type or count
        value = rng.choice([0, 9, 10, 255, 256, 65535, 0xFFFFFFFF, -1, 1, 5, 6, 7, 8])
        kind = rng.choice([1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 16, 0, 99, 0xFFFF])
        count = rng.choice([1, 1, 1, 0, 2, 4, 0xFFFF, 0xFFFFFFFF])
        blob = exif_blob(value, kind, count, order)
    elif how == 2:  # entries pointing outside the block, or an IFD that loops
        extra = [(rng.choice([0x8769, 0x8825, 0xA005, 0x010F, 0x927C]), rng.choice([3, 4, 7, 13]),
                  rng.choice([1, 0xFFFFFFFF, 1000]), struct.pack(order + "I", rng.choice([8, 0, 0xFFFFFFF0, 26])))
                 for _ in range(rng.randint(1, 3))]
        blob = exif_blob(rng.choice([1, 6, 9]), 3, 1, order, extra, next_ifd=rng.choice([0, 8, 0xFFFF, 26]))
    elif how == 3:  # random bytes after a valid TIFF header
        blob = b"Exif\x00\x00" + (b"II*\x00" if order == "<" else b"MM\x00*") + rng.randbytes(rng.randint(0, 300))
    elif how == 4:  # pure garbage
        blob = rng.randbytes(rng.randint(0, 200))
    else:  # a valid orientation block with a few bits flipped
        blob = bytearray(exif_blob(rng.choice([3, 6, 8]), 3, 1, order))
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(6, len(blob))
            blob[i] ^= 1 << rng.randrange(8)
        blob = bytes(blob)
    im = picture(rng.randrange(4), (rng.choice([48, 96]), 64))
    fmt = rng.choice(["JPEG", "PNG", "WEBP", "TIFF"])
    try:
        if fmt == "TIFF":
            return _tiff_with_orientation(im, rng)
        return save(im, fmt, exif=blob if fmt == "JPEG" else blob.removeprefix(b"Exif\x00\x00"))
    except Exception:  # noqa: BLE001 - Pillow refused to write it: the JPEG carrier always works
        return save(im, "JPEG", exif=blob)


def _tiff_with_orientation(im: Image.Image, rng: random.Random) -> bytes:
    """A TIFF whose Orientation tag (in IFD0, which is its EXIF) is odd."""
    data = bytearray(save(im, "TIFF"))
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", data, 4)
    (n,) = struct.unpack_from(order + "H", data, ifd)
    # Replace the first entry that is neither size nor strip layout with Orientation.
    for k in range(n):
        at = ifd + 2 + 12 * k
        tag = struct.unpack_from(order + "H", data, at)[0]
        if tag in (0x0106, 0x0115, 0x011C, 0x0128):
            kind = rng.choice([3, 4, 2, 5, 11, 0xFFFF])
            value = rng.choice([0, 9, 65535, 6, 8])
            struct.pack_into(order + "HHI", data, at, 0x0112, kind, rng.choice([1, 2, 0xFFFFFFFF]))
            # A value that fits is stored in the entry itself, left-justified.
            field = struct.pack(order + "H", value) if kind == 3 else struct.pack(order + "I", value)
            data[at + 8:at + 12] = field.ljust(4, b"\0")
            break
    return bytes(data)


# --- header dimension patchers ------------------------------------------------------------


def patch_png(data: bytes, w: int, h: int) -> bytes:
    d = bytearray(data)
    struct.pack_into(">II", d, 16, w, h)
    struct.pack_into(">I", d, 29, zlib.crc32(bytes(d[12:29])))
    return bytes(d)


def patch_jpeg(data: bytes, w: int, h: int) -> bytes:
    d = bytearray(data)
    for m in re.finditer(rb"\xff[\xc0-\xc3\xc5-\xc7\xc9-\xcb\xcd-\xcf]", data):
        struct.pack_into(">HH", d, m.start() + 5, h & 0xFFFF, w & 0xFFFF)
        break
    return bytes(d)


def patch_gif(data: bytes, w: int, h: int, frame_too: bool = True) -> bytes:
    d = bytearray(data)
    struct.pack_into("<HH", d, 6, w & 0xFFFF, h & 0xFFFF)
    at = 13 + (3 << ((d[10] & 7) + 1) if d[10] & 0x80 else 0)
    while frame_too and at < len(d):
        if d[at] == 0x21:  # extension: label, then sub-blocks
            at += 2
            while at < len(d) and d[at]:
                at += d[at] + 1
            at += 1
        elif d[at] == 0x2C:
            struct.pack_into("<HH", d, at + 5, w & 0xFFFF, h & 0xFFFF)
            break
        else:
            break
    return bytes(d)


def patch_tiff(data: bytes, w: int, h: int) -> bytes:
    d = bytearray(data)
    order = "<" if d[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", d, 4)
    (n,) = struct.unpack_from(order + "H", d, ifd)
    for k in range(n):
        at = ifd + 2 + 12 * k
        tag = struct.unpack_from(order + "H", d, at)[0]
        if tag in (256, 257):
            struct.pack_into(order + "HII", d, at + 2, 4, 1, (w if tag == 256 else h) & 0xFFFFFFFF)
    return bytes(d)


def patch_bmp(data: bytes, w: int, h: int) -> bytes:
    d = bytearray(data)
    struct.pack_into("<II", d, 18, w & 0xFFFFFFFF, h & 0xFFFFFFFF)
    return bytes(d)


def patch_webp(data: bytes, w: int, h: int) -> bytes:
    d = bytearray(data)
    kind = bytes(d[12:16])
    if kind == b"VP8X":
        d[24:27] = ((w - 1) & 0xFFFFFF).to_bytes(3, "little")
        d[27:30] = ((h - 1) & 0xFFFFFF).to_bytes(3, "little")
    elif kind == b"VP8 ":
        struct.pack_into("<HH", d, 26, w & 0xFFFF, h & 0xFFFF)
    elif kind == b"VP8L":
        bits = int.from_bytes(d[21:25], "little")
        bits = (bits & ~0x0FFFFFFF) | ((w - 1) & 0x3FFF) | (((h - 1) & 0x3FFF) << 14)
        d[21:25] = bits.to_bytes(4, "little")
    return bytes(d)


PATCHERS = {"png": patch_png, "jpeg": patch_jpeg, "gif": patch_gif, "tiff": patch_tiff,
            "bmp": patch_bmp, "webp": patch_webp}


# --- inputs -------------------------------------------------------------------------------


def make_input(seed: int, i: int, seeds: dict[str, bytes]) -> tuple[str, str, bytes]:
    """(family, detail, bytes) of input ``i``; the same for the same seed on any machine."""
    rng = random.Random(f"lookalike-fuzz:{seed}:{i}")
    family = FAMILIES[i % len(FAMILIES)]
    names = sorted(seeds)
    if family == "random":
        data = rng.randbytes(rng.randint(0, 4096))
        if rng.random() < 0.5:
            sig = rng.choice(SIGNATURES)
            return family, "signature", sig + data
        return family, "plain", data
    if family == "exif":
        return family, "exif", exif_input(rng, seeds)
    if family == "header":
        fmt = rng.choice(sorted(PATCHERS))
        name = rng.choice([n for n in names if n.startswith(fmt)])
        if rng.random() < 0.75:
            w = rng.choice(DIMS) if rng.random() < 0.7 else rng.randint(0, 1 << 32)
            h = rng.choice(DIMS) if rng.random() < 0.7 else rng.randint(0, 1 << 32)
            try:
                return family, name, PATCHERS[fmt](seeds[name], w, h)
            except (struct.error, IndexError, ValueError):
                return family, name, seeds[name]
        d = bytearray(seeds[name])
        for _ in range(rng.randint(1, 3)):
            width = rng.choice([2, 4])
            at = rng.randrange(0, max(1, min(len(d), 128) - width))
            value = rng.choice(EDGE32) & ((1 << (8 * width)) - 1)
            d[at:at + width] = value.to_bytes(width, rng.choice(["little", "big"]))
        return family, name, bytes(d)
    name = rng.choice(names)
    data = bytearray(seeds[name])
    if family == "truncate":
        return family, name, bytes(data[: rng.randrange(0, len(data))])
    if family == "bitflip":
        span = min(len(data), 512) if rng.random() < 0.5 else len(data)
        for _ in range(rng.randint(1, 32)):
            at = rng.randrange(span)
            data[at] ^= 1 << rng.randrange(8)
        return family, name, bytes(data)
    # byterun
    at = rng.randrange(len(data))
    n = rng.choice([1, 2, 4, 16, 64, 256, rng.randint(1, 4096)])
    how = rng.randrange(4)
    if how == 0:
        run = bytes([rng.randrange(256)]) * n if rng.random() < 0.5 else rng.randbytes(n)
        data[at:at] = run
    elif how == 1:
        del data[at:at + n]
    elif how == 2:
        src = rng.randrange(len(data))
        data[at:at] = data[src:src + n]
    else:
        data[at:at + n] = rng.randbytes(min(n, len(data) - at))
    return family, name, bytes(data)


# --- workers ------------------------------------------------------------------------------


def worker(conn, seed: int, timeout: float, folder: str) -> None:
    """Decode the inputs the parent sends, one at a time; answer with the outcome of each."""
    import logging

    logging.disable(logging.CRITICAL)  # the library's debug lines are not wanted here
    seeds = make_seeds()
    path = Path(folder) / f"input-{os.getpid()}"
    conn.send(("ready", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    while True:
        i = conn.recv()
        if i is None:
            break
        family, detail, data = make_input(seed, i, seeds)
        path.write_bytes(data)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        try:
            d = open_image(path, LONGEST, DEFAULT_MAX_PIXELS, timeout=timeout)
            shape = d.pixels.shape
            ok = (d.pixels.dtype == np.uint8 and len(shape) == 3 and shape[2] == 3
                  and max(shape[:2]) == LONGEST and d.width > 0 and d.height > 0)
            outcome, msg = ("ok", "") if ok else ("crash", f"bad result {shape} {d.pixels.dtype}")
        except DecodeError as exc:
            msg = str(exc)
            if "took longer than" in msg:
                outcome = "hang"
            elif not msg or "\n" in msg or "\r" in msg or msg.startswith("unexpected error"):
                outcome = "crash"
            else:
                outcome = "error"
        except BaseException as exc:  # noqa: BLE001 - exactly what the fuzzer looks for
            outcome = "crash"
            msg = f"{type(exc).__name__}: {exc} @ {traceback.extract_tb(exc.__traceback__)[-1]}"
        elapsed = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        conn.send((i, family, detail, outcome, msg, elapsed, peak, peak - before))


class Pool:
    """Worker processes fed one input at a time, restarted when one dies or hangs."""

    def __init__(self, n: int, seed: int, timeout: float, folder: str):
        self.ctx = mp.get_context("spawn")  # fresh interpreters: a clean RSS baseline
        self.seed, self.timeout, self.folder = seed, timeout, folder
        self.slots = [self._start() for _ in range(n)]
        self.baseline_kb = 0
        for slot in self.slots:
            self.baseline_kb = max(self.baseline_kb, self._ready(slot))

    def _start(self) -> dict:
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=worker, args=(child, self.seed, self.timeout, self.folder), daemon=True)
        p.start()
        child.close()
        return {"proc": p, "conn": parent, "job": None, "since": 0.0}

    @staticmethod
    def _ready(slot) -> int:
        tag, rss = slot["conn"].recv()
        assert tag == "ready"
        return rss

    def restart(self, slot) -> None:
        slot["proc"].kill()
        slot["proc"].join()
        slot["conn"].close()
        slot.update(self._start())
        self._ready(slot)

    def close(self) -> None:
        for slot in self.slots:
            try:
                slot["conn"].send(None)
            except OSError:
                pass
            slot["proc"].join(timeout=5)
            if slot["proc"].is_alive():
                slot["proc"].kill()


def run(n: int, seed: int, workers: int, timeout: float, outdir: Path, progress: bool) -> dict:
    seeds = make_seeds()
    folder = tempfile.mkdtemp(prefix="lookalike-fuzz-inputs-")
    pool = Pool(workers, seed, timeout, folder)
    hard = timeout + 20.0  # the alarm did not fire: a hang inside C code
    stats = {f: collections.Counter() for f in FAMILIES}
    reasons = collections.Counter()
    findings: list[tuple[int, str, str, str, str]] = []
    max_time = (0.0, -1, "", "")
    max_rise = (0, -1, "", "")
    peak_kb = pool.baseline_kb
    todo = iter(range(n))
    done = 0
    next_report = 1000
    started = time.perf_counter()

    def give(slot) -> None:
        i = next(todo, None)
        if i is not None:
            slot["conn"].send(i)
        slot["job"], slot["since"] = i, time.perf_counter()

    def record(i, family, detail, outcome, msg):
        stats[family][outcome] += 1
        if outcome == "error":
            reasons[re.sub(r"\d+", "N", msg)[:90]] += 1
        elif outcome in ("crash", "hang"):
            findings.append((i, family, detail, outcome, msg))
            fam, det, data = make_input(seed, i, seeds)
            stem = outdir / f"{outcome}-{fam}-{i}"
            stem.with_suffix(".bin").write_bytes(data)
            stem.with_suffix(".txt").write_text(f"seed {seed} input {i} {fam} {det}\n{msg}\n")

    for slot in pool.slots:
        give(slot)
    try:
        while any(slot["job"] is not None for slot in pool.slots):
            ready = wait([s["conn"] for s in pool.slots if s["job"] is not None], timeout=1.0)
            now = time.perf_counter()
            for slot in pool.slots:
                if slot["job"] is None:
                    continue
                if slot["conn"] in ready:
                    try:
                        i, family, detail, outcome, msg, elapsed, rss, rise = slot["conn"].recv()
                    except (EOFError, OSError):
                        i = slot["job"]
                        family, detail, _ = make_input(seed, i, seeds)
                        code = slot["proc"].exitcode
                        pool.restart(slot)
                        record(i, family, detail, "crash", f"worker died (exit code {code})")
                        done += 1
                        give(slot)
                        continue
                    peak_kb = max(peak_kb, rss)
                    if rise > max_rise[0]:
                        max_rise = (rise, i, family, detail)
                    if elapsed > max_time[0]:
                        max_time = (elapsed, i, family, detail)
                    record(i, family, detail, outcome, msg)
                    done += 1
                    give(slot)
                elif now - slot["since"] > hard:
                    i = slot["job"]
                    family, detail, _ = make_input(seed, i, seeds)
                    pool.restart(slot)
                    record(i, family, detail, "hang", f"no answer after {hard:.0f} s: killed")
                    done += 1
                    give(slot)
            if progress and done >= next_report:
                next_report += 1000
                print(f"  {done}/{n} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    finally:
        pool.close()
    wall = time.perf_counter() - started
    for child in Path(folder).iterdir():
        child.unlink()
    os.rmdir(folder)
    return {"stats": stats, "reasons": reasons, "findings": findings, "max_time": max_time,
            "peak_kb": peak_kb, "max_rise": max_rise, "baseline_kb": pool.baseline_kb, "wall": wall, "seeds": seeds}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import PIL

    return (f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, Pillow {PIL.__version__}")


def report(r: dict, n: int, seed: int, workers: int, timeout: float, outdir: Path) -> str:
    cols = ("error", "ok", "crash", "hang")
    lines = [f"## Fuzzing `open_image`: {n} inputs, seed {seed}", "",
             (f"{workers} worker processes, time limit {timeout:g} s per file, "
              f"{len(r['seeds'])} seed files ({', '.join(sorted(r['seeds']))}); longest side {LONGEST}."), "",
             "| family | inputs | DecodeError | decoded OK | crashes | hangs |",
             "|---|---:|---:|---:|---:|---:|"]
    total = collections.Counter()
    for fam in FAMILIES:
        c = r["stats"][fam]
        total.update(c)
        lines.append(f"| {fam} | {sum(c.values())} | " + " | ".join(str(c[k]) for k in cols) + " |")
    lines.append(f"| **total** | **{sum(total.values())}** | " + " | ".join(f"**{total[k]}**" for k in cols) + " |")
    t, i, fam, det = r["max_time"]
    lines += ["",
              f"- max decode time: {t * 1000:.0f} ms (input {i}, {fam}, {det})",
              (f"- peak RSS of a worker: {r['peak_kb'] / 1024:.0f} MB "
               f"(after start-up, before any input: {r['baseline_kb'] / 1024:.0f} MB); the largest rise "
               f"of that peak on one input: {r['max_rise'][0] / 1024:.0f} MB (input {r['max_rise'][1]}, "
               f"{r['max_rise'][2]}, {r['max_rise'][3]})"),
              f"- wall time: {r['wall']:.1f} s ({n / r['wall']:.0f} inputs/s)",
              f"- machine: {machine()}",
              f"- reproducers: {outdir if r['findings'] else 'none (no crash, no hang)'}", ""]
    if r["findings"]:
        lines += ["| input | family | seed file | outcome | message |", "|---:|---|---|---|---|"]
        for i, fam, det, outcome, msg in r["findings"][:50]:
            lines.append(f"| {i} | {fam} | {det} | {outcome} | {msg[:160].replace('|', '/')} |")
        lines.append("")
    lines += ["Most common DecodeError reasons (digits shown as N):", "",
              "| count | reason |", "|---:|---|"]
    for reason, count in r["reasons"].most_common(15):
        lines.append(f"| {count} | {reason.replace('|', '/')} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=12000, help="number of inputs (default 12000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout", type=float, default=10.0, help="per-file decode limit, seconds")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args()
    outdir = Path(tempfile.mkdtemp(prefix="lookalike-fuzz-findings-"))
    r = run(args.n, args.seed, args.workers, args.timeout, outdir, not args.quiet)
    print(report(r, args.n, args.seed, args.workers, args.timeout, outdir))
    if not r["findings"]:
        outdir.rmdir()
    return 1 if r["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
