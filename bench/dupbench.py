#!/usr/bin/env python
"""Score duplicate finders on a labelled set: pairwise precision, recall and F1.

    # imagededup's hashes (in a venv of their own: see bench/DUPLICATES.md)
    /tmp/idd/bin/python bench/dupbench.py /tmp/neardups --imagededup --json /tmp/dup-idd.json
    # lookalike: groups it printed, or the CLI run at several thresholds
    lookalike duplicates --json --db /tmp/neardups.db > /tmp/nd.jsonl
    python bench/dupbench.py /tmp/neardups --lookalike /tmp/nd.jsonl
    python bench/dupbench.py /tmp/neardups --lookalike-db /tmp/neardups.db \
        --thresholds default,0.2,0.3,0.4

SET is a folder built by bench/neardups.py (its pairs.csv lists every true
duplicate pair) or by bench/copies.py (no pairs.csv: every pair inside a
``group`` of its groundtruth.csv is a true pair, groups joined where two
originals are one picture, by neardups.KNOWN_DUPLICATES). Predicted pairs are every
pair inside each predicted group (lookalike), or every pair of images whose
hashes lie within the Hamming distance (imagededup's find_duplicates, whose
answer is file -> files within the distance).

True pairs with a mirrored copy are scored apart: they are neither counted in
the headline recall nor, when predicted, held against precision (a mirrored
copy is arguably another picture); their recall is reported with the other
edits'. A mirrored copy wrongly paired with another picture is still wrong.
Wrong pairs are broken down by what the two images are: the same landmark
(paris250), the same cover (covers50), the same category (corel1k,
flowers12), or anything else.

Prints a markdown table; --json writes every figure, with the wrong pairs.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import neardups  # noqa: E402  (bench/ is on the path when this runs as a script)

HASHES = ("PHash", "DHash", "WHash", "AHash")
DEFAULT_DISTANCE = 10  # imagededup's default max_distance_threshold
DISTANCES = tuple(range(0, 21))
HARD = {"paris250": "same landmark", "covers50": "same cover", "corel1k": "same category",
        "flowers12": "same category"}
Pair = tuple[str, str]


def _pair(a: str, b: str) -> Pair:
    return (a, b) if a < b else (b, a)


@dataclass
class Truth:
    """The true pairs of a set, each with its kind, and each image's set and class."""
    root: Path
    kinds: dict[Pair, str]  # true pair -> edit, edit1+edit2 or originals
    klass: dict[str, str]  # image -> "<set>/<class>"
    images: list[str] = field(default_factory=list)
    mirrored: set[str] = field(default_factory=set)  # the mirrored copies

    def scored(self, pair: Pair) -> bool:
        """False for the true pairs scored apart: those with a mirrored copy."""
        return pair not in self.kinds or not (pair[0] in self.mirrored or pair[1] in self.mirrored)


def _classes_from_datasets(datasets: Path, rows: list[dict]) -> dict[str, str]:
    """A copies.py set has no class column: look each original's class up in its set."""
    classes = {}
    for name in HARD:
        gt = datasets / name / "groundtruth.csv"
        if gt.exists():
            with open(gt) as f:
                classes.update({f"{name}/{r['path']}": f"{name}/{r['group']}"
                                for r in csv.DictReader(f)})
    return {r["path"]: classes.get(r["group"], r["group"].split("/")[0]) for r in rows}


def load_truth(root: Path, datasets: Path) -> Truth:
    """Read pairs.csv (neardups.py) or the groups of groundtruth.csv (copies.py)."""
    with open(root / "groundtruth.csv") as f:
        rows = list(csv.DictReader(f))
    if "class" in rows[0]:
        klass = {r["path"]: r["class"] for r in rows}
    else:
        klass = _classes_from_datasets(datasets, rows)
    if (root / "pairs.csv").exists():
        with open(root / "pairs.csv") as f:
            kinds = {_pair(r["a"], r["b"]): r["kind"] for r in csv.DictReader(f)}
    else:  # a copies.py set: its groups, joined where two originals are one picture
        paths = {r["path"] for r in rows}
        same = [ps for ps in neardups.known_duplicates() if all(p in paths for p in ps)]
        table = [(r["path"], r["group"], r.get("query"), r.get("edit", "")) for r in rows]
        kinds = {_pair(a, b): k for a, b, k in neardups.true_pairs(table, same)}
    mirrored = {r["path"] for r in rows if r.get("edit") == "mirror"}
    return Truth(root, kinds, klass, [r["path"] for r in rows], mirrored)


