"""Find the indexed images nearest to a query image."""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Iterable, Union

import numpy as np

from indexer import vectors
from indexer.decode import DEFAULT_MAX_PIXELS, open_image
from indexer.pooling import l2n
from indexer.store import Store, StoreError, writer_lock

log = logging.getLogger(__name__)

Query = Union[str, os.PathLike, "PIL.Image.Image", np.ndarray]  # noqa: F821
Box = tuple[float, float, float, float]
Folders = Union[str, os.PathLike, Iterable[Union[str, os.PathLike]], None]
DEFAULT_ALPHA = 3.0
# Alpha-query expansion by default, with the top 2 results: neighbours weighted
# by similarity**3 add little unless they are close. More neighbours help
# queries with many relevant images (landmarks, categories) and hurt copy
# detection, where one image is relevant (bench/QUALITY.md).
DEFAULT_QE = 2


@dataclass(frozen=True)
class Match:
    """One search result: the image's database id, absolute path, cosine similarity and size.

    With verification, ``inliers`` counts the local features that a geometric
    transform maps from the query onto this image (0: not verified), and
    ``box`` is where the query appears in it: the query's four corners
    (top-left, top-right, bottom-right, bottom-left), in this image's upright
    pixels; None when not verified.
    """

    id: int
    path: str
    score: float
    width: int
    height: int
    inliers: int = 0
    box: tuple[tuple[float, float], ...] | None = None

    def to_dict(self) -> dict:
        return {"path": self.path, "score": self.score, "id": self.id,
                "width": self.width, "height": self.height, "inliers": self.inliers,
                "box": [list(p) for p in self.box] if self.box else None}


