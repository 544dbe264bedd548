"""Find the indexed images nearest to a query image."""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import numpy as np

from indexer import vectors
from indexer.decode import DEFAULT_MAX_PIXELS, open_image
from indexer.pooling import l2n
from indexer.store import Store, StoreError, default_db_path, writer_lock

log = logging.getLogger(__name__)

Query = Union[str, os.PathLike, "PIL.Image.Image", np.ndarray]  # noqa: F821


@dataclass(frozen=True)
class Match:
    """One search result: the image's database id, absolute path, cosine similarity and size."""

    id: int
    path: str
    score: float
    width: int
    height: int

    def to_dict(self) -> dict:
        return {"path": self.path, "score": self.score, "id": self.id,
                "width": self.width, "height": self.height}


class Searcher:
    """Query a lookalike database. Loads the model once; safe to share between threads.

    A query is an image path, a PIL image, an H x W x 3 uint8 array, or a
    descriptor (a 1-D float array of the index's dimension).
    """

    def __init__(self, db: str | os.PathLike | None = None, *, device: str = "auto",
                 weights: str | os.PathLike | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        from indexer.encoder import resolve_device

        self.store = Store(Path(db).expanduser() if db else default_db_path(), create=False)
        try:
            recipe = self.store.recipe()
            if recipe is None:
                raise StoreError(f"{self.store.path}: the database holds no index yet; "
                                 "run 'lookalike index' first")
            self.recipe = recipe
            self.device = resolve_device(device)
            self._lock = threading.Lock()
            self._generation = None
            self._refresh()
        except Exception:
            self.store.close()
            raise
        self.weights, self.max_pixels = weights, max_pixels
        self._encoder = None

    def refresh(self) -> bool:
        """Load what the database holds now, even in the middle of an index run; whether it changed.

        Searches refresh by themselves when an index run has finished; this is
        for an application that wants a run's committed batches sooner.
        """
        return self._refresh(during_run=True)

    def _refresh(self, during_run: bool = False) -> bool:
        """Reload the FAISS index when an index run has changed the database since."""
        generation = self.store.generation()
        if generation == self._generation:
            return False
        with self._lock:
            if generation == self._generation:
                return False
            with writer_lock(self.store.path, wait=False) as writer:
                if not writer and self._generation is not None and not during_run:
                    # An index run is under way: serve the index we have, rather than
                    # rebuild after each of its batches; it saves a new one at the end.
                    return False
                cpu = vectors.load(self.store, self.recipe.dim, save_rebuilt=writer)
            self._cpu_index, self.index = cpu, vectors.to_device(cpu, self.device)
            self._generation = generation
            return True

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def encoder(self):
        """The model, loaded on first use (a query by descriptor never needs it)."""
        with self._lock:
            if self._encoder is None:
                from indexer.encoder import Encoder

                self._encoder = Encoder(self.recipe, self.weights, self.device)
            return self._encoder

    def embed(self, query: Query) -> np.ndarray:
        """The descriptor of ``query`` (float32, L2-normalised)."""
        if isinstance(query, np.ndarray) and query.ndim == 1:
            if query.shape[0] != self.recipe.dim:
                raise ValueError(f"descriptor has {query.shape[0]} dims, the index {self.recipe.dim}")
            vec = query.astype(np.float32)
            return l2n(vec)
        if isinstance(query, np.ndarray):
            from PIL import Image

            if query.ndim != 3 or query.shape[2] != 3 or query.dtype != np.uint8:
                raise ValueError(f"an image array must be H x W x 3 uint8, not {query.shape} "
                                 f"{query.dtype}")
            query = Image.fromarray(np.ascontiguousarray(query), "RGB")
        decoded = open_image(query, self.recipe.image_size, self.max_pixels)
        return self.encoder.embed(decoded.pixels)[0]

    def search(self, query: Query, k: int = 10) -> list[Match]:
        """The ``k`` indexed images most similar to ``query``, best first."""
        return self.search_vectors(self.embed(query)[None], k)[0]

    def search_vectors(self, vecs: np.ndarray, k: int = 10) -> list[list[Match]]:
        """Nearest neighbours for each row of ``vecs`` (N x dim)."""
        if k < 1:
            raise ValueError("k must be at least 1")
        self._refresh()
        k = min(k, len(self))
        if k == 0:
            return [[] for _ in vecs]
        # FAISS on the GPU answers at most 2048 neighbours; the CPU copy has no limit.
        index = self.index if k <= 2048 else self._cpu_index
        vecs = np.atleast_2d(np.asarray(vecs, dtype=np.float32))
        if vecs.shape[1] != self.recipe.dim:
            raise ValueError(f"descriptors have {vecs.shape[1]} dims, the index {self.recipe.dim}")
        vecs = np.ascontiguousarray(l2n(vecs))
        scores, ids = index.search(vecs, k)
        rows = self.store.describe_ids(i for i in ids.ravel() if i >= 0)
        out = []
        for srow, irow in zip(scores, ids):
            matches = []
            for score, i in zip(srow, irow):
                if int(i) in rows:
                    path, width, height = rows[int(i)]
                    # Rounding can put an image's cosine with itself a hair above 1.
                    matches.append(Match(int(i), path, min(1.0, float(score)), width, height))
            out.append(matches)
        return out

    def search_many(self, queries: Iterable[Query], k: int = 10) -> Iterable[list[Match]]:
        """Search each query in turn; yields one result list per query."""
        for q in queries:
            yield self.search(q, k)
