"""Which indexed images are the same picture? Groups of exact and near duplicates.

- Exact: identical bytes (the SHA-256 stored for each file).
- Near: the same picture after something was done to the file: resized,
  recompressed, cropped a little, recoloured or made grey, turned.

Candidates come from the vector index: each image's NEIGHBOURS nearest images
whose similarity reaches the threshold, found by FAISS in batches (never a
loop over pairs). Another shot of the same scene can be as similar as a grey
or turned copy, so when the database holds local features a candidate counts
only if its keypoints land on the other image's under one affine map, tightly
and over much of the picture (``indexer.local.correspond``): what an edit of
the file does, and a second shot, with its shift of viewpoint, does not.
Without local features the similarity alone decides, at a stricter threshold.

Confirmed pairs are joined into groups, with a guard against chaining: every
member must be a confirmed duplicate of the group's keeper, and those that are
not make groups of their own. The keeper suggested is the image with the most
pixels, then the largest file, then the oldest (modification time), then the
first indexed. Nothing here deletes or moves a file.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from indexer import local
from indexer.decode import DecodeError, open_image

if TYPE_CHECKING:
    from indexer.store import ImageRecord

    from .searcher import Folders, Searcher

log = logging.getLogger(__name__)

# Nearest images examined per image: a grey, cropped or resized copy is among its
# original's first few (turned ones come from the visual words); more cost time, and on
# the sets measured found nothing more but 10 % thumbnails (bench/DUPLICATES.md).
NEIGHBOURS = 5
# Similarity a pair needs, when local features confirm each pair: none to speak of, since
# the checks keep precision (bench/DUPLICATES.md), and a turned copy's can be as low as 0.1.
DEFAULT_THRESHOLD = 0.0
# Candidates found by keypoints too: each image's nearest by visual words
# (indexer.local.word_counts), from this likeness up. A turned copy keeps its keypoints,
# not its global descriptor.
WORD_NEIGHBOURS = 3
MIN_WORD_SIMILARITY = 0.5
# Images whose descriptors the visual words are learned from.
VOCABULARY_IMAGES = 400
# Without local features the pixels are compared frame to frame (resized, recompressed,
# recoloured copies; not crops or turns), for pairs this similar (bench/DUPLICATES.md).
GLOBAL_ONLY_THRESHOLD = 0.5
# What a confirmed pair must show (indexer.local.Correspondence), measured in
# bench/DUPLICATES.md on edited copies and on other shots of the same landmarks and covers.
MIN_INLIERS = 10
MIN_SHARE = 0.05
MIN_TIGHT = 0.6
MAX_SCALE_RATIO = 2.0
# Then the pixels (indexer.local.PixelMatch): each picture covers half the other at least
# (a slight crop keeps far more), and every textured part agrees. Two frames of a burst
# agree on the background, not where the subject moved.
MIN_OVERLAP = 0.5
MIN_AGREEMENT = 0.7
# Pixels compared: the longest side, grey (local.compare_pixels).
GREY_SIZE = 256
# Images whose local features and small grey pictures are kept while pairs are checked
# (some 70 KB and 20 KB each), and candidate pairs read at a time.
CACHE = 4096  # at least twice PAIR_BATCH: a batch of pairs must fit
PAIR_BATCH = 1000
BATCH = 2048

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Member:
    """One image of a group, with its likeness to the group's keeper."""

    id: int
    path: str
    similarity: float  # cosine to the keeper's descriptor (1.0: the keeper, or the same bytes)
    inliers: int  # keypoints the affine map carries onto the keeper's (0: not checked)
    width: int
    height: int
    bytes: int
    mtime: str  # ISO 8601, UTC
    sha256: str | None = None

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "similarity": round(self.similarity, 4),
                "inliers": self.inliers, "width": self.width, "height": self.height,
                "bytes": self.bytes, "mtime": self.mtime}


@dataclass(frozen=True)
class Group:
    """Images that are the same picture; the suggested keeper first."""

    kind: str  # "exact": every member has the same bytes; else "near"
    members: tuple[Member, ...]

    @property
    def keeper(self) -> Member:
        return self.members[0]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "keeper": self.keeper.path,
                "members": [m.to_dict() for m in self.members]}


