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
# Fewer groups than this are learned by heart: trained on 2 Paris landmarks, the other 3
# lost 0.18 of mAP (bench/QUALITY.md). Whitening (--method whiten) is safe there.
MIN_GROUPS = 10
VALIDATION_SHARE = 0.2  # of the groups, held out to keep the best epoch (or none)

Progress = Callable[[int, int, float], None]  # (step, steps, loss)


class FinetuneError(ValueError):
    """Fine-tuning cannot run on this labelled set or recipe; str() says why."""


@dataclass
class Trained:
    state: dict  # the whole network's weights, in the layout indexer.network reads
    gem_p: float
    epochs: int  # trained on all the groups: the count that ranked the held-out ones best
    losses: list[float]  # mean training loss of each of those epochs
    validation: list[float]  # held-out groups' mAP before training and after each trial epoch


def split(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training pictures and of the held-out ones (VALIDATION_SHARE of the
    groups of two or more, at least two groups)."""
    names, sizes = np.unique(labels, return_counts=True)
    pairs = rng.permutation(names[sizes > 1])
    held = set(pairs[: max(2, round(VALIDATION_SHARE * len(names)))])
    out = np.array([g in held for g in labels])
    return np.flatnonzero(~out), np.flatnonzero(out)


def held_out_map(net, p, pictures: list[np.ndarray], labels: np.ndarray) -> float:
    """mAP of the held-out pictures among themselves, with the network as it is now."""
    import torch

    from .groundtruth import leave_one_out_map

    with torch.no_grad():
        vecs = np.concatenate([describe(net, p, pictures[i:i + 16]).cpu().numpy()
                               for i in range(0, len(pictures), 16)])
    return leave_one_out_map(vecs, labels)


def check_trainable(recipe, groups: Sequence[str]) -> None:
    """Refuse what fine-tuning cannot do, in one line."""
    if recipe.pooling != "gem":
        raise FinetuneError(f"fine-tuning learns GeM's p; this database pools with {recipe.pooling}")
    names, sizes = np.unique(np.asarray(groups, dtype=object).astype(str), return_counts=True)
    if (sizes > 1).sum() < MIN_GROUPS:
        raise FinetuneError(f"fine-tuning needs at least {MIN_GROUPS} groups of two images or more "
                            f"(fewer are learned by heart); the labelled images have "
                            f"{int((sizes > 1).sum())}: use --method whiten")


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


def train(make_net, gem_p: float, pictures: list[np.ndarray], groups: Sequence[str], descriptors: np.ndarray,
          *, epochs: int = EPOCHS, learning_rate: float = LEARNING_RATE, device: str = "cpu",
          progress: Progress | None = None, seed: int = 0) -> Trained:
    """Fine-tune the network ``make_net()`` makes (indexer.network.build_trunk's) and p on
    ``pictures`` grouped by ``groups``; ``descriptors`` (their current ones) mine the first batches.

    First a share of the groups is held out and the epoch that ranks them best
    is found (FinetuneError when every epoch ranks them worse than before);
    then the network is trained afresh on all the groups for that many epochs.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(groups, dtype=object).astype(str)
    fit, held = split(labels, rng)
    trial = _Training(make_net(), gem_p, learning_rate, device, seed)
    held_pictures = [pictures[i] for i in held]
    validation = [trial.held_out_map(held_pictures, labels[held])]
    epoch = trial.epochs([pictures[i] for i in fit], labels[fit], descriptors[fit], epochs, progress)
    for n in range(1, epochs + 1):
        epoch.run()
        validation.append(trial.held_out_map(held_pictures, labels[held]))
        log.info("epoch %d/%d on %d of the groups: loss %.4f, held-out mAP %.3f", n, epochs,
                 len(set(labels[fit])), epoch.losses[-1], validation[-1])
    # Ties go to the later epoch: as good on unseen groups, better on the labelled ones.
    best = max(range(1, epochs + 1), key=lambda n: (validation[n], n))
    if validation[best] < validation[0]:
        raise FinetuneError(f"fine-tuning ranked the {len(set(labels[held]))} held-out groups worse "
                            f"(mAP {validation[0]:.3f} before, at best {validation[best]:.3f} after): "
                            "nothing was changed; --method whiten may help")
    final = _Training(make_net(), gem_p, learning_rate, device, seed)
    epoch = final.epochs(pictures, labels, descriptors, best, progress)
    for n in range(1, best + 1):
        epoch.run()
        log.info("epoch %d/%d on all the groups: loss %.4f", n, best, epoch.losses[-1])
    return Trained(final.state(), final.gem_p, best, epoch.losses, validation)


class _Training:
    """A network and GeM's p being trained, with their optimiser."""

    def __init__(self, net, gem_p: float, learning_rate: float, device: str, seed: int):
        import torch

        torch.manual_seed(seed)
        self.net = net.to(device).eval()
        self.p = torch.nn.Parameter(torch.tensor(float(gem_p), device=device))
        # p is one number among millions: it gets a larger step, or it would not move in a few epochs.
        self.opt = torch.optim.Adam([{"params": list(self.net.parameters()), "weight_decay": 1e-6},
                                     {"params": [self.p], "lr": learning_rate * P_RATE}], lr=learning_rate)
        self.seed = seed

    def held_out_map(self, pictures: list[np.ndarray], labels: np.ndarray) -> float:
        return held_out_map(self.net, self.p, pictures, labels)

    def epochs(self, pictures, labels, descriptors, epochs: int, progress) -> "_Epoch":
        return _Epoch(self, pictures, labels, descriptors, np.random.default_rng(self.seed + 1), epochs, progress)

    @property
    def gem_p(self) -> float:
        return round(float(self.p.detach()), 4)

    def state(self) -> dict:
        from .network import whole_state

        return whole_state(self.net)


class _Epoch:
    """One pass of training over about as many pictures as the set holds, mined anew each time."""

    def __init__(self, training: _Training, pictures, labels, descriptors, rng, epochs: int, progress):
        self.t, self.pictures, self.labels = training, pictures, labels
        self.current = np.array(descriptors, dtype=np.float32, copy=True)
        self.rng, self.progress = rng, progress
        self.steps = epochs * len(mine(self.current, labels, np.random.default_rng(0)))
        self.step = 0
        self.losses: list[float] = []

    def run(self) -> None:
        import torch

        net, p, opt = self.t.net, self.t.p, self.t.opt
        batches = mine(self.current, self.labels, self.rng)
        total = 0.0
        for w in net.parameters():
            w.requires_grad_(True)
        try:
            for batch in batches:
                vecs = describe(net, p, [self.pictures[i] for i in batch])
                loss = contrastive(vecs.cpu(), self.labels[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    p.clamp_(min=1.0)
                self.current[batch] = vecs.detach().cpu().numpy()
                total += float(loss.detach())
                self.step += 1
                if self.progress:
                    self.progress(self.step, self.steps, float(loss.detach()))
        finally:
            for w in net.parameters():
                w.requires_grad_(False)
        self.losses.append(total / max(len(batches), 1))


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
