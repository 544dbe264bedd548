"""Local features: keypoints and descriptors that say whether two images show the very same thing.

This module owns OpenCV. Nothing else imports cv2 or knows how features are
stored: it extracts them from a grey picture, packs them into bytes for the
database, unpacks them, and matches a query's features against candidates
with a geometric check (a RANSAC homography).

What is stored per image, at the defaults (at most 18 KB, for 500 keypoints):

- SIFT keypoints of the grey picture with its longest side at ``size`` pixels
  (never enlarged), the ``keypoints`` strongest kept;
- each descriptor as RootSIFT, projected to 32 dimensions by a PCA learned
  once from camera photos that ship with Debian (``bench/local_pca.py``; the
  projection ships in the package and its checksum is part of the recipe),
  scaled to int8 (the scale is dropped: descriptors are compared by angle);
- positions as 16-bit fractions of the working picture's sides.

bench/QUALITY.md has the measurements behind each choice.
"""
from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

KINDS = ("sift", "none")
DEFAULT_KIND = "sift"
# Longest side of the grey picture features are found in. SIFT doubles it
# internally; 400 px matched 480, 640 and 800 px on the covers and copies
# (within 0.005 mAP) at 30 ms a picture, against 45 ms at 480 px.
DEFAULT_SIZE = 400
# The strongest keypoints kept. Quality on the covers levels off at 500.
DEFAULT_KEYPOINTS = 500
MAX_KEYPOINTS = 4000
DIMS = 32
PROJECTION_FILE = Path(__file__).with_name("rootsift_pca32.npz")
# Lowe's ratio test: a match counts when its nearest neighbour is closer than
# this fraction of the second nearest. 0.8 gains 0.005 mAP on the covers, but
# lets through six times as many chance matches, each pair a RANSAC to run.
RATIO = 0.75
# RANSAC: the largest distance, in pixels of the working pictures, from a
# match to its place under the transform for it to count as an inlier.
REPROJECTION_PX = 4.0
RANSAC_ITERATIONS = 2000

_MAGIC = b"LF"
_VERSION = 1
# magic, version, keypoint count, dims, working width, height, crc32 of the payload
_HEADER = struct.Struct("<2sBHBHHI")


class FeaturesError(ValueError):
    """Stored local features that cannot be read back (damaged, or of another format)."""


@dataclass(frozen=True)
class Keypoints:
    """What extraction found: positions in the working picture and raw SIFT descriptors."""

    xy: np.ndarray  # n x 2 float32, pixels of the working picture
    raw: np.ndarray  # n x 128 uint8
    width: int  # of the working picture
    height: int


@dataclass(frozen=True)
class Features:
    """Keypoints ready to match: positions and unit-length descriptors (float32, n x DIMS)."""

    xy: np.ndarray
    desc: np.ndarray
    width: int
    height: int

    def __len__(self) -> int:
        return len(self.xy)


@dataclass(frozen=True)
class Verification:
    """A geometric match: inliers and the homography from query to candidate working pixels."""

    inliers: int
    matches: int  # tentative matches that passed the ratio test
    homography: np.ndarray  # 3 x 3
    mirrored: bool = False


# -- the shipped projection --------------------------------------------------
@functools.cache
def projection() -> tuple[np.ndarray, np.ndarray, str]:
    """(mean 128, matrix 128 x DIMS, sha256 of the file) of the RootSIFT PCA."""
    data = PROJECTION_FILE.read_bytes()
    import io

    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        mean = z["mean"].astype(np.float32)
        matrix = z["projection"].astype(np.float32)
    if mean.shape != (128,) or matrix.shape != (128, DIMS):
        raise FeaturesError(f"{PROJECTION_FILE}: not a RootSIFT projection to {DIMS} dims")
    return mean, matrix, hashlib.sha256(data).hexdigest()


