#!/usr/bin/env python
"""How verification and the global similarity combine, and how many results to verify.

    python bench/fusion.py record ../shared/datasets/covers50 --db /tmp/covers50.db --out /tmp/fusion
    python bench/fusion.py score /tmp/fusion/covers50.json /tmp/fusion/copies.json

``record`` queries every query image of a labelled set (as ``lookalike evaluate``
does, on a database it indexed) and keeps, for each, the verified shortlist as the
product builds it (the global top 100 and the turned views' nominees) with each
candidate's global rank value, inliers and relevance, in global order. ``score``
re-ranks those shortlists with each rule below and with verification of the first K
only (K <= 100), and prints mAP and precision@1 over the shortlist (relevant images outside it
count as misses, so the figures sit a little below ``evaluate``'s).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHORTLIST = 100  # the recorded shortlist: verification's default depth
sys.path.insert(0, str(ROOT))


def record(root: Path, db: Path, out: Path) -> None:
    from search import Searcher, verify
    from search.evaluate import read_groundtruth

    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def keep_global_order(similarities, inliers):
        seen.append((np.asarray(similarities, float), np.asarray(inliers, float)))
        return np.arange(len(seen[-1][0]))

    verify.rank_order = keep_global_order
    entries = read_groundtruth(root / "groundtruth.csv", root)
    group = {e.path: e.group for e in entries}
    shortlists = {}
    with Searcher(db) as s:
        for e in entries:
            if not e.query:
                continue
            own = s.id_of(e.path)
            matches = s.search(e.path, k=200, exclude=[own] if own is not None else [])
            sims, inliers = seen.pop()
            shortlists[e.path] = {
                "relevant": sum(g == e.group for p, g in group.items() if p != e.path),
                "shortlist": [[float(x), int(n), group.get(m.path) == e.group]
                              for m, x, n in zip(matches, sims, inliers)]}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{root.name}.json").write_text(json.dumps(shortlists))


def capped(a: float = 0.6, b: float = 0.85, cap: int = 60):
    """The first default: the gap to 1 closed by a share growing linearly from a to b."""
    def rule(s, n):
        share = a + (b - a) * (np.clip(n, 10, cap) - 10) / (cap - 10)
        return np.argsort(-np.where(n >= 10, s + (1 - s) * share, s), kind="stable")
    return rule


def power(e: float, cap: float = 1.0):
    """Gap left = 0.4 (10 / inliers)^e, at most closed by ``cap``, for every comparison."""
    def rule(s, n):
        share = np.minimum(cap, 1 - 0.4 * (10 / np.maximum(n, 10)) ** e)
        return np.argsort(-np.where(n >= 10, s + (1 - s) * share, s), kind="stable")
    return rule


def rules() -> dict:
    from search.verify import rank_order

    return {
        "no verification": lambda s, n: np.arange(len(s)),
        "verified first, by inliers": lambda s, n: np.argsort(-np.where(n >= 10, 10 + n, s), kind="stable"),
        "60 % at 10 inliers to 85 % at 60": capped(),
        "60 % at 10 inliers to 95 % at 400": capped(b=0.95, cap=400),
        "gap 0.4 (10/n)^0.5": power(0.5),
        "gap 0.4 (10/n)^1.5": power(1.5),
        "gap 0.4 (10/n), capped at 85 %": power(1.0, 0.85),
        "the default (search.verify.rank_order)": rank_order,
    }


def score(shortlists: dict, rule, depth: int = SHORTLIST) -> tuple[float, float]:
    from search.evaluate import average_precision, precision_at

    aps, firsts = [], []
    for q in shortlists.values():
        rows = np.array(q["shortlist"], float).reshape(-1, 3)
        s, n, rel = rows[:, 0], rows[:, 1].copy(), rows[:, 2].astype(bool)
        n[depth:SHORTLIST] = 0  # the turned views' nominees, after the shortlist, are verified at any K
        rel = rel[rule(s, n)]
        aps.append(average_precision(rel, q["relevant"]))
        firsts.append(precision_at(rel, 1))
    return float(np.mean(aps)), float(np.mean(firsts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record")
    r.add_argument("set", type=Path)
    r.add_argument("--db", type=Path, required=True, help="the set indexed by `lookalike evaluate --db`")
    r.add_argument("--out", type=Path, default=Path("/tmp/fusion"))
    s = sub.add_parser("score")
    s.add_argument("recorded", type=Path, nargs="+")
    args = ap.parse_args()
    if args.command == "record":
        record(args.set, args.db, args.out)
        return
    data = {p.stem: json.loads(p.read_text()) for p in args.recorded}
    print("| rule | " + " | ".join(data) + " |\n|---|" + "---|" * len(data))
    for name, rule in rules().items():
        print(f"| {name} | " + " | ".join("%.3f / %.3f" % score(d, rule) for d in data.values()) + " |")
    from search.verify import rank_order

    print("\n| K | " + " | ".join(data) + " |\n|---|" + "---|" * len(data))
    for depth in (10, 20, 30, 50, 75, 100):
        print(f"| {depth} | " + " | ".join("%.3f / %.3f" % score(d, rank_order, depth) for d in data.values()) + " |")


if __name__ == "__main__":
    main()
