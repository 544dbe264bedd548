"""Fine-tune the backbone and GeM's p on labelled groups, with a contrastive loss.

The recipe's network, cut at its layer, is trained so that two pictures of one
group come closer and pictures of different groups that look alike move apart
(Radenović, Tolias and Chum, TPAMI 2018). Batches are mined with the current
descriptors: each gathers a group and the groups nearest to it, the hard
negatives, two pictures of each; every pair in the batch counts. The
descriptors computed while training mine the next epoch.

Batch-norm statistics stay frozen (a batch of a few pictures would wreck
them): the network runs in eval mode with gradients on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

# Chosen on held-out halves of the shared sets (bench/QUALITY.md, "Tuning").
EPOCHS = 5
LEARNING_RATE = 1e-4
P_RATE = 100  # GeM p's learning rate, relative to the weights
MARGIN = 0.7  # negatives closer than this (Euclidean, unit vectors) are pushed apart
TRAIN_SIZE = 320  # longest side of the training pictures
GROUPS_PER_BATCH = 8
PER_GROUP = 2
MIN_GROUPS = 4

Progress = Callable[[int, int, float], None]  # (step, steps, loss)


class FinetuneError(ValueError):
    """Fine-tuning cannot run on this labelled set or recipe; str() says why."""


@dataclass
class Trained:
    state: dict  # the whole network's weights, in the layout indexer.network reads
    gem_p: float
    epochs: int
    losses: list[float]  # mean loss of each epoch


def check_trainable(recipe, groups: Sequence[str]) -> None:
    """Refuse what fine-tuning cannot do, in one line."""
    if recipe.pooling != "gem":
        raise FinetuneError(f"fine-tuning learns GeM's p; this database pools with {recipe.pooling}")
    names, sizes = np.unique(np.asarray(groups, dtype=object).astype(str), return_counts=True)
    if len(names) < MIN_GROUPS or not (sizes > 1).any():
        raise FinetuneError(f"fine-tuning needs at least {MIN_GROUPS} groups, some with two images or "
                            f"more; the labelled images have {len(names)} groups, "
                            f"{int((sizes > 1).sum())} with two or more")


def mine(descriptors: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of image indices for one epoch (about as many pictures as the set holds): each
    from a seed group, drawn in turn, and the groups nearest to it, PER_GROUP pictures each."""
    names = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in names}
    means = np.stack([descriptors[members[g]].mean(axis=0) for g in names])
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    sims = means @ means.T
    np.fill_diagonal(sims, -np.inf)
    seeds = [i for i in rng.permutation(len(names)) if len(members[names[i]]) > 1]
    per_batch = GROUPS_PER_BATCH * PER_GROUP
    batches = []
    for b in range(max(1, round(len(groups) / per_batch))):
        seed = seeds[b % len(seeds)]
        near = np.argsort(-sims[seed])[: GROUPS_PER_BATCH - 1]
        picked = []
        for g in [seed, *near]:
            m = members[names[g]]
            picked.extend(rng.choice(m, size=min(PER_GROUP, len(m)), replace=False))
        batches.append(np.array(picked))
    return batches


def contrastive(vecs, labels: np.ndarray, margin: float = MARGIN):
    """Mean contrastive loss over every pair of rows: matching pairs pulled together,
    non-matching ones within ``margin`` pushed apart."""
    import torch

    same = torch.from_numpy(labels[:, None] == labels[None, :])
    upper = torch.triu(torch.ones_like(same), diagonal=1)
    d = torch.cdist(vecs, vecs).clamp(min=1e-9)
    pos = same & upper
    neg = ~same & upper
    loss = (d[pos] ** 2).sum() + (torch.relu(margin - d[neg]) ** 2).sum()
    return 0.5 * loss / max(int(upper.sum()), 1)


def describe(net, p, pictures: list[np.ndarray]):
    """Descriptors of pictures (H x W x 3 uint8), as the encoder makes them, with gradients.

    Pictures of one shape go through the network together.
    """
    import torch
    import torch.nn.functional as F

    by_shape: dict[tuple, list[int]] = {}
    for i, px in enumerate(pictures):
        by_shape.setdefault(px.shape, []).append(i)
    out: list = [None] * len(pictures)
    for rows in by_shape.values():
        x = torch.from_numpy(np.stack([pictures[i] for i in rows]).transpose(0, 3, 1, 2).astype(np.float32))
        fmaps = net(x.to(p.device))
        fmaps = fmaps if isinstance(fmaps, tuple) else (fmaps,)
        parts = [F.normalize(f.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p), dim=1) for f in fmaps]
        vecs = F.normalize(torch.cat(parts, dim=1), dim=1) if len(parts) > 1 else parts[0]
        for j, i in enumerate(rows):
            out[i] = vecs[j]
    return torch.stack(out)