def codec() -> str:
    """How descriptors are encoded, named with the projection's checksum (part of the recipe)."""
    return f"rootsift-pca{DIMS}-int8-{projection()[2][:12]}"


# -- extraction --------------------------------------------------------------
def working_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The grey picture's size: longest side ``size``, never larger than the image."""
    scale = min(1.0, size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


@functools.cache
def _cv2():
    """OpenCV, on one thread. Its thread pool does not survive a fork: a decoding process
    forked from a process that had used it hangs in its first SIFT. One thread also
    leaves the cores to the network, which runs beside it (the query finds its keypoints
    while its descriptor is computed; the index decodes in several processes)."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


def extract(gray: np.ndarray, keypoints: int = DEFAULT_KEYPOINTS) -> Keypoints:
    """SIFT keypoints of a uint8 grey picture (H x W), the ``keypoints`` strongest."""
    gray = np.ascontiguousarray(gray, dtype=np.uint8)
    h, w = gray.shape[:2]
    found, desc = _sift(keypoints).detectAndCompute(gray, None)
    if desc is None or not found:
        return Keypoints(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8), w, h)
    # detectAndCompute keeps the strongest ``keypoints`` but may return a few more
    # (ties, several orientations at one place): keep exactly the strongest.
    response = np.array([k.response for k in found], np.float32)
    order = np.argsort(-response, kind="stable")[:keypoints]
    xy = np.array([k.pt for k in found], np.float32)[order]
    raw = np.clip(np.rint(desc[order]), 0, 255).astype(np.uint8)
    return Keypoints(xy, raw, w, h)


def _sift(keypoints: int):
    # A new detector per call: cheap, and nothing is shared between threads.
    return _cv2().SIFT_create(nfeatures=keypoints)


def project(raw: np.ndarray) -> np.ndarray:
    """Unit-length DIMS-d descriptors of raw SIFT descriptors: RootSIFT, centred, projected."""
    mean, matrix, _ = projection()
    x = raw.astype(np.float32)
    x /= np.maximum(x.sum(axis=1, keepdims=True), 1e-6)
    x = (np.sqrt(x) - mean) @ matrix
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


# SIFT's 4 x 4 cells of 8 orientation bins, as a mirrored picture sees them: the
# rows of cells reversed and the orientations turned the other way.
_ROWS, _COLS, _BINS = np.meshgrid(np.arange(4), np.arange(4), np.arange(8), indexing="ij")
MIRROR = ((3 - _ROWS) * 32 + _COLS * 8 + (8 - _BINS) % 8).reshape(-1)


def views(kp: Keypoints, mirror: bool = False) -> list[Features]:
    """The query's features ready to match, upright and, with ``mirror``, mirrored left-right.

    The mirrored view needs no second extraction: a mirrored picture has the
    same keypoints, at mirrored places, with permuted descriptors (checked
    against a real extraction in the tests).
    """
    out = [Features(kp.xy, project(kp.raw), kp.width, kp.height)]
    if mirror:
        xy = kp.xy.copy()
        xy[:, 0] = kp.width - xy[:, 0]
        out.append(Features(xy, project(kp.raw[:, MIRROR]), kp.width, kp.height))
    return out


# -- storage -----------------------------------------------------------------
def encode(kp: Keypoints) -> bytes:
    """The bytes stored for ``kp``: a checked header, 16-bit positions and int8 descriptors."""
    n = len(kp.xy)
    if n > 0xFFFF:
        raise ValueError(f"{n} keypoints is more than can be stored")
    desc = project(kp.raw) if n else np.zeros((0, DIMS), np.float32)
    top = np.maximum(np.abs(desc).max(axis=1, keepdims=True), 1e-6)
    codes = np.rint(desc * (127 / top)).astype(np.int8)
    size = np.array([kp.width, kp.height], np.float32)
    pos = np.clip(np.rint(kp.xy / size * 65535), 0, 65535).astype("<u2")
    payload = pos.tobytes() + codes.tobytes()
    return _HEADER.pack(_MAGIC, _VERSION, n, DIMS, kp.width, kp.height, zlib.crc32(payload)) + payload


def decode(blob: bytes) -> Features:
    """Features from stored bytes; FeaturesError if they are damaged or of another format."""
    if blob is None or len(blob) < _HEADER.size:
        raise FeaturesError("local features missing or truncated")
    magic, version, n, dims, w, h, crc = _HEADER.unpack_from(blob)
    if magic != _MAGIC or version != _VERSION or dims != DIMS:
        raise FeaturesError(f"local features of another format (version {version}, {dims} dims)")
    payload = memoryview(blob)[_HEADER.size:]
    if len(payload) != n * (4 + dims):
        raise FeaturesError(f"local features of {len(payload)} bytes, {n * (4 + dims)} expected")
    if zlib.crc32(payload) != crc or not (w and h):
        raise FeaturesError("local features damaged (checksum mismatch)")
    pos = np.frombuffer(payload[:4 * n], dtype="<u2").reshape(n, 2).astype(np.float32)
    xy = pos * (np.array([w, h], np.float32) / 65535)
    desc = np.frombuffer(payload[4 * n:], dtype=np.int8).reshape(n, dims).astype(np.float32)
    desc /= np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-6)
    return Features(xy, desc, w, h)


# -- matching ----------------------------------------------------------------
def tentative(query: Features, candidates: Sequence[Features],
              ratio: float = RATIO) -> list[np.ndarray]:
    """For each candidate, the pairs (query index, candidate index) that pass the ratio test.

    One matrix product per candidate (its similarities with the query fit in
    cache): each query keypoint keeps its nearest candidate keypoint when that
    is closer than ``ratio`` times the second nearest, and each candidate
    keypoint keeps only its best query keypoint.
    """
    out: list[np.ndarray] = []
    cv2 = _cv2()
    rows = np.arange(len(query))
    limit = ratio * ratio
    for c in candidates:
        if len(query) == 0 or len(c) < 2:
            out.append(np.zeros((0, 2), np.int64))
            continue
        # OpenCV's single-threaded product, not numpy's: OpenBLAS spreads a product this
        # small over threads, which on a busy machine took 40 times as long (14 ms).
        sims = cv2.gemm(query.desc, c.desc, 1.0, None, 0.0, flags=cv2.GEMM_2_T)
        best = sims.argmax(axis=1)
        s1 = sims[rows, best]
        sims[rows, best] = -2.0
        s2 = sims.max(axis=1)
        # Squared distances of unit vectors: 2 - 2 cos.
        q = np.flatnonzero((2 - 2 * s1) < limit * (2 - 2 * s2))
        out.append(_one_to_one(q, best[q], s1[q]))
    return out


def _one_to_one(q: np.ndarray, c: np.ndarray, sim: np.ndarray) -> np.ndarray:
    """Pairs where each candidate keypoint keeps only its most similar query keypoint."""
    if not len(q):
        return np.zeros((0, 2), np.int64)
    order = np.lexsort((-sim, c))
    q, c = q[order], c[order]
    first = np.r_[True, c[1:] != c[:-1]]
    return np.stack([q[first], c[first]], axis=1)


def verify(query: Features, candidate: Features, pairs: np.ndarray,
           min_inliers: int) -> Verification | None:
    """A homography found by RANSAC (MAGSAC) from the pairs, if it has ``min_inliers``
    inliers and is a plausible view of a picture; else None."""
    if len(pairs) < max(min_inliers, 4):
        return None
    cv2 = _cv2()
    src = query.xy[pairs[:, 0]]
    dst = candidate.xy[pairs[:, 1]]
    h, mask = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, REPROJECTION_PX,
                                 maxIters=RANSAC_ITERATIONS, confidence=0.999)
    if h is None or mask is None:
        return None
    inliers = int(mask.sum())
    if inliers < min_inliers or not plausible(h, query, candidate):
        return None
    return Verification(inliers, len(pairs), h)


# How much smaller or larger than the candidate the query's mapped outline may be.
AREA_RANGE = (1e-4, 1e4)


def plausible(h: np.ndarray, query: Features, candidate: Features) -> bool:
    """Whether ``h`` maps the query's outline to a convex, unmirrored quadrilateral in front
    of the camera and of a sane size: what a view of a flat picture can do. Degenerate
    homographies (all inliers squeezed into a line or a point) fail this."""
    corners = outline(h, query.width, query.height)
    if corners is None:
        return False
    edges = np.roll(corners, -1, axis=0) - corners
    turns = edges[:, 0] * np.roll(edges[:, 1], -1) - edges[:, 1] * np.roll(edges[:, 0], -1)
    # y points down: the corners in the query's own order turn with a positive cross product.
    if not (turns > 0).all():
        return False
    area = 0.5 * float(np.sum(corners[:, 0] * np.roll(corners[:, 1], -1)
                              - np.roll(corners[:, 0], -1) * corners[:, 1]))
    ratio = area / (candidate.width * candidate.height)
    return AREA_RANGE[0] <= ratio <= AREA_RANGE[1]


def outline(h: np.ndarray, width: float, height: float) -> np.ndarray | None:
    """The corners (0,0), (w,0), (w,h), (0,h) mapped by ``h`` (4 x 2), or None if a corner
    goes to infinity or behind the camera."""
    corners = np.array([[0, 0, 1], [width, 0, 1], [width, height, 1], [0, height, 1]], np.float64)
    mapped = corners @ np.asarray(h, np.float64).T
    if not (mapped[:, 2] > 1e-9).all():
        return None
    return mapped[:, :2] / mapped[:, 2:]


def agreement(fresh: Features, stored: Features) -> float:
    """The share of ``fresh``'s keypoints that ``stored`` holds too: at the same place (within
    half a pixel) with a near-identical descriptor. 1.0 for the same extraction."""
    if (fresh.width, fresh.height) != (stored.width, stored.height):
        return 0.0
    if not len(fresh):
        return 1.0 if not len(stored) else 0.0
    if not len(stored):
        return 0.0
    near = ((fresh.xy[:, None, :] - stored.xy[None, :, :]) ** 2).sum(axis=2) < 0.25
    same = (fresh.desc @ stored.desc.T) > 0.95
    return float((near & same).any(axis=1).mean())


# -- the same picture? -------------------------------------------------------
# Copies are 2-D edits (resize, crop, turn, recompress, recolour): an affine map relates
# their keypoints exactly, so the fit is tight. Another shot of the scene needs a
# perspective map at least, and its 3-D parts fit none.
COPY_REPROJECTION_PX = 3.0
# Of the inliers, those within this distance of their place: near all of them for a copy
# (keypoints found again where they were), a fraction for another shot.
COPY_TIGHT_PX = 1.0
# OpenCV's SIFT reports positions in its doubled first octave a quarter pixel off:
# measured here on copies turned by 180 degrees (the fitted shift was 0.47 px from the
# true one at 224 px, twice this).
SIFT_OFFSET = 0.25
# Tentative matches below which no fit is tried: chance pairs of unrelated pictures.
COPY_MIN_MATCHES = 8
# Of the strongest COPY_STRONGEST keypoints of each, a copy and its original share at
# least COPY_MIN_STRONG (all of the edited copies measured did; 70 % of unrelated pairs don't).
COPY_STRONGEST = 150
COPY_MIN_STRONG = 6
# A copy's matches are mostly inliers, so RANSAC needs few draws: 300 find a map with a
# third of inliers 99.9 % of the time (an affine map takes three pairs).
COPY_RANSAC_ITERATIONS = 300


@dataclass(frozen=True)
class Correspondence:
    """How two images' keypoints agree under one affine map (from ``a`` to ``b``)."""

    inliers: int
    share: float  # inliers / keypoints of the image with fewer (1.0: every one maps)
    tight: float  # share of the inliers within COPY_TIGHT_PX of their place
    scale_ratio: float  # larger / smaller singular value of the map (1.0: no squashing)
    affine: np.ndarray | None = None  # 2 x 3: working pixels of a -> working pixels of b