def find(searcher: "Searcher", *, threshold: float | None = None, under: "Folders" = None,
         exact_only: bool = False, progress: Progress | None = None) -> list[Group]:
    """Groups of duplicates among the indexed images (those under ``under``, if given),
    the largest first. ``threshold``: the similarity a near pair needs (default:
    DEFAULT_THRESHOLD with local features, GLOBAL_ONLY_THRESHOLD without)."""
    verified = searcher.recipe.has_local and searcher.recipe.local_codec == local.codec()
    if threshold is None:
        threshold = DEFAULT_THRESHOLD if verified else GLOBAL_ONLY_THRESHOLD
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie between -1 and 1, not {threshold:g}")
    allowed = searcher.ids_under(under)
    store = searcher.store
    same = store.same_bytes(allowed)
    edges: dict[tuple[int, int], tuple[float, int]] = {
        (min(g), i): (1.0, 0) for g in same for i in g[1:]}
    checker = _Checker(searcher, verified, threshold)
    if not exact_only:
        index = searcher.index
        ids = index.ids()
        if allowed is not None:  # the filter may name failed files, which have no vector
            ids = np.intersect1d(ids, allowed)
        twin = {i: min(g) for g in same for i in g}
        ids = np.sort(ids)
        pairs = _candidates(index, ids, allowed, threshold, twin, progress)
        if verified:
            found = _word_candidates(searcher, ids, twin, set(pairs), progress)
            pairs.update((pair, sim) for pair, sim in found.items() if sim >= threshold)
        edges.update(checker.confirm_all(pairs, progress))
    records = store.records({i for pair in edges for i in pair})
    groups = [g for c in _components(edges) for g in _split(c, edges, records, checker)]
    return sorted(groups, key=lambda g: (-len(g.members), g.keeper.path))


def _candidates(index, ids: np.ndarray, allowed: np.ndarray | None, threshold: float,
                twin: dict[int, int], progress: Progress | None) -> dict[tuple[int, int], float]:
    """Pairs (a < b) of images each other's near neighbours, with their cosine; a file with
    the same bytes as another stands for it (its pairs are its twin's)."""
    out: dict[tuple[int, int], float] = {}
    for done, (chunk, sims, nbrs) in enumerate(index.neighbours(ids, NEIGHBOURS, allowed, BATCH)):
        for i, srow, nrow in zip(chunk, sims, nbrs):
            for s, j in zip(srow, nrow):
                key = _pair(twin, i, j)
                if key is not None and s >= threshold and out.get(key, -2.0) < s:
                    out[key] = float(s)
        if progress:
            progress("neighbours", min(len(ids), (done + 1) * BATCH), len(ids))
    return out


def _word_candidates(searcher: "Searcher", ids: np.ndarray, twin: dict[int, int], known: set,
                     progress: Progress | None) -> dict[tuple[int, int], float]:
    """Pairs (a < b) that the global neighbours missed, of images each other's nearest by
    their keypoints' visual words (a turned or recoloured copy), with their cosine."""
    from indexer.vectors import nearest_rows

    if len(ids) < 2:
        return {}
    bags = _bags(searcher.store, ids, progress)
    sims, rows = nearest_rows(bags, WORD_NEIGHBOURS + 1)
    found = set()
    for r, (srow, nrow) in enumerate(zip(sims, rows)):
        for s, j in zip(srow, nrow):
            key = _pair(twin, ids[r], ids[j] if j >= 0 else -1)
            if key is not None and s >= MIN_WORD_SIMILARITY and key not in known:
                found.add(key)
    return _similarities(searcher.index, found)


def _pair(twin: dict[int, int], i, j) -> tuple[int, int] | None:
    """Images ``i`` and ``j`` as a candidate pair (a < b), each file with the same bytes as
    another standing for it; None for no neighbour (-1) or the image with itself."""
    a, b = twin.get(int(i), int(i)), twin.get(int(j), int(j))
    if j < 0 or a == b:
        return None
    return (a, b) if a < b else (b, a)


def _bags(store, ids: np.ndarray, progress: Progress | None) -> np.ndarray:
    """Each image's keypoints counted by visual word (learned from a sample of the
    collection), weighted as tf-idf with square roots, unit length: len(ids) x words."""
    rng = np.random.default_rng(0)
    sample = rng.choice(ids, min(len(ids), VOCABULARY_IMAGES), replace=False)
    feats = [f for f in _read_features(store, sample).values() if f is not None and len(f)]
    if not feats:
        return np.zeros((len(ids), 1), np.float32)
    words = local.vocabulary(np.concatenate([f.desc for f in feats]))
    counts = np.zeros((len(ids), len(words)), np.float32)
    for start in range(0, len(ids), PAIR_BATCH):
        chunk = ids[start:start + PAIR_BATCH]
        read = _read_features(store, chunk)
        for r, i in enumerate(chunk, start):
            if read[int(i)] is not None:
                counts[r] = local.word_counts(read[int(i)], words)
        if progress:
            progress("words", start + len(chunk), len(ids))
    idf = np.log(len(ids) / np.maximum((counts > 0).sum(axis=0), 1)).astype(np.float32)
    bags = np.sqrt(counts) * idf
    return bags / np.maximum(np.linalg.norm(bags, axis=1, keepdims=True), 1e-9)


