#!/usr/bin/env python
"""Learn the RootSIFT projection that lookalike ships (indexer/rootsift_pca32.npz).

    python bench/local_pca.py [--out indexer/rootsift_pca32.npz]

The projection is learned once, from camera photos that no evaluation set
holds: the wallpapers of the Debian packages lomiri-wallpapers-16.04 and
mate-backgrounds (``apt-get install lomiri-wallpapers-16.04 mate-backgrounds``),
so a figure measured on the shared sets is not measured on its own training
data. Each photo is decoded as the index does (upright, grey, longest side at
the working size) and gives up to 1,000 SIFT keypoints; their RootSIFT
descriptors are centred and the 32 directions of largest variance kept. PCA
of SIFT statistics hardly depends on the photos it is learned from, and the
recipe names the file's checksum, so a database always matches its projection.
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("/usr/share/backgrounds/**/*.jpg", "/usr/share/wallpapers/**/*.jpg")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "indexer" / "rootsift_pca32.npz")
    ap.add_argument("--keypoints", type=int, default=1000)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from indexer import local
    from indexer.decode import open_image

    paths = sorted({p for pattern in SOURCES for p in glob.glob(pattern, recursive=True)})
    if not paths:
        sys.exit("no wallpapers found: apt-get install lomiri-wallpapers-16.04 mate-backgrounds")
    rows = []
    for p in paths:
        gray = open_image(p, 64, gray=local.DEFAULT_SIZE).gray
        kp = local.extract(gray, args.keypoints)
        x = kp.raw.astype(np.float64)
        x /= np.maximum(x.sum(axis=1, keepdims=True), 1e-9)
        rows.append(np.sqrt(x))
    x = np.concatenate(rows)
    mean = x.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov((x - mean).T))
    order = np.argsort(values)[::-1][:local.DIMS]
    # A sign convention, so that learning again from the same photos gives the same file.
    vectors = vectors[:, order]
    vectors *= np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(local.DIMS)])
    kept = values[order].sum() / values.sum()
    np.savez(args.out, mean=mean.astype(np.float32), projection=vectors.astype(np.float32))
    print(f"{args.out}: {len(x)} descriptors from {len(paths)} photos; the {local.DIMS} dims keep "
          f"{100 * kept:.1f} % of the variance")


if __name__ == "__main__":
    main()