def _false_kind(truth: Truth, pair: Pair) -> str:
    ca, cb = truth.klass.get(pair[0], "?"), truth.klass.get(pair[1], "?")
    if ca == cb:
        return HARD.get(ca.split("/")[0], "same class")
    return "other"


def _edit_of(kind: str) -> str:
    return "copy+copy" if "+" in kind else kind


def score(truth: Truth, predicted: set[Pair], wrong_limit: int = 200) -> dict:
    """Precision, recall and F1 over the scored pairs, recall per edit, wrong pairs by kind."""
    true_all = set(truth.kinds)
    scored_true = {p for p in true_all if truth.scored(p)}
    pred = {p for p in predicted if truth.scored(p)}
    hits = pred & scored_true
    wrong = sorted(pred - true_all)
    p = len(hits) / len(pred) if pred else 1.0
    r = len(hits) / len(scored_true) if scored_true else 1.0
    per_edit: dict[str, list[int]] = {}
    for pair, kind in truth.kinds.items():
        found = per_edit.setdefault(_edit_of(kind), [0, 0])
        found[0] += pair in predicted
        found[1] += 1
    by_kind: dict[str, int] = {}
    for pair in wrong:
        k = _false_kind(truth, pair)
        if all(x.startswith("originals/") for x in pair):
            k += " (two originals)"
        by_kind[k] = by_kind.get(k, 0) + 1
    return {
        "precision": round(p, 4), "recall": round(r, 4),
        "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
        "predicted": len(pred), "correct": len(hits), "true": len(scored_true),
        "wrong": len(wrong), "wrong_by_kind": by_kind,
        "recall_by_edit": {k: round(f / n, 4) for k, (f, n) in sorted(per_edit.items())},
        "true_by_edit": {k: n for k, (f, n) in sorted(per_edit.items())},
        "wrong_pairs": [list(w) for w in wrong[:wrong_limit]],
    }


# --- imagededup -------------------------------------------------------------

def _import_hashing():
    """imagededup's hashing classes. Its package __init__ also imports the CNN method
    (torch, torchvision); the hashes themselves need neither."""
    try:
        from imagededup.methods import hashing
    except ImportError as e:
        sys.exit(f"imagededup cannot be imported ({e}): run this with its own venv's python")
    return hashing


def hash_codes(root: Path, method: str, cache: Path | None) -> dict[str, int]:
    """image path (relative to root) -> its 64-bit hash, by imagededup's encode_images."""
    if cache and cache.exists():
        return {k: int(v, 16) for k, v in json.loads(cache.read_text()).items()}
    hasher = getattr(_import_hashing(), method)(verbose=False)
    t = time.time()
    enc = hasher.encode_images(image_dir=root, recursive=True, num_enc_workers=0)
    print(f"{method}: {len(enc)} images hashed in {time.time() - t:.0f}s", file=sys.stderr)
    codes = {str(Path(k)): v for k, v in enc.items() if v}
    if cache:
        cache.write_text(json.dumps(codes))
    return {k: int(v, 16) for k, v in codes.items()}


def hamming_pairs(codes: dict[str, int], max_distance: int) -> dict[int, set[Pair]]:
    """Pairs within each distance 0..max_distance (what find_duplicates reports)."""
    names = sorted(codes)
    h = np.array([codes[n] for n in names], dtype=np.uint64)
    by_distance: dict[int, set[Pair]] = {d: set() for d in range(max_distance + 1)}
    for i in range(len(names) - 1):
        d = np.bitwise_count(h[i] ^ h[i + 1:])
        for j in np.nonzero(d <= max_distance)[0]:
            by_distance[int(d[j])].add(_pair(names[i], names[i + 1 + j]))
    cumulative, acc = {}, set()
    for d in range(max_distance + 1):
        acc |= by_distance[d]
        cumulative[d] = set(acc)
    return cumulative


