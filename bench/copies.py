"""Build a copy-detection set from the shared images: edited copies to find among originals.

    python bench/copies.py ../shared/datasets /tmp/copies
    lookalike evaluate /tmp/copies [options]

Each of 150 originals (50 per set, drawn with a fixed seed from paris250,
corel1k and flowers12) gets one edited copy: a crop of 50 to 80 % of its
area, a rescale, a brightness and contrast change, a recompression at JPEG
quality 30 to 60, and for a third of them a 90-degree turn or a left-right
mirror. The collection holds all 2210 originals (everything in the three
sets) and the 150 copies; the copies are the queries, and each has exactly
one relevant image, its original. mAP here is the mean reciprocal rank of
the original, the figure copy-detection benchmarks report.
"""
from __future__ import annotations

import argparse
import csv
import random
import shutil
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

SETS = ("paris250", "corel1k", "flowers12")


def edit(im: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    im = ImageOps.exif_transpose(im).convert("RGB")
    w, h = im.size
    area = rng.uniform(0.5, 0.8)
    cw, ch = int(w * area ** 0.5), int(h * area ** 0.5)
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    im = im.crop((x0, y0, x0 + cw, y0 + ch))
    scale = rng.uniform(0.5, 1.0)
    im = im.resize((max(32, int(cw * scale)), max(32, int(ch * scale))), Image.Resampling.BICUBIC)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.7, 1.3))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.7, 1.3))
    what = "crop, rescale, light"
    turn = rng.random()
    if turn < 1 / 6:
        im, what = im.transpose(Image.Transpose.ROTATE_90), what + ", turned 90"
    elif turn < 1 / 3:
        im, what = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), what + ", mirrored"
    return im, what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("datasets", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-set", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    if args.out.exists():
        shutil.rmtree(args.out)
    rows = []
    for name in SETS:
        with open(args.datasets / name / "groundtruth.csv") as f:
            paths = [r["path"] for r in csv.DictReader(f)]
        chosen = set(rng.sample(paths, args.per_set))
        for i, rel in enumerate(paths):
            src = args.datasets / name / rel
            dest = Path("originals") / name / rel
            (args.out / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, args.out / dest)
            group = f"{name}/{rel}"
            rows.append((str(dest), group, 0))
            if rel in chosen:
                with Image.open(src) as im:
                    copy, _ = edit(im, rng)
                cdest = Path("copies") / name / f"{i:04d}.jpg"
                (args.out / cdest).parent.mkdir(parents=True, exist_ok=True)
                copy.save(args.out / cdest, quality=rng.randint(30, 60))
                rows.append((str(cdest), group, 1))
    with open(args.out / "groundtruth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "group", "query"])
        w.writerows(rows)
    print(f"{args.out}: {sum(1 for r in rows if r[2])} copies among {len(rows)} images")


if __name__ == "__main__":
    main()
