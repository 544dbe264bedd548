"""Sweep learned whitening's output dimension and shrinkage on stored descriptors.

Each shared set's groups are split in two halves (seeded); whitening is learned
on one half's descriptors and scored on the other's (every image a query
against the rest of its half), against centring learned from the half
searched, which is what lookalike does untuned. Also: learned on one whole
set, scored on every other set (does tuning on covers hurt corel1k?).

Plain cosine ranking, no query expansion or verification: this chooses the
defaults; the product's figures come from `lookalike evaluate --tune-on`
(bench/tune_eval.py).

    python bench/tune_sweep.py DBDIR DATASETS   # DBDIR holds SET.db for each set
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.groundtruth import leave_one_out_map as mean_ap  # noqa: E402
from indexer.store import Store  # noqa: E402
from indexer.whitening import LEARNED_SHRINKAGE, learn, learn_from_groups  # noqa: E402
from search.evaluate import read_groundtruth  # noqa: E402

SETS = ("covers50", "paris250", "corel1k", "flowers12", "copies")


def labelled(db: Path, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Raw stored descriptors of the set's labelled images, and their groups."""
    store = Store(db, create=False)
    try:
        group_of = {e.path: e.group for e in read_groundtruth(root / "groundtruth.csv", root)}
        ids, vecs = [], []
        for i, v in store.embeddings():
            ids.extend(int(x) for x in i)
            vecs.append(v)
        paths = store.describe_ids(ids)
    finally:
        store.close()
    x = np.concatenate(vecs)
    keep = [j for j, i in enumerate(ids) if paths[i][0] in group_of]
    return x[keep], np.array([group_of[paths[ids[j]][0]] for j in keep])


def split(groups: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Masks of two halves of the groups."""
    names = np.unique(groups)
    rng = np.random.default_rng(seed)
    first = set(rng.permutation(names)[: len(names) // 2])
    a = np.array([g in first for g in groups])
    return a, ~a


def centred(x: np.ndarray) -> np.ndarray:
    return learn(x, "center").apply(x)


def main(dbdir: str, datasets: str, cross_only: bool = False) -> None:
    dbdir, datasets = Path(dbdir), Path(datasets)
    data = {}
    for name in SETS:
        root = datasets / name if name != "copies" else Path("/tmp/copies")
        if (dbdir / f"{name}.db").exists() and (root / "groundtruth.csv").exists():
            data[name] = labelled(dbdir / f"{name}.db", root)
    if not cross_only:
        held_out(data)
    cross(data)


def held_out(data: dict, dims=(256, 512, 768, 1280), shrinks=(0.2, 0.3, 0.5, 0.7, 0.9)) -> None:
    print("## held-out half, learned on the other half (two splits, mean)")
    print("| set | centred | " + " | ".join(f"d{d} s{s}" for d in dims for s in shrinks)
          + f" | d1280 s{LEARNED_SHRINKAGE} centred on the labelled half |")
    for name, (x, g) in data.items():
        base, cells = [], {}
        for seed in (0, 1):
            a, b = split(g, seed)
            for train, test in ((a, b), (b, a)):
                base.append(mean_ap(centred(x[test]), g[test]))
                for s in shrinks:
                    # Columns come sorted by variance: one learning gives every dimension.
                    full = learn_from_groups(x[train], g[train], dim=x.shape[1], shrinkage=s)
                    for d in dims:
                        # Centred on the collection searched, as lookalike does once it has
                        # CENTER_MIN_IMAGES images.
                        w = replace(full, projection=full.projection[:, :d], mean=x[test].mean(axis=0))
                        cells.setdefault((d, s), []).append(mean_ap(w.apply(x[test]), g[test]))
                        if (d, s) == (x.shape[1], LEARNED_SHRINKAGE):
                            # Centred on the labelled images, the paper's way.
                            w = replace(w, mean=full.mean)
                            cells.setdefault("labelled", []).append(mean_ap(w.apply(x[test]), g[test]))
        print(f"| {name} | {np.mean(base):.3f} | "
              + " | ".join(f"{np.mean(cells[d, s]):.3f}" for d in dims for s in shrinks)
              + f" | {np.mean(cells['labelled']):.3f} |", flush=True)


def cross(data: dict) -> None:
    print("\n## learned on one whole set (rows), scored on another (columns), centred on it; defaults")
    print("| learned on | " + " | ".join(data) + " |")
    print("| (centred) | " + " | ".join(f"{mean_ap(centred(x), g):.3f}" for x, g in data.values()) + " |")
    for src, (xs, gs) in data.items():
        w = learn_from_groups(xs, gs)
        print(f"| {src} | " + " | ".join(
            "(self)" if dst == src else f"{mean_ap(replace(w, mean=x.mean(axis=0)).apply(x), g):.3f}"
            for dst, (x, g) in data.items()) + " |", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3], cross_only="--cross-only" in sys.argv)