def _similarities(index, pairs: set[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """The cosine of each pair's descriptors, read a batch at a time."""
    pairs = sorted(pairs)
    out = {}
    for start in range(0, len(pairs), PAIR_BATCH):
        chunk = pairs[start:start + PAIR_BATCH]
        a = index.vectors([p[0] for p in chunk])
        b = index.vectors([p[1] for p in chunk])
        out.update(zip(chunk, map(float, np.einsum("ij,ij->i", a, b))))
    return out


def _read_features(store, ids) -> dict[int, local.Features | None]:
    """The local features of ``ids`` read in one go, by id; None for an image without any
    or with damaged ones (warned: ``check --repair`` mends them)."""
    ids = [int(i) for i in ids]
    blobs = store.local_features(ids) if ids else {}
    out = {}
    for i in ids:
        try:
            out[i] = local.decode(blobs[i]) if i in blobs else None
        except local.FeaturesError as exc:
            log.warning("image id %d: %s ('lookalike check --repair' mends it)", i, exc)
            out[i] = None
    return out


class _Checker:
    """Says whether two images are the same picture: their local features first, then
    their pixels. What it reads is cached."""

    def __init__(self, searcher: "Searcher", verified: bool, threshold: float):
        self.searcher, self.verified, self.threshold = searcher, verified, threshold
        self._features: OrderedDict[int, local.Features | None] = OrderedDict()
        self._greys: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self._paths: dict[int, str] = {}
        self._lock = threading.Lock()  # for the greys, read by the pool's threads

    def confirm_all(self, pairs: dict[tuple[int, int], float],
                    progress: Progress | None) -> dict[tuple[int, int], tuple[float, int]]:
        """The pairs that are duplicates, with (similarity, inliers), checked on every core
        (matching and comparing run in OpenCV and numpy, outside the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        out = {}
        # By first image, so that its features are read once and stay cached.
        todo = sorted(pairs.items())
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for start in range(0, len(todo), PAIR_BATCH):
                batch = todo[start:start + PAIR_BATCH]
                ids = {i for pair, _ in batch for i in pair}
                feats = self._features_of(ids)
                self._paths_of(ids)
                verdicts = pool.map(lambda item: self._judge(*item[0], feats), batch, chunksize=32)
                for (pair, sim), inliers in zip(batch, verdicts):
                    if inliers is not None:
                        out[pair] = (sim, inliers)
                if progress:
                    progress("pairs", start + len(batch), len(todo))
        return out

    def check(self, a: int, b: int) -> tuple[float, int] | None:
        """(similarity, inliers) of a pair that is not a candidate, if a duplicate."""
        sim = _similarities(self.searcher.index, {(a, b)})[(a, b)]
        if sim < self.threshold:
            return None
        inliers = self._judge(a, b, self._features_of({a, b}))
        return None if inliers is None else (sim, inliers)

    def _judge(self, a: int, b: int, feats: dict[int, local.Features | None]) -> int | None:
        """Inliers of a confirmed pair (0 when confirmed by pixels alone); None if not."""
        if not self.verified:
            ga, gb = self._grey(a), self._grey(b)
            same = ga is not None and gb is not None and pixels_agree(local.compare_frames(ga, gb))
            return 0 if same else None
        fa, fb = feats.get(a), feats.get(b)
        if fa is None or fb is None:
            return None
        c = local.correspond(fa, fb)
        if not keypoints_agree(c):
            return None
        ga, gb = self._grey(a), self._grey(b)
        if ga is None or gb is None:
            return None
        return c.inliers if pixels_agree(local.compare_pixels(ga, fa, gb, fb, c.affine)) else None

    def _paths_of(self, ids) -> None:
        """Read the paths of ``ids`` not known yet in one query (for the pixel checks)."""
        missing = [i for i in ids if i not in self._paths]
        if len(self._paths) + len(missing) > 4 * CACHE:
            self._paths.clear()
        self._paths.update((i, row[0]) for i, row in self.searcher.store.describe_ids(missing).items())

    def _features_of(self, ids: set[int]) -> dict[int, local.Features | None]:
        """The local features of ``ids``, from the cache or read in one go."""
        # Cached ones first marked recent: reading the others evicts the oldest entries,
        # which must not be this batch's own.
        for i in ids:
            if i in self._features:
                self._features.move_to_end(i)
        self._prefetch(ids)
        return {i: self._features[i] for i in ids}

    def _prefetch(self, ids: set[int]) -> None:
        read = _read_features(self.searcher.store, [i for i in ids if i not in self._features])
        for i, f in read.items():
            self._remember(self._features, i, f)

    def _grey(self, i: int) -> np.ndarray | None:
        """The image small and grey, upright as its features; None if it cannot be read now."""
        with self._lock:
            if i in self._greys:
                self._greys.move_to_end(i)
                return self._greys[i]
        path = self._paths.get(i)
        if path is None:
            path = self.searcher.store.describe_ids([i]).get(i, (None,))[0]
        grey = None
        try:
            grey = open_image(path, GREY_SIZE, gray=GREY_SIZE).gray if path else None
        except DecodeError as exc:
            log.warning("%s: %s; not compared", path, exc)
        with self._lock:
            self._remember(self._greys, i, grey)
        return grey

    @staticmethod
    def _remember(cache: OrderedDict, key: int, value) -> None:
        cache[key] = value
        if len(cache) > CACHE:
            cache.popitem(last=False)


def keypoints_agree(c: local.Correspondence) -> bool:
    """Whether the keypoints say "maybe the same picture": enough of them carried closely
    by one affine map."""
    return (c.inliers >= MIN_INLIERS and c.share >= MIN_SHARE and c.tight >= MIN_TIGHT
            and c.scale_ratio <= MAX_SCALE_RATIO)


def pixels_agree(p: local.PixelMatch) -> bool:
    """Whether the pixels say "the same picture": the pictures cover much of each other and
    agree all over."""
    return p.overlap >= MIN_OVERLAP and p.agreement >= MIN_AGREEMENT


def _components(edges: Iterable[tuple[int, int]]) -> list[set[int]]:
    """Connected sets of ids (union-find)."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        parent[root(a)] = root(b)
    out: dict[int, set[int]] = {}
    for x in list(parent):
        out.setdefault(root(x), set()).add(x)
    return list(out.values())


def _keeper_order(r: "ImageRecord") -> tuple:
    """Most pixels, then largest file, then oldest, then first indexed."""
    return (-(r.width * r.height), -r.size, r.mtime_ns, r.id)


def _split(ids: set[int], edges: dict[tuple[int, int], tuple[float, int]],
           records: dict[int, "ImageRecord"], checker: _Checker) -> list[Group]:
    """``ids`` as groups in which each member is a duplicate of the keeper: the keeper's
    duplicates first, then the rest grouped again."""
    left = sorted((i for i in ids if i in records), key=lambda i: _keeper_order(records[i]))
    groups = []
    while len(left) > 1:
        keeper, rest = left[0], left[1:]
        members, others = [(keeper, 1.0, 0)], []
        for i in rest:
            found = _link(keeper, i, edges, records, checker)
            (members.append((i, *found)) if found else others.append(i))
        if len(members) > 1:
            groups.append(_group(members, records))
        left = others if len(members) > 1 else rest
    return groups


def _link(keeper: int, i: int, edges, records, checker: _Checker) -> tuple[float, int] | None:
    """(similarity, inliers) if ``i`` is a duplicate of ``keeper``, else None."""
    if records[keeper].sha256 and records[keeper].sha256 == records[i].sha256:
        return 1.0, 0
    known = edges.get((min(keeper, i), max(keeper, i)))
    # Else it was joined to the keeper through others: is it a duplicate of the keeper itself?
    return known if known is not None else checker.check(keeper, i)


def _group(members: list[tuple[int, float, int]], records: dict[int, "ImageRecord"]) -> Group:
    out = []
    for i, sim, inliers in members:
        r = records[i]
        out.append(Member(i, r.path, sim, inliers, r.width, r.height, r.size, r.modified, r.sha256))
    exact = len({m.sha256 for m in out}) == 1 and out[0].sha256 is not None
    return Group("exact" if exact else "near", tuple(out))
