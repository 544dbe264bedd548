#!/usr/bin/env python
"""How often verification confirms a match between different pictures, by inlier threshold.

    python bench/calibrate.py ../shared/datasets/paris250 ../shared/datasets/corel1k ...

Each labelled set (a folder with groundtruth.csv, as ``lookalike evaluate``
reads) is indexed into a temporary database (or ``--db-dir``, kept), and every
image is queried against the rest with verification of the global top 100
at a low inlier threshold. Every verified result is recorded with its inliers
and whether it is in the query's group. The table gives, for each threshold,
the share of verified pairs between images of different groups (false
verifications) among all the unrelated pairs verified, and how many related
pairs it keeps. MIN_INLIERS in search/verify.py is chosen from it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (8, 10, 12, 15, 20, 25, 30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="+", type=Path)
    ap.add_argument("--db-dir", type=Path, help="keep the databases here (and reuse them)")
    ap.add_argument("--floor", type=int, default=6, help="the lowest threshold looked at [6]")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from indexer import Indexer
    from search import Searcher, verify
    from search.evaluate import read_groundtruth

    verify.MIN_INLIERS = args.floor
    print(f"{'set':<12} {'queries':>7} {'pairs looked at':>15}  "
          + "  ".join(f"{'>=' + str(t):>14}" for t in THRESHOLDS))
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.db_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for root in args.sets:
            db = folder / f"{root.name}.db"
            Indexer(db).index([root])
            entries = read_groundtruth(root / "groundtruth.csv", root)
            group = {e.path: e.group for e in entries}
            related, unrelated = [], []
            with Searcher(db) as s:
                depth = s.verify_depth(None)
                for e in entries:
                    own = s.id_of(e.path)
                    for m in s.search(e.path, k=depth, exclude=[own] if own is not None else []):
                        if m.inliers:
                            (related if group.get(m.path) == e.group else unrelated).append(m.inliers)
            looked = len(entries) * depth
            related, unrelated = np.array(related), np.array(unrelated)
            cells = [f"{(unrelated >= t).sum() / looked:.5f}/{(related >= t).sum():>5}" for t in THRESHOLDS]
            print(f"{root.name:<12} {len(entries):>7} {looked:>15}  " + "  ".join(f"{c:>14}" for c in cells))
    print("each cell: unrelated pairs verified, as a share of the pairs looked at / related pairs verified")


if __name__ == "__main__":
    main()
