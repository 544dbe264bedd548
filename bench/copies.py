#!/usr/bin/env python
"""Build a copy-detection set from the shared images: edited copies to find among originals.

    python bench/copies.py ../shared/datasets /tmp/copies
    lookalike evaluate /tmp/copies --by edit [options]

The collection holds every original of paris250, corel1k and flowers12 (2,210
images). For each edit below, --per-edit originals (50 by default, drawn with a
fixed seed, never the same original twice) get one edited copy, saved as a
JPEG beside them. Each copy is a query with exactly one relevant image, its
original, so mAP is the mean reciprocal rank of the original and precision@1
is recall@1; the ``edit`` column lets ``evaluate --by edit`` report each edit.

The edits, the ones copy-detection users meet most:

- crop25: a corner holding 25 % of the picture (half the width, half the height);
- crop70: a crop keeping 50 to 90 % of the area, anywhere;
- scale10: a thumbnail at 10 % of each side, at least 48 px on the short side;
- jpeg5: recompressed at JPEG quality 5;
- turn90: turned by 90 degrees, clockwise or not;
- turn180: turned upside down;
- mirror: mirrored left-right;
- light: brightness, contrast and saturation changed (one in three made grey);
- combined: a crop of 50 to 80 %, a rescale to 50 to 100 %, a light change, JPEG
  quality 30 to 60, and for a third of them a 90-degree turn or a mirror.
"""
from __future__ import annotations

import argparse
import csv
import random
import shutil
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

SETS = ("paris250", "corel1k", "flowers12")
EDITS = ("crop25", "crop70", "scale10", "jpeg5", "turn90", "turn180", "mirror", "light", "combined")


def _light(im: Image.Image, rng: random.Random) -> Image.Image:
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.7, 1.3))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Color(im).enhance(rng.uniform(0.5, 1.5))


def _crop(im: Image.Image, area: float, rng: random.Random) -> Image.Image:
    w, h = im.size
    cw, ch = max(16, int(w * area ** 0.5)), max(16, int(h * area ** 0.5))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return im.crop((x0, y0, x0 + cw, y0 + ch))


def edit(im: Image.Image, kind: str, rng: random.Random) -> tuple[Image.Image, int]:
    """The edited copy and the JPEG quality to save it at."""
    im = ImageOps.exif_transpose(im).convert("RGB")
    w, h = im.size
    quality = rng.randint(75, 95)
    if kind == "crop25":
        x0, y0 = rng.choice([(0, 0), (w - w // 2, 0), (0, h - h // 2), (w - w // 2, h - h // 2)])
        im = im.crop((x0, y0, x0 + w // 2, y0 + h // 2))
    elif kind == "crop70":
        im = _crop(im, rng.uniform(0.5, 0.9), rng)
    elif kind == "scale10":
        f = max(0.1, 48 / min(w, h))
        im = im.resize((round(w * f), round(h * f)), Image.Resampling.LANCZOS)
    elif kind == "jpeg5":
        quality = 5
    elif kind == "turn90":
        im = im.transpose(rng.choice([Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270]))
    elif kind == "turn180":
        im = im.transpose(Image.Transpose.ROTATE_180)
    elif kind == "mirror":
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif kind == "light":
        im = _light(im, rng)
        if rng.random() < 1 / 3:
            im = ImageOps.grayscale(im).convert("RGB")
    elif kind == "combined":
        im = _crop(im, rng.uniform(0.5, 0.8), rng)
        scale = rng.uniform(0.5, 1.0)
        im = im.resize((max(32, int(im.width * scale)), max(32, int(im.height * scale))),
                       Image.Resampling.BICUBIC)
        im = _light(im, rng)
        turn = rng.random()
        if turn < 1 / 6:
            im = im.transpose(Image.Transpose.ROTATE_90)
        elif turn < 1 / 3:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        quality = rng.randint(30, 60)
    else:
        raise ValueError(f"unknown edit {kind!r}")
    return im, quality


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("datasets", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-edit", type=int, default=50, help="copies of each edit [50]")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    if args.out.exists():
        shutil.rmtree(args.out)
    originals = []
    for name in SETS:
        with open(args.datasets / name / "groundtruth.csv") as f:
            originals += [(name, r["path"]) for r in csv.DictReader(f)]
    chosen = rng.sample(originals, args.per_edit * len(EDITS))
    kind_of = {orig: EDITS[i // args.per_edit] for i, orig in enumerate(chosen)}
    rows = []
    for n, (name, rel) in enumerate(originals):
        src = args.datasets / name / rel
        dest = Path("originals") / name / rel
        (args.out / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, args.out / dest)
        group = f"{name}/{rel}"
        rows.append((str(dest), group, 0, ""))
        kind = kind_of.get((name, rel))
        if kind:
            with Image.open(src) as im:
                copy, quality = edit(im, kind, rng)
            cdest = Path("copies") / kind / f"{n:04d}.jpg"
            (args.out / cdest).parent.mkdir(parents=True, exist_ok=True)
            copy.save(args.out / cdest, quality=quality)
            rows.append((str(cdest), group, 1, kind))
    with open(args.out / "groundtruth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "group", "query", "edit"])
        w.writerows(rows)
    print(f"{args.out}: {sum(1 for r in rows if r[2])} copies ({args.per_edit} of each of "
          f"{len(EDITS)} edits) among {len(rows)} images")


if __name__ == "__main__":
    main()
