"""Global pooling of a convolutional feature map into one descriptor.

Pure functions on (N, C, H, W) tensors, plus a small module that applies
one of them and L2-normalises, so that pooling can travel inside an exported
ONNX graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .recipe import POOLINGS


def mac(x: torch.Tensor) -> torch.Tensor:
    """Maximum activation of convolutions: the max over each channel."""
    return torch.amax(x, dim=(2, 3))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """Sum-pooled convolutional features (here the mean, same after L2)."""
    return torch.mean(x, dim=(2, 3))


def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean: p=1 is SPoC, p -> infinity is MAC."""
    return torch.mean(x.clamp(min=eps).pow(p), dim=(2, 3)).pow(1.0 / p)


def rmac(x: torch.Tensor, levels: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """Regional MAC (Tolias et al.): sum of L2-normalised MACs of square regions.

    Regions are squares of side 2*min(H, W)/(l+1) on a grid with about 40 %
    overlap, for l = 1..levels, plus the whole map. Shapes are static per
    feature-map size, so this exports to ONNX for each input size traced.
    """
    h, w = int(x.shape[2]), int(x.shape[3])
    out = F.normalize(mac(x), dim=1, eps=eps)
    for level in range(1, levels + 1):
        side = max(1, int(2 * min(h, w) / (level + 1)))
        for top in _starts(h, side, level):
            for left in _starts(w, side, level):
                region = x[:, :, top:top + side, left:left + side]
                out = out + F.normalize(mac(region), dim=1, eps=eps)
    return out


def _starts(length: int, side: int, level: int) -> list[int]:
    count = level + (1 if length > side * (level + 0.5) else 0)
    if count <= 1 or length <= side:
        return [max(0, (length - side) // 2)]
    step = (length - side) / (count - 1)
    return [int(round(i * step)) for i in range(count)]


class Pool(nn.Module):
    """Pool a feature map and L2-normalise the result."""

    def __init__(self, method: str, p: float = 3.0):
        super().__init__()
        if method not in POOLINGS:
            raise ValueError(f"unknown pooling {method!r}; choose one of {', '.join(POOLINGS)}")
        self.method, self.p = method, float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.method == "gem":
            v = gem(x, self.p)
        elif self.method == "mac":
            v = mac(x)
        elif self.method == "spoc":
            v = spoc(x)
        else:
            v = rmac(x)
        return F.normalize(v, dim=1)
