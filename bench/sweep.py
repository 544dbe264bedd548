"""Explore the recipe space fast: pooled descriptors of many layers and sizes, computed once.

    python bench/sweep.py extract ../shared/datasets/paris250 --model efficientnet_lite0 \
        --sizes 224,320,448,640 --out /tmp/sweep
    python bench/sweep.py score /tmp/sweep/paris250-efficientnet_lite0.npz

`extract` runs the trunk once per image and size (ONNX Runtime, several
layers as outputs) and keeps, for every layer, GeM descriptors for a few p,
MAC and R-MAC. `score` combines them (multi-scale sums, stage concatenation,
whitening, query expansion) and prints leave-one-out mAP. It is the
exploration behind bench/QUALITY.md; every figure there is reproduced with
`lookalike evaluate`, which runs the product itself.
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

from indexer.decode import open_image  # noqa: E402
from indexer.pooling import gem, l2n, mac, rmac  # noqa: E402

PS = (1.0, 2.0, 3.0, 4.0, 6.0)


def _trunk(model: str, layers: list[str]):
    """The product's own trunk with every asked stage as an output, and those stages in order."""
    from indexer.backbone import check_layer, get_spec, layer_names, resolve_weights
    from indexer.network import build_trunk

    layer = check_layer(get_spec(model), "+".join(layers))
    return build_trunk(model, layer, resolve_weights(model)[0]), layer_names(layer)


def extract(args) -> None:
    import onnxruntime as ort
    import torch

    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(args.dataset)
    with open(root / "groundtruth.csv") as f:
        rows = list(csv.DictReader(f))
    net, layers = _trunk(args.model, args.layers.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        onnx = os.path.join(tmp, "m.onnx")
        import warnings

        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.rand(1, 3, 96, 128) * 255,), onnx, input_names=["pixels"],
                          output_names=layers, dynamic_axes={"pixels": {0: "n", 2: "h", 3: "w"}},
                          opset_version=17, dynamo=False)
        sess = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    out: dict[str, list] = {}
    timing = {}
    for size in sizes:
        start = time.perf_counter()
        for row in rows:
            px = open_image(str(root / row["path"]), size).pixels
            x = px.transpose(2, 0, 1)[None].astype(np.float32)
            maps = sess.run(None, {"pixels": x})
            for name, fmap in zip(layers, maps):
                key = f"{name}@{size}"
                for p in PS:
                    out.setdefault(f"{key}/gem{p:g}", []).append(gem(fmap, p)[0])
                out.setdefault(f"{key}/mac", []).append(mac(fmap)[0])
                out.setdefault(f"{key}/rmac", []).append(rmac(fmap)[0])
        timing[size] = len(rows) / (time.perf_counter() - start)
        print(f"{root.name} {args.model} {size}px: {timing[size]:.1f} images/s", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    dest = Path(args.out) / f"{root.name}-{args.model}.npz"
    np.savez(dest, groups=np.array([r["group"] for r in rows]),
             timing=np.array([[s, timing[s]] for s in sizes]),
             **{k: np.stack(v).astype(np.float32) for k, v in out.items()})
    print("wrote", dest)


def map_score(x: np.ndarray, groups: np.ndarray) -> float:
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :-1]
    rel = groups[order] == groups[:, None]
    hits = np.cumsum(rel, axis=1)
    prec = hits / np.arange(1, rel.shape[1] + 1)
    return float(np.mean((prec * rel).sum(1) / np.maximum(rel.sum(1), 1)))


def whiten(x: np.ndarray, shrink: float, dims: int | None = None) -> np.ndarray:
    mu = x.mean(0)
    c = np.cov((x - mu).T)
    w, v = np.linalg.eigh(c)
    w, v = w[::-1], v[:, ::-1]
    if dims:
        w, v = w[:dims], v[:, :dims]
    # Shrinkage: blend each eigenvalue with the mean eigenvalue.
    w = (1 - shrink) * w + shrink * w.mean()
    return l2n((x - mu) @ v / np.sqrt(np.maximum(w, 1e-12)))


def qe(x: np.ndarray, k: int, alpha: float) -> np.ndarray:
    sims = x @ x.T
    order = np.argsort(-sims, axis=1)[:, :k]
    w = np.take_along_axis(np.maximum(sims, 0), order, 1) ** alpha
    return l2n((x[order] * w[..., None]).sum(1))


def score(args) -> None:
    data = np.load(args.npz)
    groups = data["groups"]
    keys = [k for k in data.files if "@" in k]
    print(data["timing"])
    for k in sorted(keys):
        print(f"{k:28s} {map_score(l2n(data[k]), groups):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("dataset")
    e.add_argument("--model", default="efficientnet_lite0")
    e.add_argument("--layers", default="block5,block6,block7,head")
    e.add_argument("--sizes", default="224,320,448,640")
    e.add_argument("--out", default="/tmp/sweep")
    s = sub.add_parser("score")
    s.add_argument("npz")
    args = ap.parse_args()
    extract(args) if args.cmd == "extract" else score(args)


if __name__ == "__main__":
    main()