class Searcher:
    """Query a lookalike database. Loads the model once; safe to share between threads.

    A query is an image path, a PIL image, an H x W x 3 uint8 array, or a
    descriptor (a 1-D float array of the index's dimension).
    """

    def __init__(self, db: str | os.PathLike | None = None, *, device: str = "auto",
                 weights: str | os.PathLike | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 dba: int = 0, alpha: float = DEFAULT_ALPHA):
        """``dba``: database-side augmentation, each indexed descriptor replaced by the
        alpha-weighted sum of itself and its ``dba`` nearest neighbours (done on load)."""
        from indexer.encoder import resolve_device

        if dba < 0:
            raise ValueError("dba must be 0 or more")
        self.dba, self.alpha = int(dba), float(alpha)

        self.store = Store(db, create=False)
        try:
            recipe = self.store.recipe()
            if recipe is None:
                raise StoreError(f"{self.store.name}: the database holds no index yet; "
                                 "run 'lookalike index' first")
            self.recipe = recipe
            self.device = resolve_device(device)
            self._lock = threading.Lock()
            self._generation = None
            self._under_cache: dict = {}
            self._refresh()
        except Exception:
            self.store.close()
            raise
        self.weights, self.max_pixels = weights, max_pixels
        self._encoder = None
        self._pool = None  # threads that find a query's keypoints, made on first use

    def refresh(self) -> bool:
        """Load what the database holds now, even in the middle of an index run; whether it changed.

        Searches refresh by themselves when an index run has finished; this is
        for an application that wants a run's committed batches sooner.
        """
        return self._refresh(during_run=True)

    def _refresh(self, during_run: bool = False) -> bool:
        """Reload the vector index when an index run has changed the database since."""
        generation = self.store.generation()
        if generation == self._generation:
            return False
        with self._lock:
            if generation == self._generation:
                return False
            with writer_lock(self.store.where, wait=False) as writer:
                if not writer and self._generation is not None and not during_run:
                    # An index run is under way: serve the index we have, rather than
                    # rebuild after each of its batches; it saves a new one at the end.
                    return False
                # A reader never waits for a run: an earlier state on disk will do.
                index = vectors.load(self.store, save_rebuilt=writer, mmap=True,
                                     stale_ok=not writer and not during_run)
            if self.dba:
                index = index.augmented(self.dba, self.alpha)
            # One assignment: a search in another thread sees the old index or the new
            # one whole, each with the whitening its vectors have.
            self._loaded = index.to_device(self.device)
            self._generation = index.generation
            self._under_cache = {}
            return True

    @property
    def whitening(self):
        """The collection's whitening applied to the index and to queries (None: none)."""
        return self._loaded.whitening

    @property
    def index(self):
        """The vector index searched (indexer.vectors.VectorIndex)."""
        return self._loaded

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.store.close()

    def __len__(self) -> int:
        return len(self._loaded)

    @property
    def encoder(self):
        """The model, loaded on first use (a query by descriptor never needs it)."""
        with self._lock:
            if self._encoder is None:
                from indexer.encoder import Encoder

                self._encoder = Encoder(self.recipe, self.weights, self.device)
            return self._encoder

    def embed(self, query: Query, *, box: Box | None = None, rotation: int = 0,
              flip: bool = False) -> np.ndarray:
        """The descriptor of ``query`` as the index stores it (float32, L2-normalised).

        ``box`` (x0, y0, x1, y1 in pixels of the upright image) describes only
        that region; ``rotation`` (0, 90, 180, 270, counter-clockwise) and
        ``flip`` (mirror left-right) transform the image first.
        """
        if isinstance(query, np.ndarray) and query.ndim == 1:
            if box is not None or rotation or flip:
                raise ValueError("box, rotation and flip need an image, not a descriptor")
            if query.shape[0] != self.recipe.dim:
                raise ValueError(f"descriptor has {query.shape[0]} dims, the index {self.recipe.dim}")
            vec = query.astype(np.float32)
            return l2n(vec)
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, not {rotation}")
        return self.encoder.embed(_turn(self._decode(query, box).pixels, rotation, flip))[0]

    def search(self, query: Query, k: int = 10, *, qe: int = DEFAULT_QE, box: Box | None = None,
               rotations: bool = False, flip: bool = False, exclude: Iterable[int] = (),
               verify: int | None = None, under: Folders = None) -> list[Match]:
        """The ``k`` indexed images most similar to ``query``, best first.

        ``qe``: alpha-query expansion with that many top results (0: none). ``rotations``:
        also try the query turned by 90, 180 and 270 degrees, and ``flip``
        mirrored; each image keeps its best score. ``box``: query by a region
        of the image. ``exclude``: database ids left out of the results and of
        the expansion (for example the query's own entry). ``verify``: re-rank
        that many of the best global results by geometric verification of
        local features (0: none; None: search.verify.DEFAULT_VERIFY when the
        database has local features, else none). ``under``: only images whose paths
        lie under this folder (or any of these folders).
        """
        depth = self.verify_depth(verify)
        if isinstance(query, np.ndarray) and query.ndim == 1:
            if box is not None or rotations or flip:
                raise ValueError("box, rotations and flip need an image, not a descriptor")
            if verify:
                raise ValueError("verification needs an image, not a descriptor")
            depth, decoded, vecs = 0, None, [self.embed(query)]
        else:
            decoded = self._decode(query, box, local=depth > 0)
            # The query's keypoints are found while the network runs: both release the GIL.
            keypoints = self._extractor().submit(self._keypoints, decoded.gray) if depth else None
            turns = [(r, f) for r in (ROTATIONS if rotations else (0,)) for f in ((False, True) if flip else (False,))]
            vecs = [self.encoder.embed(_turn(decoded.pixels, r, f))[0] for r, f in turns]
        exclude = set(map(int, exclude))
        allowed = self.ids_under(under)
        ranked = self._ranked(np.stack(vecs), max(k, depth), qe, exclude, merge=True, allowed=allowed)[0]
        if depth:
            nominees = [] if rotations else self._turned_nominees(
                decoded.pixels, exclude | {m.id for m, _ in ranked[:depth]}, allowed)
            ranked = self._verified(keypoints.result(), ranked, depth, nominees)
        return [m for m, _ in ranked[:k]]

    def _turned_nominees(self, pixels: np.ndarray, exclude: set[int],
                         allowed: np.ndarray | None) -> list[tuple[Match, float]]:
        """The best global matches of the query turned by 90, 180 and 270 degrees, to be
        verified too: a photo stored sideways (no EXIF orientation) is far down the
        upright query's list. At half size, a quarter of the work of a full query."""
        from PIL import Image

        from .verify import TURNED_NOMINEES

        h, w = pixels.shape[:2]
        small = np.asarray(Image.fromarray(pixels).resize((max(1, w // 2), max(1, h // 2)),
                                                          Image.Resampling.BILINEAR))
        sideways = self.encoder.embed(np.stack([_turn(small, 90, False), _turn(small, 270, False)]))
        vecs = np.concatenate([sideways, self.encoder.embed(_turn(small, 180, False))])
        return self._ranked(vecs, TURNED_NOMINEES, 0, exclude, merge=True, allowed=allowed)[0]

    def _extractor(self):
        with self._lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lookalike-keypoints")
            return self._pool

    def _keypoints(self, gray: np.ndarray):
        from indexer import local

        return local.extract(gray, self.recipe.local_keypoints)

    def verify_depth(self, verify: int | None) -> int:
        """How many results a search verifies when asked for ``verify`` (None: the default)."""
        from indexer import local

        from .verify import DEFAULT_VERIFY

        if verify is not None and verify < 0:
            raise ValueError("verify must be 0 or more")
        if not self.recipe.has_local:
            if verify:
                raise ValueError(f"{self.store.name} holds no local features to verify with (it was "
                                 "indexed with --local-features none); index into a new database")
            return 0
        if self.recipe.local_codec != local.codec():
            if verify is None:
                log.warning("%s: local features stored as %s, this lookalike reads %s; searching "
                            "without verification", self.store.name, self.recipe.local_codec, local.codec())
                return 0
            from indexer import RecipeMismatch

            raise RecipeMismatch(f"{self.store.name}: local features stored as {self.recipe.local_codec}, "
                                 f"this lookalike reads {local.codec()}; index into a new database")
        return DEFAULT_VERIFY if verify is None else int(verify)

    def _verified(self, query, ranked: list[tuple[Match, float]], depth: int,
                  nominees: list[tuple[Match, float]] = ()) -> list[tuple[Match, float]]:
        """The first ``depth`` results re-ranked by verification of the query's keypoints,
        the rest after them. ``nominees`` (from turned views of the query) are verified
        too, and join the results only if verified."""
        from dataclasses import replace

        from . import verify

        head, tail = ranked[:depth], ranked[depth:]
        candidates = head + list(nominees)
        stored = self.store.local_features(m.id for m, _ in candidates)
        found = verify.verify(query, {m.id: stored[m.id] for m, _ in candidates if m.id in stored},
                              {m.id: (m.width, m.height) for m, _ in candidates})
        head += [pair for pair in nominees if pair[0].id in found]
        tail = [pair for pair in tail if pair[0].id not in found]
        head = [(replace(m, inliers=found[m.id].inliers, box=found[m.id].box) if m.id in found else m, rank)
                for m, rank in head]
        order = verify.rank_order([rank for _, rank in head], [m.inliers for m, _ in head])
        return [head[i] for i in order] + tail

    def _decode(self, query: Query, box: Box | None, local: bool = False):
        if isinstance(query, np.ndarray):
            from PIL import Image

            if query.ndim != 3 or query.shape[2] != 3 or query.dtype != np.uint8:
                raise ValueError(f"an image array must be H x W x 3 uint8, not {query.shape} "
                                 f"{query.dtype}")
            query = Image.fromarray(np.ascontiguousarray(query), "RGB")
        return open_image(query, self.recipe.image_size, self.max_pixels, box=box,
                          gray=self.recipe.local_size if local else None)

    def search_vectors(self, vecs: np.ndarray, k: int = 10, *, qe: int = DEFAULT_QE,
                       exclude: Iterable[int] = (), merge: bool = False,
                       under: Folders = None) -> list[list[Match]]:
        """Nearest neighbours for each row of ``vecs`` (N x dim descriptors as ``embed`` gives).

        With ``merge``, the rows are views of one query (turned, mirrored): one
        result list, each image with its best score over the rows.
        """
        return [[m for m, _ in row] for row in self._ranked(vecs, k, qe, {int(i) for i in exclude}, merge,
                                                            self.ids_under(under))]

    def ids_under(self, under: Folders) -> np.ndarray | None:
        """Sorted ids of the images under the folder(s) ``under`` (None: no filter)."""
        if under is None:
            return None
        folders = [under] if isinstance(under, (str, os.PathLike)) else list(under)
        if not folders:
            return None
        key = tuple(sorted(os.path.abspath(os.path.expanduser(os.fspath(f))) for f in folders))
        self._refresh()
        cache = self._under_cache  # emptied by a refresh, so ids are always current
        if key not in cache:
            cache.clear()
            cache[key] = self.store.ids_under(key)
        return cache[key]

    def _ranked(self, vecs: np.ndarray, k: int, qe: int, exclude: set[int],
                merge: bool, allowed: np.ndarray | None = None) -> list[list[tuple[Match, float]]]:
        """search_vectors' results, each with the similarity it was ranked by (that of the
        expanded query, which ``Match.score``, the plain cosine, is not)."""
        if k < 1:
            raise ValueError("k must be at least 1")
        if qe < 0:
            raise ValueError("qe must be 0 or more")
        self._refresh()
        state = self._loaded
        vecs = np.atleast_2d(np.asarray(vecs, dtype=np.float32))
        if vecs.shape[1] != self.recipe.dim:
            raise ValueError(f"descriptors have {vecs.shape[1]} dims, the index {self.recipe.dim}")
        total = len(state) if allowed is None else len(allowed)
        if total == 0 or not len(state):
            return [[]] if merge else [[] for _ in vecs]
        q0 = state.space(vecs)
        want = min(total, k + len(exclude))
        scores, ids = state.search(q0, max(want, min(total, qe + len(exclude))), allowed)
        if qe:
            scores, ids = state.search(_expanded(state, q0, scores, ids, qe, exclude, self.alpha), want, allowed)
        if merge:
            best: dict[int, float] = {}
            for srow, irow in zip(scores, ids):
                for sc, i in zip(srow, irow):
                    if i >= 0 and best.get(int(i), -np.inf) < sc:
                        best[int(i)] = float(sc)
            order = sorted(best, key=best.get, reverse=True)
            ids = np.array([order], dtype=np.int64)
            scores = np.array([[best[i] for i in order]], dtype=np.float32)
        # Ranked by the expanded query and the best view, but the score shown is
        # the cosine between the query as given and the image: a copy scores 1.
        cosines = (np.stack([_cosines(state, q0, row) if merge else _cosines(state, q0[j:j + 1], row)
                             for j, row in enumerate(ids)]) if qe or merge else scores)
        return self._matches(cosines, scores, ids, k, exclude)

    def _matches(self, cosines, ranks, ids, k: int, exclude: set[int]) -> list[list[tuple[Match, float]]]:
        rows = self.store.describe_ids(i for i in ids.ravel() if i >= 0)
        out = []
        for crow, rrow, irow in zip(cosines, ranks, ids):
            matches = []
            for cosine, rank, i in zip(crow, rrow, irow):
                if int(i) in rows and int(i) not in exclude and len(matches) < k:
                    path, width, height = rows[int(i)]
                    # Rounding can put an image's cosine with itself a hair above 1.
                    matches.append((Match(int(i), path, min(1.0, float(cosine)), width, height),
                                    float(rank)))
            out.append(matches)
        return out

    def duplicates(self, **options) -> list:
        """Groups of images that are the same picture (``search.duplicates.find``, whose
        ``options`` these are)."""
        from . import duplicates

        return duplicates.find(self, **options)

    def search_many(self, queries: Iterable[Query], k: int = 10, **options) -> Iterable[list[Match]]:
        """Search each query in turn (``options`` as for ``search``); yields one result list per query."""
        for q in queries:
            yield self.search(q, k, **options)

    def id_of(self, path: str | os.PathLike) -> int | None:
        """The database id of an indexed file, or None."""
        return self.store.id_of(os.path.abspath(os.fspath(path)))


def _expanded(index, q, scores, ids, n: int, exclude: set[int], alpha: float) -> np.ndarray:
    """Alpha-query expansion: the query plus its top ``n`` results weighted by score**alpha."""
    out = q.astype(np.float32).copy()
    for row, (srow, irow) in enumerate(zip(scores, ids)):
        kept = [j for j, i in enumerate(irow) if i >= 0 and int(i) not in exclude][:n]
        if kept:
            weights = np.maximum(srow[kept], 0.0) ** alpha
            out[row] += weights @ index.vectors(irow[kept])
    return np.ascontiguousarray(l2n(out))


def _cosines(index, q0: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Best cosine over the rows of ``q0`` for each id (-inf for -1)."""
    valid = ids >= 0
    out = np.full(len(ids), -np.inf, dtype=np.float32)
    if valid.any():
        out[valid] = (index.vectors(ids[valid]) @ q0.T).max(axis=1)
    return out


ROTATIONS = (0, 90, 180, 270)


def _turn(pixels: np.ndarray, rotation: int, flip: bool) -> np.ndarray:
    """``pixels`` (H x W x 3) mirrored left-right if ``flip``, then turned counter-clockwise."""
    if flip:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(np.rot90(pixels, rotation // 90))