def train(net, gem_p: float, pictures: list[np.ndarray], groups: Sequence[str], descriptors: np.ndarray, *,
          epochs: int = EPOCHS, learning_rate: float = LEARNING_RATE, device: str = "cpu",
          progress: Progress | None = None, seed: int = 0) -> Trained:
    """Fine-tune ``net`` (indexer.network.build_trunk's) and p on ``pictures`` grouped by ``groups``.

    ``descriptors`` (the pictures' current ones) mine the first epoch's batches.
    """
    import torch

    from .network import whole_state

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    labels = np.asarray(groups, dtype=object).astype(str)
    net = net.to(device).eval()
    weights = list(net.parameters())
    for w in weights:
        w.requires_grad_(True)
    p = torch.nn.Parameter(torch.tensor(float(gem_p), device=device))
    # p is one number among millions: it gets a larger step, or it would not move in a few epochs.
    opt = torch.optim.Adam([{"params": weights, "weight_decay": 1e-6},
                            {"params": [p], "lr": learning_rate * P_RATE}], lr=learning_rate)
    current = np.array(descriptors, dtype=np.float32, copy=True)
    losses: list[float] = []
    batches = mine(current, labels, rng)
    steps, step = epochs * len(batches), 0  # every epoch has as many batches
    for epoch in range(epochs):
        if epoch:
            batches = mine(current, labels, rng)
        total = 0.0
        for batch in batches:
            vecs = describe(net, p, [pictures[i] for i in batch])
            loss = contrastive(vecs.cpu(), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                p.clamp_(min=1.0)
            current[batch] = vecs.detach().cpu().numpy()
            value = float(loss.detach())
            total += value
            step += 1
            if progress:
                progress(step, steps, value)
        losses.append(total / max(len(batches), 1))
        log.info("epoch %d/%d: loss %.4f, GeM p %.3f", epoch + 1, epochs, losses[-1], float(p.detach()))
    for w in weights:
        w.requires_grad_(False)
    return Trained(whole_state(net), round(float(p.detach()), 4), epochs, losses)


def training_shape(width: int, height: int) -> tuple[int, int]:
    """(height, width) a picture is trained at: one of three shapes, so that a batch runs as one
    (each new input shape costs the CPU backend a slow first pass)."""
    if width >= 1.15 * height:
        return TRAIN_SIZE * 3 // 4, TRAIN_SIZE
    if height >= 1.15 * width:
        return TRAIN_SIZE, TRAIN_SIZE * 3 // 4
    return TRAIN_SIZE * 9 // 10, TRAIN_SIZE * 9 // 10


def pictures(paths: Sequence[str], max_pixels: int) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
    """The training pictures (upright RGB at their training_shape), and (path, reason) of those
    that cannot be read; a picture that failed is None in the list."""
    from PIL import Image

    from .decode import DEFAULT_DECODE_TIMEOUT, DecodeError, open_image

    out, failures = [], []
    for path in paths:
        try:
            px = open_image(path, TRAIN_SIZE, max_pixels, timeout=DEFAULT_DECODE_TIMEOUT).pixels
        except DecodeError as exc:
            out.append(None)
            failures.append((path, str(exc)))
            continue
        h, w = training_shape(px.shape[1], px.shape[0])
        out.append(np.asarray(Image.fromarray(px).resize((w, h), Image.Resampling.BICUBIC)))
    return out, failures


def save(state: dict, model: str) -> tuple[str, str]:
    """Write fine-tuned weights into the weights folder, atomically; (path, sha256)."""
    import os

    import torch

    from .backbone import tuned_weights_file, weights_dir
    from .scan import file_sha256

    folder = weights_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tuning-{os.getpid()}.tmp"
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        sha = file_sha256(tmp)
        path = tuned_weights_file(model, sha)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(path), sha
