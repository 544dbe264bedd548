"""Retrieval quality of recipes and query options on labelled sets, through `lookalike evaluate`.

    python bench/quality.py ../shared/datasets [--sets paris250,corel1k,flowers12] [--rows all]

Each row runs `lookalike evaluate SET ARGS --json` as a separate process and
prints a Markdown table row of mAP, P@1, R@100 and speeds, with the command
that reproduces it. The table in bench/QUALITY.md comes from this script.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROWS = {
    "default": "",
    "224 px baseline": "--image-size 224 --whiten none --qe 0 --scales 1",
    "448 px": "--whiten none --qe 0 --scales 1",
    "448 px, centred": "--qe 0 --scales 1",
    "448 px, centred, α-QE 5": "--scales 1 --qe 5",
    "320 px, centred": "--image-size 320 --qe 0 --scales 1",
    "GeM p=2, centred": "--gem-p 2 --qe 0 --scales 1",
    "SPoC, centred": "--pooling spoc --qe 0 --scales 1",
    "R-MAC, centred": "--pooling rmac --qe 0 --scales 1",
    "multi-scale 1, 0.707, 0.5, centred": "--scales multi --qe 0",
    "block7+head, centred": "--layer block7+head --qe 0 --scales 1",
    "block4 (colour, texture), centred": "--layer block4 --qe 0 --scales 1",
    "448 px, centred, α-QE 5 + DBA 1": "--dba 1 --scales 1 --qe 5",
    "448 px, centred, α-QE 5 + rotations": "--rotations --scales 1 --qe 5",
    "448 px, centred, α-QE 5 + flip": "--flip --scales 1 --qe 5",
    "Lite1, centred": "--model efficientnet_lite1 --qe 0 --scales 1",
    "Lite2, centred": "--model efficientnet_lite2 --qe 0 --scales 1",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("datasets", type=Path, help="folder holding the sets")
    ap.add_argument("--sets", default="paris250,corel1k,flowers12")
    ap.add_argument("--rows", default="all", help="comma-separated row numbers (1-based) or all")
    args = ap.parse_args()
    rows = list(ROWS.items())
    if args.rows != "all":
        rows = [rows[int(i) - 1] for i in args.rows.split(",")]
    print("| set | recipe | mAP | P@1 | R@100 | index images/s | queries/s | command |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.sets.split(","):
        for label, extra in rows:
            cmd = ["lookalike", "evaluate", str(args.datasets / name), *extra.split(), "--json"]
            proc = subprocess.run([sys.executable, "-c", "import cli; cli.main()", *cmd[1:]],
                                  capture_output=True, text=True,
                                  cwd=Path(__file__).resolve().parents[1])
            if proc.returncode:
                print(f"| {name} | {label} | failed: {proc.stderr.strip().splitlines()[-1]} |||||"
                      f" `{' '.join(cmd[:-1])}` |", flush=True)
                continue
            r = json.loads(proc.stdout)
            shown = " ".join(["lookalike", "evaluate", f"../shared/datasets/{name}", *extra.split()])
            print(f"| {name} | {label} | {r['map']:.3f} | {r['precision_at_1']:.3f} | "
                  f"{r['recall']['100']:.3f} | {r['index_images_per_s']:.1f} | "
                  f"{r['queries_per_s']:.1f} | `{shown}` |", flush=True)


if __name__ == "__main__":
    main()
