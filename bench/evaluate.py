"""Retrieval quality of the whole product on a labelled set: leave-one-out mAP.

    python bench/evaluate.py ../shared/datasets/paris250 [--pooling gem] [--image-size 448]

The set is a folder with groundtruth.csv (path,group). Every image is indexed
with `Indexer`, queried with `Searcher` (descriptor lookups, the same
pipeline users get), and ranked against all the others, itself left out.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer import Indexer  # noqa: E402
from search import Searcher  # noqa: E402


def average_precision(relevant: np.ndarray) -> float:
    """AP of one ranking given as a boolean array of relevance."""
    hits = np.cumsum(relevant)
    if hits[-1] == 0:
        return 0.0
    ranks = np.arange(1, len(relevant) + 1)
    return float(np.sum((hits / ranks)[relevant]) / hits[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--model", default=None)
    ap.add_argument("--layer", default=None)
    ap.add_argument("--pooling", default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()

    with open(args.dataset / "groundtruth.csv") as f:
        truth = {os.path.abspath(args.dataset / row["path"]): row["group"] for row in csv.DictReader(f)}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "eval.db"
        start = time.perf_counter()
        summary = Indexer(db, model=args.model, layer=args.layer, pooling=args.pooling,
                          image_size=args.image_size, workers=args.workers).index([args.dataset])
        took = time.perf_counter() - start
        with Searcher(db) as s:
            ids = {}
            from indexer.store import ImageRow
            from sqlalchemy import select

            with s.store.session() as session:
                for rid, path, emb in session.execute(select(ImageRow.id, ImageRow.path, ImageRow.embedding)):
                    ids[path] = np.frombuffer(emb, dtype=np.float32)
            paths = [p for p in truth if p in ids]
            vecs = np.stack([ids[p] for p in paths])
            groups = np.array([truth[p] for p in paths])
            recipe = s.recipe
            results = s.search_vectors(vecs, k=len(paths))
    aps = []
    for i, matches in enumerate(results):
        ranked = [m.path for m in matches if m.path != paths[i]]
        rel = np.array([truth.get(p) == groups[i] for p in ranked])
        aps.append(average_precision(rel))
    print(f"{args.dataset.name}: mAP {np.mean(aps):.3f} over {len(paths)} queries "
          f"({recipe.model}/{recipe.layer}, {recipe.pooling}, {recipe.image_size}px; "
          f"indexed in {took:.1f}s: {summary.line()})")


if __name__ == "__main__":
    main()
