"""Tuning measured as a user would: `lookalike evaluate HALF_B --tune-on HALF_A`.

Each shared set is split by group (seeded): half A's images and half B's are
hard-linked into two folders, each with its own groundtruth.csv. Then B is
evaluated untuned and tuned on A, whose groups it never saw; and whole sets
are evaluated tuned on another kind of data (does tuning on covers hurt
corel1k?). Each evaluation is a `lookalike evaluate` process of its own, timed
by /usr/bin/time for its peak memory; the tuning's time is the one it reports.

    python bench/tune_eval.py DATASETS OUT [--verify] [--method whiten]

$SETS (comma-separated) limits the split sets; CROSS=0 leaves out the cross-set runs.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.evaluate import read_groundtruth  # noqa: E402

SPLIT_SETS = ("covers50", "paris250", "corel1k", "flowers12")
CROSS = (("covers50", "corel1k"), ("covers50", "paris250"), ("covers50", "copies"),
         ("paris250", "covers50"), ("corel1k", "covers50"))
# (corel1k has 10 categories: fine-tuned on it, 1,000 pictures take about 15 minutes here)


def halves(root: Path, out: Path, seed: int = 0) -> tuple[Path, Path]:
    """Folders A and B of hard links to ``root``'s images, split by group, each with its CSV."""
    entries = read_groundtruth(root / "groundtruth.csv", root)
    groups = sorted({e.group for e in entries})
    rng = np.random.default_rng(seed)
    first = set(rng.permutation(groups)[: len(groups) // 2])
    folders = (out / f"{root.name}-A", out / f"{root.name}-B")
    for half, folder in zip((True, False), folders):
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "groundtruth.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "group"])
            for e in entries:
                if (e.group in first) == half:
                    rel = os.path.relpath(e.path, root)
                    dst = folder / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    if not dst.exists():
                        os.link(e.path, dst)
                    w.writerow([rel, e.group])
    return folders


def score(dataset: Path, verify: bool, tune_on: Path | None = None, method: str = "whiten") -> dict:
    """`lookalike evaluate` as a process of its own: its scores, the tuning's time, the peak memory."""
    cli = Path(sys.executable).with_name("lookalike")
    args = ["/usr/bin/time", "-f", "peak %M", str(cli), "evaluate", str(dataset), "--json"]
    if not verify:
        args += ["--verify", "0", "--local-features", "none"]
    if tune_on is not None:
        args += ["--tune-on", str(tune_on), "--tune-method", method]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(next(line for line in out.stderr.splitlines()[::-1] if line.startswith("Error:")))
    e = json.loads(out.stdout.strip().splitlines()[-1])
    seconds = float(e["tuning"].split(" in ")[1].split("s,")[0]) if e["tuning"] else None
    return {"map": e["map"], "p1": e["precision_at_1"], "queries": e["queries"], "tuning": e["tuning"],
            "seconds": seconds, "peak_mb": int(out.stderr.rsplit("peak ", 1)[1].split()[0]) / 1024}


def main(datasets: str, out: str, verify: bool = False, method: str = "whiten") -> None:
    datasets, out = Path(datasets), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"## held-out half (verify {'default' if verify else 0}, method {method})")
    print("| set | labelled images (A) | queries (B) | untuned mAP | tuned mAP | gain | untuned P@1 | "
          "tuned P@1 | tuning time | peak memory of the run |")
    for name in os.environ.get("SETS", ",".join(SPLIT_SETS)).split(","):
        a, b = halves(datasets / name, out)
        base = score(b, verify)
        n_a = len(read_groundtruth(a / "groundtruth.csv", a))
        try:
            tuned = score(b, verify, tune_on=a, method=method)
        except RuntimeError as exc:  # refused: say why
            print(f"| {name} | {n_a} | {base['queries']} | {base['map']:.3f} | refused: {exc} |", flush=True)
            rows.append({"set": name, "base": base, "refused": str(exc)})
            continue
        rows.append({"set": name, "base": base, "tuned": tuned})
        print(f"| {name} | {n_a} | {base['queries']} | {base['map']:.3f} | {tuned['map']:.3f} | "
              f"{tuned['map'] - base['map']:+.3f} | {base['p1']:.3f} | {tuned['p1']:.3f} | "
              f"{tuned['seconds']:.0f} s | {tuned['peak_mb']:.0f} MB |", flush=True)
    print(f"\n## tuned on one whole set, measured on another (verify {'default' if verify else 0})")
    print("| tuned on | measured on | untuned mAP | tuned mAP | gain |")
    untuned: dict[str, dict] = {}
    for src, dst in CROSS if os.environ.get("CROSS", "1") != "0" else ():
        droot = datasets / dst if dst != "copies" else Path("/tmp/copies")
        if not (droot / "groundtruth.csv").exists():
            continue
        if dst not in untuned:
            untuned[dst] = score(droot, verify)
        try:
            tuned = score(droot, verify, tune_on=datasets / src, method=method)
        except RuntimeError as exc:  # refused: say why
            print(f"| {src} | {dst} | {untuned[dst]['map']:.3f} | refused: {exc} | |", flush=True)
            continue
        rows.append({"tuned_on": src, "set": dst, "base": untuned[dst], "tuned": tuned})
        print(f"| {src} | {dst} | {untuned[dst]['map']:.3f} | {tuned['map']:.3f} | "
              f"{tuned['map'] - untuned[dst]['map']:+.3f} |", flush=True)
    (out / f"tune_eval-{method}-verify{int(verify)}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    method = sys.argv[sys.argv.index("--method") + 1] if "--method" in sys.argv else "whiten"
    if method in args:
        args.remove(method)
    main(*args[:2], verify="--verify" in sys.argv, method=method)
