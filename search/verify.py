"""Geometric verification: is the query's very picture or object in a result, and where?

The global descriptor finds what looks alike; this stage checks a shortlist
of it for the same thing. The query's local features are matched against
each candidate's (indexer.local), a homography is fitted with RANSAC, and a
candidate with enough inliers is verified. The mirrored query is tried too,
for candidates the upright one did not verify, so a mirrored copy is found.

How verification and the global score combine (``rank_scores``) was chosen by
measurement (bench/QUALITY.md): a verified image ranks as if its similarity
were what its inliers are worth, if that is higher, and an unverified one keeps
its place, so a strong global match that cannot be verified (a thumbnail too
small for keypoints) is not pushed down by weakly verified look-alikes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from indexer import local

log = logging.getLogger(__name__)

# How many of the global results are verified by default (``--verify``).
DEFAULT_VERIFY = 100
# Inliers from which a match counts as verified: fewer occur by chance between
# different pictures (calibrated on pairs of unrelated images, bench/QUALITY.md).
MIN_INLIERS = 15
# A verified match ranks at least halfway from the shortlist's median similarity to 1
# (the same picture) at MIN_INLIERS, and as 1 at CAP_INLIERS. Relative to the
# shortlist, so that it means the same with or without centring, for any model.
VERIFIED_FLOOR = 0.5
CAP_INLIERS = 60
# The mirrored query is matched against this many of the best global results that
# the upright one did not verify: a mirrored copy looks the same to the global
# descriptor, so it is near the top.
MIRROR_DEPTH = 20


@dataclass(frozen=True)
class Verified:
    """A candidate in which the query was found."""

    inliers: int
    # The query's outline (its four corners, in the order top-left, top-right,
    # bottom-right, bottom-left of the query) in the candidate's upright pixels.
    box: tuple[tuple[float, float], ...]
    mirrored: bool


def rank_scores(similarities: np.ndarray, inliers: np.ndarray) -> np.ndarray:
    """The scores a verified shortlist (in global order) is ranked by.

    An unverified result keeps its global similarity; a verified one ranks as
    what its inliers are worth, if that is higher. Verification never lowers a
    result, so a strong global match that cannot be verified (a thumbnail too
    small for keypoints) stays above weakly verified look-alikes.
    """
    s = np.asarray(similarities, np.float64)
    n = np.asarray(inliers, np.float64)
    if not len(s):
        return s
    median = float(np.median(s))
    share = VERIFIED_FLOOR + (1 - VERIFIED_FLOOR) * np.minimum(n, CAP_INLIERS) / CAP_INLIERS
    worth = median + (1 - median) * share
    return np.where(n >= MIN_INLIERS, np.maximum(s, worth), s)


def verify(query: local.Keypoints, candidates: Mapping[int, bytes],
           sizes: Mapping[int, tuple[int, int]], mirror: bool = True) -> dict[int, Verified]:
    """The candidates (id -> stored features, best global match first) in which the query
    is found, with the box where.

    ``sizes`` gives each candidate's upright size in pixels, to express the box
    in. The mirrored query is tried on the first MIRROR_DEPTH candidates left
    unverified. Stored features that cannot be read are skipped with a warning
    (``check`` finds and mends them).
    """
    ids, feats = [], []
    for i, blob in candidates.items():
        try:
            feats.append(local.decode(blob))
            ids.append(i)
        except local.FeaturesError as exc:
            log.warning("image id %d: %s; it is not verified ('lookalike check --repair' mends it)",
                        i, exc)
    found: dict[int, Verified] = {}
    todo = list(range(len(ids)))
    for mirrored, view in enumerate(local.views(query, mirror=mirror)):
        if mirrored:
            todo = todo[:MIRROR_DEPTH]
        left = []
        for j, pairs in zip(todo, local.tentative(view, [feats[j] for j in todo])):
            v = local.verify(view, feats[j], pairs, MIN_INLIERS)
            if v is None:
                left.append(j)
            else:
                found[ids[j]] = Verified(v.inliers, _box(v.homography, view, feats[j], sizes[ids[j]],
                                                         bool(mirrored)), bool(mirrored))
        todo = left
    return found


def _box(h: np.ndarray, query: local.Features, candidate: local.Features,
         size: tuple[int, int], mirrored: bool) -> tuple[tuple[float, float], ...]:
    corners = local.outline(h, query.width, query.height)
    if mirrored:  # the mirrored view's corners, in the order of the query's own
        corners = corners[[1, 0, 3, 2]]
    scale = np.array([size[0] / candidate.width, size[1] / candidate.height])
    return tuple((round(float(x), 1), round(float(y), 1)) for x, y in corners * scale)
