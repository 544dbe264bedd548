#!/usr/bin/env python
"""Index one folder of photos twice, in this process's way and on Ray, and say where Ray's time goes.

Both runs are whole ``lookalike index`` processes on fresh databases, timed from
outside (interpreter start, imports, scan, hash, embed, write): a plain run, then
a ``--ray`` run, in Ray local mode unless --address names a cluster. The ONNX
export is a one-time step cached on disk; a one-image run does it, untimed,
first. From the Ray run's log (``-v``) come its stages: Ray's start; when each
actor was ready after the embedding began (its process started, lookalike
imported, the model loaded) and how much of that was the model; the first
results; the embedding rate after them; and the two stages of the Ray run: how
many decode tasks ran beside the embedding actors, and the time each stage spent
per file (decode tasks: decoding and local features; actors: the model).
Last, a check that both databases hold the same descriptors.

    python bench/raybench.py                         # 10 photos from /usr/share/backgrounds
    python bench/raybench.py --images ~/Pictures --count 500 --batch-size 16
    python bench/raybench.py --address ray://head:10001 --images /mnt/shared/photos
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import (busy_warning, db_vectors, lookalike_command, parse_summary, run_timed,  # noqa: E402
                   say)  # bench/bench.py

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Lines of indexer.cluster's log (lookalike -v), as "lookalike: MESSAGE".
RAY_START_RE = re.compile(r"Ray (?:started locally|connected to \S+) in ([\d.]+) s")
ACTOR_RE = re.compile(r"a Ray actor was ready ([\d.]+) s after the start \(its model took ([\d.]+) s\)")
FIRST_RE = re.compile(r"first results from Ray after ([\d.]+) s")
DONE_RE = re.compile(r"embedded \d+ files on Ray in ([\d.]+) s"
                     r"(?:, ([\d.]+) files/s after the first results)?")
ACTORS_RE = re.compile(r"on Ray: (\d+) actors(?: \([^)]*\), (\d+) decode tasks at once)?")
STAGES_RE = re.compile(r"Ray stages: decode tasks [\d.]+ s \(([\d.]+) ms a file\), "
                       r"embedding actors [\d.]+ s \(([\d.]+) ms a file\)")


def photo_set(images: Path | None, count: int, folder: Path) -> list[Path]:
    """``count`` photos from ``images`` (linked, not copied), or seeded pictures made here."""
    folder.mkdir(parents=True)
    found = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and p.is_file()) if images and images.is_dir() else []
    if found:
        out = []
        for i, src in enumerate(found[:count]):
            out.append(folder / f"{i:04d}_{src.name}")
            out[-1].symlink_to(src.resolve())
        return out
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_photo

    out = [folder / f"{i:04d}.jpg" for i in range(count)]
    for i, path in enumerate(out):
        make_photo(i, (1600, 1200) if i % 4 else (1200, 1600)).save(path, quality=90)
    return out


def ray_stages(log: str) -> dict:
    """Where the Ray run's time went, from its -v log."""
    def first(rx, group=1):
        m = rx.search(log)
        return float(m.group(group)) if m and m.group(group) else None

    ready = [(float(a), float(b)) for a, b in ACTOR_RE.findall(log)]
    actors = ACTORS_RE.search(log)
    return {"ray_start_s": first(RAY_START_RE), "actors": int(actors.group(1)) if actors else None,
            "decode_tasks": int(actors.group(2)) if actors and actors.group(2) else None,
            "decode_ms_per_file": first(STAGES_RE), "embed_ms_per_file": first(STAGES_RE, 2),
            "actor_ready_s": [a for a, _ in ready], "model_load_s": [b for _, b in ready],
            "first_results_s": first(FIRST_RE),
            "embed_s": first(DONE_RE), "steady_files_per_s": first(DONE_RE, 2)}


def same_descriptors(db_a: Path, db_b: Path) -> tuple[int, float]:
    """(images in both, largest difference of a descriptor component between them)."""
    a, b = db_vectors(db_a), db_vectors(db_b)
    common = sorted(set(a) & set(b))
    diff = max((float(np.abs(a[p] - b[p]).max()) for p in common), default=0.0)
    return len(common), diff


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def span(values) -> str:
    """min-max of ``values`` (one per actor), or the one value."""
    if not values:
        return "-"
    return f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| run | process s | index s | embedded | files/s | Ray start s | actors | decode tasks | "
             "actors ready s | model load s | first results s | steady files/s | "
             "decode ms/file | embed ms/file |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['wall_s']:.1f} | {r['seconds']:.1f} | {r['embedded']} | "
                     f"{r['embedded'] / r['wall_s']:.2f} | {fmt(r.get('ray_start_s'))} | "
                     f"{fmt(r.get('actors'), 'd')} | {fmt(r.get('decode_tasks'), 'd')} | "
                     f"{span(r.get('actor_ready_s'))} | "
                     f"{span(r.get('model_load_s'))} | {fmt(r.get('first_results_s'))} | "
                     f"{fmt(r.get('steady_files_per_s'))} | {fmt(r.get('decode_ms_per_file'))} | "
                     f"{fmt(r.get('embed_ms_per_file'))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=Path, default=Path("/usr/share/backgrounds"),
                    help="folder of photos (any depth); if none is there, seeded pictures are made")
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=None, help="for both runs [lookalike's default]")
    ap.add_argument("--workers", type=int, default=None, help="decoding processes of the plain run")
    ap.add_argument("--address", help="a Ray cluster to use [default: a local instance per run]")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lookalike-raybench-"))
    env = dict(os.environ)
    if not args.address:
        env.pop("RAY_ADDRESS", None)  # local mode means a local instance, not one named elsewhere
    common = [] if args.batch_size is None else ["--batch-size", str(args.batch_size)]
    plain = common + ([] if args.workers is None else ["--workers", str(args.workers)])
    ray = common + ["--ray"] + ([args.address] if args.address else [])
    try:
        paths = photo_set(args.images, args.count, tmp / "photos")
        say(f"{len(paths)} photos in {tmp / 'photos'}; {os.cpu_count()} CPUs{busy_warning()}")
        cmd = lookalike_command()
        run_timed(cmd + ["index", str(paths[0]), "--db", str(tmp / "warm.db")], env)  # ONNX export
        rows = []
        for name, extra in (("plain", plain), ("ray", ray)):
            db = tmp / f"{name}.db"
            # -v after the command's name would be taken as its option: it goes first.
            wall, proc = run_timed(cmd + ["-v", "index", str(tmp / "photos"), "--db", str(db)] + extra, env)
            log = proc.stdout + proc.stderr
            row = {"run": name, "wall_s": wall, **parse_summary(log)}
            if name == "ray":
                row.update(ray_stages(log))
            rows.append(row)
        both, diff = same_descriptors(tmp / "plain.db", tmp / "ray.db")
        say()
        say(table(rows))
        say()
        say(f"descriptors: {both} images in both databases, largest difference {diff:.2e}")
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "common": both, "max_diff": diff}, indent=1))
    finally:
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