NO_CORRESPONDENCE = Correspondence(0, 0.0, 0.0, 0.0)


def correspond(a: Features, b: Features) -> Correspondence:
    """The affine map under which most of ``a``'s keypoints land on ``b``'s (RANSAC), with
    how many do and how closely. A mirror map counts for nothing (a mirrored copy's
    descriptors do not match anyway)."""
    if min(len(a), len(b)) < COPY_MIN_MATCHES:
        return NO_CORRESPONDENCE
    # A copy keeps its strongest keypoints (stored first): most unrelated pairs end here,
    # at a tenth of the cost of matching them all.
    if len(tentative(_strongest(a), [_strongest(b)])[0]) < COPY_MIN_STRONG:
        return NO_CORRESPONDENCE
    pairs = tentative(a, [b])[0]
    if len(pairs) < COPY_MIN_MATCHES:
        return NO_CORRESPONDENCE
    cv2 = _cv2()
    src, dst = a.xy[pairs[:, 0]], b.xy[pairs[:, 1]]
    cv2.setRNGSeed(0)  # this thread's RANSAC draws: the same answer in any thread, any run
    m, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=COPY_REPROJECTION_PX,
                                   maxIters=COPY_RANSAC_ITERATIONS, confidence=0.999, refineIters=10)
    if m is None or mask is None:
        return NO_CORRESPONDENCE
    # Small matrices by hand, not numpy.linalg: every BLAS call wakes OpenBLAS's threads,
    # which then spin on the core the other pair checks need.
    (p, q, tx), (r, t, ty) = m
    if p * t - q * r <= 0:
        return NO_CORRESPONDENCE
    keep = mask.ravel().astype(bool)
    sx, sy = src[keep, 0], src[keep, 1]
    residual = np.hypot(p * sx + q * sy + tx - dst[keep, 0], r * sx + t * sy + ty - dst[keep, 1])
    inliers = int(keep.sum())
    # Found keypoints lie SIFT_OFFSET px right of and below the true spot in every picture:
    # an offset that cancels between two upright copies, but doubles under a turn.
    m = np.array([[p, q, tx + SIFT_OFFSET * (p + q - 1)], [r, t, ty + SIFT_OFFSET * (r + t - 1)]])
    return Correspondence(inliers, inliers / min(len(a), len(b)),
                          float((residual <= COPY_TIGHT_PX).mean()) if inliers else 0.0,
                          _squash(p, q, r, t), m)


