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
MIN_INLIERS = 10
# Verification closes a share of the gap between a result's global similarity and 1
# (the same picture): SHARE_AT_MIN at MIN_INLIERS, growing to SHARE_AT_CAP at CAP_INLIERS.
# Less than all of it, so that of two verified results the globally closer one (a
# copy, beside another photo of the same building) keeps the lead; and the same
# whatever the similarities' scale (with or without centring, any model), since the
# rule commutes with any rescaling that keeps 1 in place.
SHARE_AT_MIN = 0.6
SHARE_AT_CAP = 0.85
CAP_INLIERS = 60
# The global matches of each turned view of the query (90, 180, 270 degrees) that are
# verified besides the upright query's shortlist.
TURNED_NOMINEES = 10
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
    """The scores a verified shortlist is ranked by.

    An unverified result keeps its global similarity; a verified one moves
    towards 1 by a share that grows with its inliers. Verification never lowers
    a result, and few inliers do not lift a weak look-alike above a strong
    global match that could not be verified (a thumbnail too small for keypoints).
    """
    s = np.asarray(similarities, np.float64)
    n = np.asarray(inliers, np.float64)
    share = SHARE_AT_MIN + (SHARE_AT_CAP - SHARE_AT_MIN) * (
        np.clip(n, MIN_INLIERS, CAP_INLIERS) - MIN_INLIERS) / (CAP_INLIERS - MIN_INLIERS)
    return np.where(n >= MIN_INLIERS, s + (1 - s) * share, s)


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