def check_against_find_duplicates(method: str, codes: dict[str, int], pairs: set[Pair]) -> None:
    """Our pairs at the default distance must be imagededup's own answer."""
    hasher = getattr(_import_hashing(), method)(verbose=False)
    enc = {k: f"{v:016x}" for k, v in codes.items()}
    found = hasher.find_duplicates(encoding_map=enc, max_distance_threshold=DEFAULT_DISTANCE,
                                   num_dist_workers=0)
    theirs = {_pair(a, b) for a, dups in found.items() for b in dups}
    if theirs != pairs:
        sys.exit(f"{method}: find_duplicates gives {len(theirs)} pairs, ours {len(pairs)}")


def run_imagededup(truth: Truth, methods: list[str], cache_dir: Path | None) -> list[dict]:
    """Each hash at the default distance, at its best F1, and at its most recall with
    precision >= 0.99 (the lead's default-threshold rule, for a fair comparison)."""
    rows = []
    for method in methods:
        cache = cache_dir / f"{truth.root.name}.{method}.json" if cache_dir else None
        codes = hash_codes(truth.root, method, cache)
        missing = len(truth.images) - len(codes)
        cumulative = hamming_pairs(codes, max(DISTANCES))
        check_against_find_duplicates(method, codes, cumulative[DEFAULT_DISTANCE])
        sweep = {d: score(truth, cumulative[d]) for d in DISTANCES}
        best = max(DISTANCES, key=lambda d: (sweep[d]["f1"], -d))
        precise = [d for d in DISTANCES if sweep[d]["precision"] >= 0.99]
        points = {"default": DEFAULT_DISTANCE, "best F1": best}
        if precise:
            points["P>=0.99"] = max(precise, key=lambda d: (sweep[d]["recall"], -d))
        for label, d in points.items():
            rows.append({"method": f"imagededup {method}", "point": label, "threshold": d,
                         "unhashed": missing, **sweep[d]})
        rows[-1]["sweep"] = {d: {k: sweep[d][k] for k in ("precision", "recall", "f1")}
                             for d in DISTANCES}
    return rows


# --- lookalike --------------------------------------------------------------

def read_groups(lines, root: Path) -> set[Pair]:
    """Pairs inside each group of `lookalike duplicates --json` (one group per line)."""
    root = root.resolve()
    pairs: set[Pair] = set()
    for line in lines:
        if not line.strip():
            continue
        group = json.loads(line)
        paths = []
        for m in group["members"]:
            p = Path(m["path"])
            paths.append(str(p.resolve().relative_to(root)) if p.is_absolute() else str(p))
        pairs |= {_pair(a, b) for a, b in itertools.combinations(sorted(set(paths)), 2)}
    return pairs


def run_lookalike(cli: str, db: Path, threshold: str) -> list[str]:
    cmd = [cli, "duplicates", "--json", "--db", str(db)]
    if threshold != "default":
        cmd += ["--threshold", threshold]
    t = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()[-500:]}")
    print(f"lookalike duplicates --threshold {threshold}: {time.time() - t:.1f}s",
          file=sys.stderr)
    return out.stdout.splitlines()


def run_thresholds(truth: Truth, cli: str, db: Path, thresholds: list[str]) -> list[dict]:
    """lookalike at each threshold; the best F1 and the most recall at precision
    >= 0.99 among them are marked."""
    rows = [{"method": "lookalike", "point": "default" if t == "default" else "",
             "threshold": t, **score(truth, read_groups(run_lookalike(cli, db, t), truth.root))}
            for t in thresholds]
    if len(rows) > 1:
        best = max(rows, key=lambda r: r["f1"])
        best["point"] = "+".join(p for p in (best["point"], "best F1") if p)
        precise = [r for r in rows if r["precision"] >= 0.99]
        if precise:
            top = max(precise, key=lambda r: r["recall"])
            top["point"] = "+".join(p for p in (top["point"], "P>=0.99") if p)
    return rows


def _lookalike_cli() -> str:
    here = Path(sys.executable).parent / "lookalike"
    return str(here) if here.exists() else (shutil.which("lookalike") or "lookalike")


# --- report -----------------------------------------------------------------