def _squash(p: float, q: float, r: float, t: float) -> float:
    """The ratio of the singular values of [[p, q], [r, t]] (1.0: no squashing)."""
    frob, det = p * p + q * q + r * r + t * t, abs(p * t - q * r)
    root = np.sqrt(max(frob * frob - 4 * det * det, 0.0))
    return float(np.sqrt((frob + root) / max(frob - root, 1e-18)))


def _strongest(f: Features) -> Features:
    return Features(f.xy[:COPY_STRONGEST], f.desc[:COPY_STRONGEST], f.width, f.height)


# Pixels: a copy agrees with its original everywhere they overlap, whatever was done
# to its colours; two frames of a burst agree on the background only, not where the
# subject moved. Small grey pictures are compared cell by cell, COPY_CELLS x COPY_CELLS.
COPY_CELLS = 12
# Standard deviation (grey levels) below which a cell is flat: it tells nothing.
COPY_FLAT = 8.0
# Pictures within this ratio of sizes are compared both ways.
COPY_SAME_SIZE = 1.25
# Blur (sigma, pixels of the small pictures) before comparing.
COPY_BLUR = 0.8


@dataclass(frozen=True)
class PixelMatch:
    """How two pictures agree once one is mapped onto the other."""

    overlap: float  # the share of each picture the other covers, the smaller of the two
    agreement: float  # the lowest correlation of a covered cell (1.0: identical all over)


