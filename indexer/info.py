"""What a database holds: its recipe, tuning, vector index, counts, failures and sizes on disk."""
from __future__ import annotations

import dataclasses
import os

from . import retune, vectors
from .store import FAILED, OK, Store


def describe(db: str | os.PathLike | None = None) -> dict:
    """A JSON-ready description of the database at ``db``."""
    store = Store(db, create=False)
    try:
        recipe = store.recipe()
        whitening = store.whitening()
        sizes = {"database": store.bytes()} if store.is_server else {}
        files = [("faiss", vectors.index_path(store.path))]
        if not store.is_server:
            files[:0] = [("database", store.path), ("wal", store.path.with_name(store.path.name + "-wal"))]
        for name, path in files:
            if path.exists():
                sizes[name] = path.stat().st_size
        with_local, local_bytes = store.local_stats()
        return {
            "database": store.name,
            "recipe": dataclasses.asdict(recipe) if recipe else None,
            "whitening": whitening.describe() if whitening else None,
            "tuned_weights": _tuned_weights(recipe, retune.original(store)),
            "counts": {"ok": store.count(OK), "failed": store.count(FAILED)},
            # Their bytes as stored (the database file's pages hold them with a little slack).
            "local_features": {"images": with_local, "bytes": local_bytes},
            "vector_index": vectors.summary(store),
            "failures": [{"path": p, "reason": r} for p, r in store.failures()],
            "sizes": sizes,
        }
    finally:
        store.close()


def _tuned_weights(recipe, original) -> str | None:
    """Where a fine-tuned database's weights are (or should be), or None when not fine-tuned."""
    if recipe is None or original is None:
        return None
    from .backbone import tuned_weights_file

    path = tuned_weights_file(recipe.model, recipe.weights_sha256)
    return f"{path}" + ("" if path.is_file() else " (missing: queries and index runs will refuse)")
