"""What a database holds: its recipe, counts, failures and sizes on disk."""
from __future__ import annotations

import dataclasses
import os

from . import vectors
from .store import FAILED, OK, Store, default_db_path


def describe(db: str | os.PathLike | None = None) -> dict:
    """A JSON-ready description of the database at ``db``."""
    store = Store(db or default_db_path(), create=False)
    try:
        recipe = store.recipe()
        whitening = store.whitening()
        sizes = {}
        for name, path in (("database", store.path),
                           ("wal", store.path.with_name(store.path.name + "-wal")),
                           ("faiss", vectors.index_path(store.path))):
            if path.exists():
                sizes[name] = path.stat().st_size
        with_local, local_bytes = store.local_stats()
        return {
            "database": str(store.path),
            "recipe": dataclasses.asdict(recipe) if recipe else None,
            "whitening": whitening.describe() if whitening else None,
            "counts": {"ok": store.count(OK), "failed": store.count(FAILED)},
            # Their bytes as stored (the database file's pages hold them with a little slack).
            "local_features": {"images": with_local, "bytes": local_bytes},
            "failures": [{"path": p, "reason": r} for p, r in store.failures()],
            "sizes": sizes,
        }
    finally:
        store.close()