def compare_pixels(ga: np.ndarray, fa: Features, gb: np.ndarray, fb: Features,
                   affine: np.ndarray) -> PixelMatch:
    """Map grey picture ``ga`` onto ``gb`` by ``affine`` (a Correspondence's, in working
    pixels; the pictures at any size, upright as their features), or ``gb`` onto ``ga``,
    and compare them cell by cell. The larger picture is shrunk onto the smaller (enlarged,
    the smaller is too blurred to agree); at about the same size both ways must agree,
    each one checking the cells of the picture mapped onto. Agreement is 0.0 when fewer
    than four cells tell."""
    m = _then(_then(_unscale(ga.shape, fa), np.vstack([affine, [0, 0, 1]])), _rescale(gb.shape, fb))
    scale = np.sqrt(abs(_det(m)))
    shrink_a = _mapped_onto(ga, gb, m) if scale <= COPY_SAME_SIZE else None
    shrink_b = _mapped_onto(gb, ga, _inverse(m)) if scale >= 1 / COPY_SAME_SIZE else None
    if shrink_a is None or shrink_b is None:
        return shrink_a or shrink_b
    return min(shrink_a, shrink_b, key=lambda p: p.agreement)


def compare_frames(ga: np.ndarray, gb: np.ndarray) -> PixelMatch:
    """``compare_pixels`` for two pictures whose frames are taken to be the same (a resized,
    recompressed or recoloured copy): the one mapped onto the other whole. Used when no
    keypoints say how they lie; pictures of other proportions (2 % apart) do not match."""
    (ha, wa), (hb, wb) = ga.shape, gb.shape
    if abs(np.log((wa / ha) / (wb / hb))) > 0.02:
        return PixelMatch(0.0, 0.0)
    sx, sy = wb / wa, hb / ha
    m = _scaling(sx, sy)
    if sx > 1:  # shrink the larger onto the smaller
        return _mapped_onto(gb, ga, _inverse(m))
    return _mapped_onto(ga, gb, m)