def table(rows: list[dict]) -> str:
    edits = sorted({e for r in rows for e in r["recall_by_edit"]})
    head = ["method", "point", "threshold", "precision", "recall", "F1", "predicted", "wrong",
            "wrong: same landmark/cover/category"]
    lines = ["| " + " | ".join(head + edits) + " |", "|" + "---|" * (len(head) + len(edits))]
    for r in rows:
        hard = sum(n for k, n in r["wrong_by_kind"].items() if k.startswith("same"))
        cells = [r["method"], r["point"], str(r["threshold"]), f"{r['precision']:.3f}",
                 f"{r['recall']:.3f}", f"{r['f1']:.3f}", str(r["predicted"]), str(r["wrong"]),
                 str(hard)]
        cells += [f"{r['recall_by_edit'].get(e, float('nan')):.2f}" for e in edits]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contact_sheet(root: Path, pairs: list[list[str]], out: Path, cell: int = 160) -> None:
    """The wrong pairs side by side, to be checked by eye."""
    from PIL import Image, ImageDraw
    rows = len(pairs)
    sheet = Image.new("RGB", (2 * cell + 30, max(1, rows) * (cell + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, pair in enumerate(pairs):
        for j, p in enumerate(pair):
            with Image.open(root / p) as im:
                im = im.convert("RGB")
                im.thumbnail((cell, cell))
                sheet.paste(im, (j * (cell + 30), i * (cell + 16) + 14))
        draw.text((2, i * (cell + 16)), f"{pair[0]}  ~  {pair[1]}", fill="black")
    sheet.save(out)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set", type=Path, help="a folder from neardups.py or copies.py")
    ap.add_argument("--imagededup", nargs="?", const=",".join(HASHES), default=None,
                    help=f"score imagededup's hashes [{','.join(HASHES)}]")
    ap.add_argument("--lookalike", type=Path, action="append", default=[],
                    help="a file of `lookalike duplicates --json` output (repeatable)")
    ap.add_argument("--lookalike-db", type=Path, help="run `lookalike duplicates` on this database")
    ap.add_argument("--thresholds", default="default",
                    help="comma-separated --threshold values for --lookalike-db [default]")
    ap.add_argument("--lookalike-cli", default=_lookalike_cli())
    ap.add_argument("--datasets", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "datasets",
                    help="the shared sets, for the classes of a copies.py set")
    ap.add_argument("--cache", type=Path, help="a folder keeping the hashes between runs")
    ap.add_argument("--json", type=Path, help="write every figure and the wrong pairs here")
    ap.add_argument("--sheet", type=Path,
                    help="a PNG of the wrong pairs of the first row's method (up to 60)")
    return ap


def report(args: argparse.Namespace, truth: Truth, rows: list[dict]) -> None:
    """The markdown table on stdout, then the JSON and the contact sheet if asked."""
    n_true = len(truth.kinds)
    print(f"{args.set}: {len(truth.images)} images, {n_true} true pairs "
          f"({sum(1 for p in truth.kinds if not truth.scored(p))} with a mirrored copy, "
          "scored apart)\n")
    print(table(rows))
    for r in rows:
        print(f"\n{r['method']} {r['point']} {r['threshold']}: wrong pairs by kind "
              f"{r['wrong_by_kind']}")
    if args.json:
        args.json.write_text(json.dumps({"set": str(args.set), "true_pairs": n_true,
                                         "rows": rows}, indent=1))
    if args.sheet and rows[0]["wrong_pairs"]:
        contact_sheet(args.set, rows[0]["wrong_pairs"][:60], args.sheet)


def main() -> None:
    ap = _parser()
    args = ap.parse_args()
    truth = load_truth(args.set, args.datasets)
    rows: list[dict] = []
    if args.imagededup:
        if args.cache:
            args.cache.mkdir(parents=True, exist_ok=True)
        rows += run_imagededup(truth, args.imagededup.split(","), args.cache)
    for f in args.lookalike:
        with open(f) as lines:
            rows.append({"method": f"lookalike ({f.name})", "point": "file", "threshold": "",
                         **score(truth, read_groups(lines, args.set))})
    if args.lookalike_db:
        rows += run_thresholds(truth, args.lookalike_cli, args.lookalike_db,
                               args.thresholds.split(","))
    if not rows:
        ap.error("nothing to score: give --imagededup, --lookalike or --lookalike-db")
    report(args, truth, rows)


if __name__ == "__main__":
    main()
