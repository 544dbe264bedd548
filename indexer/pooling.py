"""Global pooling of a convolutional feature map into one descriptor.

Small pure functions on (N, C, H, W) float arrays. They are NumPy, not
torch, so that a query on the CPU (ONNX Runtime) never has to import torch.
"""
from __future__ import annotations

import numpy as np

from .recipe import POOLINGS

EPS = 1e-6


def mac(x: np.ndarray) -> np.ndarray:
    """Maximum activation of convolutions: the max over each channel."""
    return x.max(axis=(2, 3))


def spoc(x: np.ndarray) -> np.ndarray:
    """Sum-pooled convolutional features (here the mean, the same after L2)."""
    return x.mean(axis=(2, 3))


def gem(x: np.ndarray, p: float = 3.0) -> np.ndarray:
    """Generalised mean: p = 1 is SPoC, p -> infinity is MAC."""
    x = np.maximum(x, EPS)
    # Scaled by each channel's maximum so that x**p cannot overflow for large p.
    top = x.max(axis=(2, 3), keepdims=True)
    return top[:, :, 0, 0] * np.power(np.power(x / top, p).mean(axis=(2, 3)), 1.0 / p)


def l2n(v: np.ndarray) -> np.ndarray:
    """Rows of ``v`` scaled to unit length (a zero row stays zero)."""
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), EPS)


def rmac(x: np.ndarray, levels: int = 3) -> np.ndarray:
    """Regional MAC (Tolias et al.): the sum of L2-normalised MACs of square regions.

    Regions are squares of side 2*min(H, W)/(l+1) on a grid with about 40 %
    overlap, for l = 1..levels, plus the whole map.
    """
    h, w = x.shape[2], x.shape[3]
    out = l2n(mac(x))
    for level in range(1, levels + 1):
        side = max(1, int(2 * min(h, w) / (level + 1)))
        for top in _starts(h, side, level):
            for left in _starts(w, side, level):
                out = out + l2n(mac(x[:, :, top:top + side, left:left + side]))
    return out


def _starts(length: int, side: int, level: int) -> list[int]:
    count = level + (1 if length > side * (level + 0.5) else 0)
    if count <= 1 or length <= side:
        return [max(0, (length - side) // 2)]
    step = (length - side) / (count - 1)
    return [int(round(i * step)) for i in range(count)]


def pool(x: np.ndarray, method: str, p: float = 3.0) -> np.ndarray:
    """Pool a feature map with ``method`` and L2-normalise: float32 N x C."""
    if method not in POOLINGS:
        raise ValueError(f"unknown pooling {method!r}; choose one of {', '.join(POOLINGS)}")
    x = np.asarray(x, dtype=np.float32)
    if method == "gem":
        v = gem(x, p)
    elif method == "mac":
        v = mac(x)
    elif method == "spoc":
        v = spoc(x)
    else:
        v = rmac(x)
    return l2n(v).astype(np.float32)
