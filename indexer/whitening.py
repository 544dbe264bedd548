"""Whitening learned from the indexed collection, applied to it and to every query.

Two kinds, one transform ``l2n((x - mean) @ projection)``:

- ``center``: subtract the collection's mean descriptor. Every CNN descriptor
  shares a large common component (what ImageNet images have in common);
  removing it spreads the collection over the sphere. It needs few images and
  is learned by default (CENTER_MIN_IMAGES).
- ``pca``: PCA whitening with shrinkage. The covariance's eigenvalues are
  blended with their mean, ``(1 - s) * w + s * mean(w)``: s = 0 is full
  whitening, s = 1 only a rotation (the same ranking as ``center``). Learned
  on too few images, the smallest eigenvalues are noise that whitening blows
  up, so it is refused below PCA_MIN_FACTOR images per dimension.
- ``learned``: learned from labelled groups, not from the collection
  (``learn_from_groups``; Radenović, Tolias and Chum, TPAMI 2018). First the
  differences between images of one group are whitened (what varies between
  two views of one thing is shrunk), then the labelled images' covariance in
  that space is rotated onto its main axes and cut to ``dim`` dimensions.
  Pairs are many more than images (a group of 5 gives 10), so a few hundred
  labelled images suffice where PCA needs thousands.

Pure NumPy; the database stores the learned arrays (Store.whitening).
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from .pooling import l2n

KINDS = ("center", "pca")
CENTER_MIN_IMAGES = 50
PCA_MIN_FACTOR = 2
DEFAULT_SHRINKAGE = 0.5
LEARNED = "learned"
# Learned whitening: bench/QUALITY.md, "Tuning", has the sweep behind it. Its output
# keeps every dimension by default: cutting to 512 cost up to 0.01 of mAP.
LEARNED_SHRINKAGE = 0.5
LEARNED_MIN_PAIRS = 20


class WhiteningError(ValueError):
    """Whitening cannot be learned from this collection; str() says why."""


@dataclass(frozen=True)
class Whitening:
    """A learned whitening: what it is, what it was learned from, and its arrays."""

    kind: str
    shrinkage: float
    images: int
    learned_at: str
    mean: np.ndarray
    projection: np.ndarray | None = None  # dim x out, None for ``center``
    source: str = ""  # for ``learned``: the labelled set, and its groups and pairs
    # For ``learned``: how many of the collection's images the mean is theirs (0: the
    # labelled images'). The collection's own mean serves better (bench/QUALITY.md).
    centred_on: int = 0

    @property
    def dim(self) -> int:
        """Dimensions of the whitened descriptors."""
        return int(self.mean.shape[0] if self.projection is None else self.projection.shape[1])

    def apply(self, vecs: np.ndarray) -> np.ndarray:
        """Whitened, L2-normalised float32 rows for raw descriptors ``vecs`` (N x dim)."""
        x = np.atleast_2d(np.asarray(vecs, dtype=np.float32)) - self.mean
        if self.projection is not None:
            x = x @ self.projection
        return np.ascontiguousarray(l2n(x), dtype=np.float32)

    def centred(self, vecs: "np.ndarray | Moments") -> "Whitening":
        """This projection around the mean of the collection's raw descriptors ``vecs``
        (or of the descriptors summed in ``Moments``)."""
        m = vecs if isinstance(vecs, Moments) else Moments.of(vecs)
        return replace(self, mean=m.mean.astype(np.float32), centred_on=m.n)

    def describe(self) -> str:
        if self.kind == LEARNED:
            centre = (f"centred on the collection's {self.centred_on} images" if self.centred_on
                      else "centred on the labelled images until the collection has "
                           f"{CENTER_MIN_IMAGES}")
            return (f"learned from {self.images} labelled images ({self.source}), {self.dim} dimensions, "
                    f"shrinkage {self.shrinkage:g}, {centre}, on {self.learned_at} UTC")
        what = "centred" if self.kind == "center" else f"PCA-whitened, shrinkage {self.shrinkage:g}"
        return f"{what}, learned from {self.images} images on {self.learned_at} UTC"

    def to_json(self) -> str:
        def enc(a):
            return None if a is None else base64.b64encode(np.asarray(a, np.float32).tobytes()).decode()

        return json.dumps({"kind": self.kind, "shrinkage": self.shrinkage, "images": self.images,
                           "learned_at": self.learned_at, "dim": int(self.mean.shape[0]),
                           "out": self.dim, "source": self.source, "centred_on": self.centred_on,
                           "mean": enc(self.mean), "projection": enc(self.projection)})

    @classmethod
    def from_json(cls, text: str) -> "Whitening":
        d = json.loads(text)
        dim = int(d["dim"])

        def dec(s, shape):
            return None if s is None else np.frombuffer(base64.b64decode(s), np.float32).reshape(shape)

        return cls(d["kind"], float(d["shrinkage"]), int(d["images"]), d["learned_at"],
                   dec(d["mean"], (dim,)), dec(d["projection"], (dim, int(d.get("out", dim)))),
                   d.get("source", ""), int(d.get("centred_on", 0)))


def minimum_images(kind: str, dim: int) -> int:
    """How many images ``kind`` needs for descriptors of ``dim`` dimensions."""
    if kind not in KINDS:
        raise WhiteningError(f"unknown whitening {kind!r}; choose one of {', '.join(KINDS)}")
    return CENTER_MIN_IMAGES if kind == "center" else PCA_MIN_FACTOR * dim


class Moments:
    """Count, sum and (with ``second``) sum of outer products of raw descriptors, added
    chunk by chunk: what centring and PCA whitening learn from, in bounded memory."""

    def __init__(self, dim: int, second: bool = False):
        self.n, self.dim = 0, dim
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64) if second else None

    @classmethod
    def of(cls, vecs: np.ndarray, second: bool = False) -> "Moments":
        x = np.atleast_2d(np.asarray(vecs, dtype=np.float64))
        m = cls(x.shape[1], second)
        m.add(x)
        return m

    def add(self, vecs: np.ndarray) -> None:
        x = np.asarray(vecs, dtype=np.float64)
        self.n += len(x)
        self.sum += x.sum(axis=0)
        if self.outer is not None:
            self.outer += x.T @ x

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.n, 1)

    @property
    def cov(self) -> np.ndarray:
        mean = self.mean
        return (self.outer - self.n * np.outer(mean, mean)) / max(self.n - 1, 1)


def learn(vecs: "np.ndarray | Moments", kind: str = "center", shrinkage: float = DEFAULT_SHRINKAGE,
          learned_at: str = "") -> Whitening:
    """Learn ``kind`` whitening from the raw descriptors ``vecs`` (N x dim), or from their
    ``Moments`` (with ``second`` for PCA)."""
    m = vecs if isinstance(vecs, Moments) else Moments.of(vecs, second=kind == "pca")
    n, dim = m.n, m.dim
    need = minimum_images(kind, dim)
    if n < need:
        why = ("centring needs" if kind == "center"
               else f"PCA whitening of {dim}-dimensional descriptors needs")
        raise WhiteningError(f"{why} at least {need} images; the collection has {n}"
                             + (f"; centring needs {CENTER_MIN_IMAGES}" if kind == "pca" else ""))
    if not 0.0 <= shrinkage <= 1.0:
        raise WhiteningError(f"shrinkage {shrinkage} out of range 0..1")
    mean = m.mean
    projection = None
    if kind == "pca":
        projection = _inverse_sqrt(m.cov, shrinkage).astype(np.float32)
    return Whitening(kind, float(shrinkage if kind == "pca" else 1.0), n, learned_at,
                     mean.astype(np.float32), projection)


def _inverse_sqrt(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    """cov^(-1/2), its eigenvalues first blended with their mean by ``shrinkage``."""
    eigval, eigvec = np.linalg.eigh(cov)
    eigval = np.maximum(eigval, 0.0)
    eigval = (1.0 - shrinkage) * eigval + shrinkage * eigval.mean()
    return eigvec / np.sqrt(np.maximum(eigval, 1e-12))


def pair_count(groups: Sequence[str]) -> int:
    """Matching pairs (two images of one group) among labelled images."""
    _, sizes = np.unique(np.asarray(groups, dtype=object).astype(str), return_counts=True)
    return int((sizes * (sizes - 1) // 2).sum())


def learn_from_groups(vecs: np.ndarray, groups: Sequence[str], *, dim: int | None = None,
                      shrinkage: float = LEARNED_SHRINKAGE, learned_at: str = "",
                      name: str = "") -> Whitening:
    """Learned whitening from raw descriptors ``vecs`` (N x D) labelled with ``groups``.

    Every pair of images of one group is a matching pair; their difference
    covariance is summed in closed form per group (n * sum x x' - s s', with s
    the group's sum), never by listing pairs, so large groups cost nothing.
    ``dim`` (default: the descriptors' own) is the output's; ``name`` (the
    labelled set) is kept in the description.
    """
    x = np.asarray(vecs, dtype=np.float64)
    n, d = x.shape
    labels = np.asarray(groups, dtype=object).astype(str)
    if len(labels) != n:
        raise ValueError(f"{n} descriptors but {len(labels)} labels")
    pairs = pair_count(labels)
    if pairs < LEARNED_MIN_PAIRS:
        raise WhiteningError(f"learned whitening needs at least {LEARNED_MIN_PAIRS} matching pairs "
                             f"(two images of one group); the labelled images give {pairs}")
    dim = d if dim is None else dim
    if not 1 <= dim <= d:
        raise WhiteningError(f"learned whitening to {dim} dimensions: choose 1..{d}")
    if not 0.0 <= shrinkage <= 1.0:
        raise WhiteningError(f"shrinkage {shrinkage} out of range 0..1")
    mean = x.mean(axis=0)
    xc = x - mean
    within = np.zeros((d, d))
    for g in np.unique(labels):
        m = xc[labels == g]
        if len(m) > 1:
            s = m.sum(axis=0)
            within += len(m) * (m.T @ m) - np.outer(s, s)
    first = _inverse_sqrt(within / pairs, shrinkage)
    y = xc @ first
    eigval, eigvec = np.linalg.eigh(y.T @ y / n)
    top = eigvec[:, np.argsort(eigval)[::-1][:dim]]
    groups_n = len(np.unique(labels))
    return Whitening(LEARNED, float(shrinkage), n, learned_at, mean.astype(np.float32),
                     (first @ top).astype(np.float32),
                     f"{name + ': ' if name else ''}{groups_n} groups, {pairs} matching pairs")