def _mapped_onto(ga: np.ndarray, gb: np.ndarray, m: np.ndarray) -> PixelMatch:
    cv2 = _cv2()
    hb, wb = gb.shape
    scale = np.sqrt(abs(_det(m)))
    # Blurred: what survives recompression and a fraction of a pixel off; a picture that
    # shrinks, more, as it holds detail the smaller one never had.
    a = cv2.GaussianBlur(ga.astype(np.float32), (0, 0), COPY_BLUR / min(scale, 1.0))
    # Edges replicated, not black: a dark seam would read as structure in a flat cell.
    warped = cv2.warpAffine(a, m[:2], (wb, hb), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inside = cv2.warpAffine(np.ones(ga.shape, np.uint8), m[:2], (wb, hb), flags=cv2.INTER_NEAREST)
    b = cv2.GaussianBlur(gb.astype(np.float32), (0, 0), COPY_BLUR)
    covered = float(inside.sum())
    overlap = min(covered / inside.size, covered / scale ** 2 / ga.size)
    ncc = _cell_correlations(warped, inside, b)
    return PixelMatch(overlap, float(ncc.min()) if len(ncc) >= 4 else 0.0)


def _cell_correlations(warped: np.ndarray, inside: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The correlation of each cell of ``b`` that ``warped`` covers (flat cells left out;
    see ``_correlations``), from per-cell sums."""
    hb, wb = b.shape
    ys = np.unique(np.linspace(0, hb, COPY_CELLS + 1).astype(int))
    xs = np.unique(np.linspace(0, wb, COPY_CELLS + 1).astype(int))

    def sums(img: np.ndarray) -> np.ndarray:
        return np.add.reduceat(np.add.reduceat(img.astype(np.float64), ys[:-1], axis=0), xs[:-1], axis=1)

    n = np.outer(np.diff(ys), np.diff(xs)).astype(np.float64)
    mx, my = sums(warped) / n, sums(b) / n
    vx = np.maximum(sums(warped * warped) / n - mx * mx, 0)
    vy = np.maximum(sums(b * b) / n - my * my, 0)
    cov = sums(warped * b) / n - mx * my
    told = (sums(inside) / n >= 0.95) & np.outer(np.diff(ys) > 1, np.diff(xs) > 1)
    return _correlations(np.sqrt(vx[told]), np.sqrt(vy[told]), cov[told])


def _correlations(sx: np.ndarray, sy: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Normalised correlations of cells, from their standard deviations and covariance.
    Left out: cells that tell nothing, flat in both or flat in one and barely textured in
    the other (noise correlates with nothing). A cell flat in one and textured in the other
    counts 0: something is there that is not in the other."""
    low, high = np.minimum(sx, sy), np.maximum(sx, sy)
    flat = low < COPY_FLAT
    keep = ~flat | (high >= 3 * COPY_FLAT)
    out = np.where(flat, 0.0, cov / np.maximum(sx * sy, 1e-9))
    return out[keep].astype(np.float32)


def _rescale(shape: tuple[int, ...], f: Features) -> np.ndarray:
    """From the working pixels of ``f`` to those of a picture of ``shape``: pixel centres
    map to pixel centres (a half-pixel error turns into a whole one under a 180-degree turn)."""
    return _scaling(shape[1] / f.width, shape[0] / f.height)


def _scaling(sx: float, sy: float) -> np.ndarray:
    """Scaling by (sx, sy) that maps pixel centres to pixel centres."""
    return np.array([[sx, 0, (sx - 1) / 2], [0, sy, (sy - 1) / 2], [0, 0, 1]])


def _unscale(shape: tuple[int, ...], f: Features) -> np.ndarray:
    """The inverse of ``_rescale``."""
    return _inverse(_rescale(shape, f))


# 3 x 3 affine maps (last row 0, 0, 1) by hand: see correspond on BLAS.
def _then(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The map that applies ``first``, then ``second``."""
    return np.einsum("ij,jk->ik", second, first)


def _det(m: np.ndarray) -> float:
    return float(m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0])


def _inverse(m: np.ndarray) -> np.ndarray:
    return np.vstack([_cv2().invertAffineTransform(np.ascontiguousarray(m[:2])), [0, 0, 1]])


# -- visual words --------------------------------------------------------------
# A picture turned, cropped or recoloured keeps most of its keypoints, whatever its
# global descriptor says: counted by visual word, they find copies the global
# descriptor puts far apart (search.duplicates).
WORDS = 256


def vocabulary(sample: np.ndarray, words: int = WORDS) -> np.ndarray:
    """Visual words (at most ``words`` x DIMS, unit length): the k-means centres of a sample
    of descriptors, the same for the same sample."""
    cv2 = _cv2()
    cv2.setRNGSeed(0)
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    _, _, centres = cv2.kmeans(sample, min(words, len(sample)), None,
                               (cv2.TERM_CRITERIA_MAX_ITER, 10, 0), 1, cv2.KMEANS_PP_CENTERS)
    return centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-6)


def word_counts(f: Features, words: np.ndarray) -> np.ndarray:
    """How many of ``f``'s keypoints have each word as their nearest (len(words) counts)."""
    if not len(f):
        return np.zeros(len(words), np.float32)
    sims = _cv2().gemm(f.desc, words, 1.0, None, 0.0, flags=_cv2().GEMM_2_T)
    return np.bincount(sims.argmax(axis=1), minlength=len(words)).astype(np.float32)
