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

Pure NumPy; the database stores the learned arrays (Store.whitening).
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import numpy as np

from .pooling import l2n

KINDS = ("center", "pca")
CENTER_MIN_IMAGES = 50
PCA_MIN_FACTOR = 2
DEFAULT_SHRINKAGE = 0.5


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
    projection: np.ndarray | None = None  # dim x dim, None for ``center``

    def apply(self, vecs: np.ndarray) -> np.ndarray:
        """Whitened, L2-normalised float32 rows for raw descriptors ``vecs`` (N x dim)."""
        x = np.atleast_2d(np.asarray(vecs, dtype=np.float32)) - self.mean
        if self.projection is not None:
            x = x @ self.projection
        return np.ascontiguousarray(l2n(x), dtype=np.float32)

    def describe(self) -> str:
        what = "centred" if self.kind == "center" else f"PCA-whitened, shrinkage {self.shrinkage:g}"
        return f"{what}, learned from {self.images} images on {self.learned_at} UTC"

    def to_json(self) -> str:
        def enc(a):
            return None if a is None else base64.b64encode(np.asarray(a, np.float32).tobytes()).decode()

        return json.dumps({"kind": self.kind, "shrinkage": self.shrinkage, "images": self.images,
                           "learned_at": self.learned_at, "dim": int(self.mean.shape[0]),
                           "mean": enc(self.mean), "projection": enc(self.projection)})

    @classmethod
    def from_json(cls, text: str) -> "Whitening":
        d = json.loads(text)
        dim = int(d["dim"])

        def dec(s, shape):
            return None if s is None else np.frombuffer(base64.b64decode(s), np.float32).reshape(shape)

        return cls(d["kind"], float(d["shrinkage"]), int(d["images"]), d["learned_at"],
                   dec(d["mean"], (dim,)), dec(d["projection"], (dim, dim)))


def minimum_images(kind: str, dim: int) -> int:
    """How many images ``kind`` needs for descriptors of ``dim`` dimensions."""
    if kind not in KINDS:
        raise WhiteningError(f"unknown whitening {kind!r}; choose one of {', '.join(KINDS)}")
    return CENTER_MIN_IMAGES if kind == "center" else PCA_MIN_FACTOR * dim


def learn(vecs: np.ndarray, kind: str = "center", shrinkage: float = DEFAULT_SHRINKAGE,
          learned_at: str = "") -> Whitening:
    """Learn ``kind`` whitening from the raw descriptors ``vecs`` (N x dim)."""
    x = np.asarray(vecs, dtype=np.float64)
    n, dim = x.shape
    need = minimum_images(kind, dim)
    if n < need:
        why = ("centring needs" if kind == "center"
               else f"PCA whitening of {dim}-dimensional descriptors needs")
        raise WhiteningError(f"{why} at least {need} images; the collection has {n}"
                             + (f"; centring needs {CENTER_MIN_IMAGES}" if kind == "pca" else ""))
    if not 0.0 <= shrinkage <= 1.0:
        raise WhiteningError(f"shrinkage {shrinkage} out of range 0..1")
    mean = x.mean(axis=0)
    projection = None
    if kind == "pca":
        eigval, eigvec = np.linalg.eigh(np.cov((x - mean).T))
        eigval = np.maximum(eigval, 0.0)
        eigval = (1.0 - shrinkage) * eigval + shrinkage * eigval.mean()
        projection = (eigvec / np.sqrt(np.maximum(eigval, 1e-12))).astype(np.float32)
    return Whitening(kind, float(shrinkage if kind == "pca" else 1.0), n, learned_at,
                     mean.astype(np.float32), projection)
