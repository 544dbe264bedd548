#!/usr/bin/env python
"""The local-feature study behind lookalike's defaults: detector, working size, keypoints,
descriptor encoding and ratio test, measured by re-ranking the product's own global lists.

    python bench/local_sweep.py ../shared/datasets/covers50 --out /tmp/sweep
    python bench/local_sweep.py /tmp/copies --out /tmp/sweep --depth 50

For a labelled set it (1) indexes the set with ``--local-features none`` and stores, for
every image as a query, the global top ``--depth`` (the product's Searcher, verification
off); (2) extracts the keypoints of every image at each working size with OpenCV (SIFT,
up to 2,000, and ORB), once, cached in ``--out``; (3) for each configuration, matches
every query with its shortlist (ratio test, one-to-one), fits a MAGSAC homography (4 px)
and counts inliers; (4) re-ranks the shortlist with search.verify.rank_order and prints
mAP and precision@1, the bytes a configuration stores per keypoint, the extraction time
and the matching time per pair. The query's descriptors are encoded like the stored
ones here (the product keeps the query's unquantised), and the mirrored view is not
tried: figures compare configurations, ``lookalike evaluate`` gives the product's own.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (detector, working size, keypoints, encoding, ratio)
CONFIGS = [
    ("sift", 400, 500, "pca32", 0.75),
    ("sift", 320, 500, "pca32", 0.75),
    ("sift", 480, 500, "pca32", 0.75),
    ("sift", 640, 500, "pca32", 0.75),
    ("sift", 400, 300, "pca32", 0.75),
    ("sift", 400, 1000, "pca32", 0.75),
    ("sift", 400, 500, "rootsift", 0.75),
    ("sift", 400, 500, "pca32", 0.8),
    ("sift", 400, 500, "pca32", 0.7),
    ("orb", 640, 500, "orb", 0.8),
    ("orb", 640, 1000, "orb", 0.8),
]
STORED_BYTES = {"pca32": 32 + 4, "rootsift": 128 + 4, "orb": 32 + 4}


def shortlists(root: Path, out: Path, depth: int) -> dict:
    """{query path: [(path, similarity), ...]} from the product, and the ground truth."""
    cache = out / f"{root.name}-lists.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from indexer import Indexer
    from search import Searcher
    from search.evaluate import read_groundtruth

    db = out / f"{root.name}-global.db"
    Indexer(db, local_features="none").index([root])
    entries = read_groundtruth(root / "groundtruth.csv", root)
    lists = {}
    with Searcher(db) as s:
        for e in entries:
            if e.query:
                own = s.id_of(e.path)
                lists[e.path] = [(m.path, m.score) for m in s.search(
                    e.path, k=depth, exclude=[own] if own is not None else [])]
    data = {"group": {e.path: e.group for e in entries}, "lists": lists}
    cache.write_text(json.dumps(data))
    return data


def _extract(job):
    path, kind, size = job
    import cv2

    from indexer.decode import open_image

    cv2.setNumThreads(1)
    gray = open_image(path, 64, gray=size).gray
    start = time.perf_counter()
    det = cv2.SIFT_create(nfeatures=2000) if kind == "sift" else cv2.ORB_create(nfeatures=2000)
    found, desc = det.detectAndCompute(gray, None)
    took = time.perf_counter() - start
    shape = gray.shape[:2]
    if desc is None or not found:
        return np.zeros((0, 3), np.float32), np.zeros((0, 128 if kind == "sift" else 32), np.uint8), took, shape
    xyr = np.array([(k.pt[0], k.pt[1], k.response) for k in found], np.float32)
    order = np.argsort(-xyr[:, 2], kind="stable")
    return xyr[order], desc[order].astype(np.uint8), took, shape


def keypoints(paths: list[str], kind: str, size: int, out: Path, name: str) -> dict:
    cache = out / f"{name}-{kind}{size}.npz"
    if not cache.exists():
        with Pool(2) as pool:
            res = pool.map(_extract, [(p, kind, size) for p in paths], chunksize=8)
        offsets = np.cumsum([0] + [len(r[0]) for r in res])
        np.savez(cache, paths=np.array(paths), offsets=offsets, xyr=np.concatenate([r[0] for r in res]),
                 desc=np.concatenate([r[1] for r in res]), took=np.array([r[2] for r in res]),
                 shapes=np.array([r[3] for r in res]))
    z = np.load(cache)
    offsets = z["offsets"]
    feats = {p: (z["xyr"][a:b], z["desc"][a:b], tuple(shape))
             for p, a, b, shape in zip(z["paths"], offsets[:-1], offsets[1:], z["shapes"])}
    return {"features": feats, "ms": 1000 * float(z["took"].mean())}


def encode(desc: np.ndarray, encoding: str) -> np.ndarray:
    from indexer import local

    if encoding == "orb":
        return np.unpackbits(desc, axis=1).astype(np.float32) * 2 - 1  # +-1: Hamming as a dot product
    x = desc.astype(np.float32)
    x /= np.maximum(x.sum(axis=1, keepdims=True), 1e-6)
    x = np.sqrt(x)
    if encoding == "rootsift":
        return x
    x = local.project(desc)
    return np.rint(x * (127 / np.abs(x).max(axis=1, keepdims=True))).astype(np.float32)


def normalised(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def run(data: dict, feats: dict, n: int, encoding: str, ratio: float, depth: int):
    from indexer import local
    from search import verify
    from search.evaluate import average_precision, precision_at

    cache = {}

    def get(path):
        if path not in cache:
            xyr, desc, (h, w) = feats[path]
            xyr, desc = xyr[:n], desc[:n]
            cache[path] = local.Features(xyr[:, :2].copy(), normalised(encode(desc, encoding)), int(w), int(h))
        return cache[path]

    aps, p1, pairs, spent = [], [], 0, 0.0
    group = data["group"]
    sizes: dict[str, int] = {}
    for g in group.values():
        sizes[g] = sizes.get(g, 0) + 1
    for q, shortlist in data["lists"].items():
        total = sizes[group[q]] - 1
        if not total:
            continue
        start = time.perf_counter()
        query = get(q)
        cands = [get(p) for p, _ in shortlist]
        # The ratio test compares squared distances; for ORB's +-1 vectors those are
        # Hamming distances, whose ratio is the usual test.
        found = local.tentative(query, cands, ratio ** 0.5 if encoding == "orb" else ratio)
        inliers = []
        for c, p in zip(cands, found):
            v = local.verify(query, c, p, verify.MIN_INLIERS)
            inliers.append(v.inliers if v else 0)
        spent += time.perf_counter() - start
        pairs += len(cands)
        sims = np.minimum.accumulate(np.array([s for _, s in shortlist]))  # the global order
        order = verify.rank_order(sims, np.array(inliers))
        rel = np.array([group[shortlist[i][0]] == group[q] for i in order])
        aps.append(average_precision(rel, total))
        p1.append(precision_at(rel, 1))
    return float(np.mean(aps)), float(np.mean(p1)), 1000 * spent / max(pairs, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", type=Path)
    ap.add_argument("--out", type=Path, default=Path("/tmp/local-sweep"))
    ap.add_argument("--depth", type=int, default=100, help="shortlist verified [100]")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from search.evaluate import average_precision

    data = shortlists(args.set, args.out, args.depth)
    name = args.set.name
    paths = sorted(data["group"])
    base = []
    for q, shortlist in data["lists"].items():
        total = sum(1 for p in data["group"] if data["group"][p] == data["group"][q]) - 1
        rel = np.array([data["group"][p] == data["group"][q] for p, _ in shortlist])
        if total:
            base.append(average_precision(rel, total))
    print(f"{name}: {len(data['lists'])} queries, global top {args.depth}: mAP {np.mean(base):.3f} "
          "(ranks beyond the shortlist count as misses)")
    print("| detector | size | keypoints | encoding | ratio | bytes/keypoint | extract ms | mAP | P@1 | ms/pair |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, size, n, encoding, ratio in CONFIGS:
        k = keypoints(paths, kind, size, args.out, name)
        m, p, ms = run(data, k["features"], n, encoding, ratio, args.depth)
        print(f"| {kind} | {size} | {n} | {encoding} | {ratio} | {STORED_BYTES[encoding]} | "
              f"{k['ms']:.0f} | {m:.3f} | {p:.3f} | {ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
