"""Geometric verification: is the query's very picture or object in a result, and where?

The global descriptor finds what looks alike; this stage checks a shortlist
of it for the same thing. The query's local features are matched against
each candidate's (indexer.local), a homography is fitted with RANSAC, and a
candidate with enough inliers is verified. The mirrored query is tried too,
for candidates the upright one did not verify, so a mirrored copy is found.

How verification and the global score combine (``rank_order``) was chosen by
measurement (bench/QUALITY.md): verified images are ordered by what their
inliers and similarity are worth together, and an unverified one keeps its
place against all but strongly verified ones, so a strong global match that
cannot be verified (a thumbnail too small for keypoints) is not pushed down by
weakly verified look-alikes.
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
# How verification and the global similarity s combine (measured in bench/QUALITY.md).
# Among verified results, each is ranked as if its similarity were 1 - (1 - s) * gap,
# where the gap left to 1 (the same picture) is GAP_AT_MIN at MIN_INLIERS and shrinks in
# proportion to the inliers (4 % at 100): many inliers say "the same picture" more
# surely than a global similarity does, so a turned copy with 400 inliers passes
# another photo of the building with 30, and of two results with like counts the
# globally closer leads. Against an unverified result, a verified one counts for at
# most a gap of MIN_GAP_LEFT, so a strong global match that cannot be verified (a
# thumbnail too small for keypoints) is not pushed down by weak look-alikes. Both rules
# commute with any rescaling of the similarities that keeps 1 in place.
GAP_AT_MIN = 0.4
MIN_GAP_LEFT = 0.15
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


def rank_order(similarities: np.ndarray, inliers: np.ndarray) -> np.ndarray:
    """The order (indices, best first) of a verified shortlist given in global order.

    Verified results (MIN_INLIERS or more) are ordered among themselves by the
    similarity their inliers are worth; each unverified one keeps its similarity
    and passes a verified result that, against it, is worth less (the gap left
    is at least MIN_GAP_LEFT). Verification never moves a result below an
    unverified one it was above. On a tie the verified result leads.
    """
    s = np.asarray(similarities, np.float64)
    n = np.asarray(inliers, np.float64)
    gap = GAP_AT_MIN * MIN_INLIERS / np.maximum(n, MIN_INLIERS)
    verified = np.flatnonzero(n >= MIN_INLIERS)
    verified = verified[np.argsort(-(1 - (1 - s[verified]) * gap[verified]), kind="stable")]
    # Worth, against unverified results: never more than a verified result above it (so
    # the verified order holds), never less than its own or a later one's similarity
    # (so nothing is lowered).
    capped = 1 - (1 - s[verified]) * np.maximum(gap[verified], MIN_GAP_LEFT)
    worth = np.maximum(np.minimum.accumulate(capped), np.maximum.accumulate(s[verified][::-1])[::-1])
    unverified = np.flatnonzero(n < MIN_INLIERS)
    keys = np.concatenate([worth, s[unverified]])
    within = np.concatenate([np.arange(len(verified)), np.arange(len(unverified))])
    kind = np.r_[np.zeros(len(verified)), np.ones(len(unverified))]
    return np.concatenate([verified, unverified])[np.lexsort((within, kind, -keys))]


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
