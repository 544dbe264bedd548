"""How long `lookalike duplicates` takes on 100,000 images: search.duplicates.find through
search.Searcher, by stage, on a real lookalike database of that size.

    python bench/duptime.py [--src /tmp/neardups.db] [--work /tmp/duptime] [--n 100000]
                            [--out bench/duptime.json] [--keep] [--fix-cache]

No 100,000 real indexed images are at hand, so the database is built from a real one
(``--src``, left untouched: it is copied with SQLite's backup API) and grown to ``--n``
rows with synthetic ones:

- descriptors: bench/synth.py (a model fitted to real descriptors), stored as an index run
  stores them (float16, indexer.store.pack_vector, status ok);
- local features: the real images' stored bytes, cycled (row j gets real image j mod R's).
  ``--features cycled`` (the worst case) keeps them as they are: each picture then stands
  for about 35 rows, all of them near copies of one another that the visual words find and
  every check confirms. ``--features shuffled`` (a collection with few duplicates) moves
  each synthetic row's keypoints to one another's places: its words are still its
  picture's, so the word candidates and their keypoint matching cost as much, but no
  geometry holds and no pixel check runs;
- files: hard links (os.link) to the real files in ``--work``, so the pixel stage decodes
  real pictures; width, height, bytes and mtime are the linked file's; the SHA-256 is a
  distinct random one (no row is the byte-identical twin of another).

Then centring is learned again on the whole collection (what an index run of these
100,000 images would have learned), the vector index is built (exact: 100,000 is
vectors.EXACT_MAX) and saved, and each timed run of ``find`` happens in a fresh process
(so that its peak RSS is its own): the default (os.cpu_count() threads checking pairs)
and one thread. The work folder is deleted at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

CHUNK = 10_000  # synthetic rows written per transaction
FOLDERS = 100  # the links are spread over this many folders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default="/tmp/neardups.db", help="a real database with local features")
    ap.add_argument("--work", default="/tmp/duptime", help="folder for the database and the links")
    ap.add_argument("--n", type=int, default=100_000, help="images in all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", default="default,1", help="runs of find: 'default' or a number each")
    ap.add_argument("--out", default=str(REPO / "bench" / "duptime.json"))
    ap.add_argument("--keep", action="store_true", help="keep the work folder (the database, the links)")
    ap.add_argument("--features", choices=("cycled", "shuffled"), default="cycled",
                    help="synthetic rows' local features: the real ones as they are, or their keypoints' "
                         "places shuffled (see above)")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe(Path(args.probe), args.threads)))
        return

    work = Path(args.work)
    db = work / "dup.db"
    report = {"machine": machine(), "started": now(), "code": code_version(), "src": args.src,
              "n": args.n, "seed": args.seed, "features": args.features}
    try:
        setup = work / "setup.json"  # a database kept (--keep) is used again, with its figures
        if not db.exists():
            setup.write_text(json.dumps(make_database(Path(args.src), db, work / "files", args.n, args.seed,
                                                      args.features)))
        report["setup"] = json.loads(setup.read_text())
        report["disk_mb"] = round(sum(f.stat().st_size for f in work.glob("dup.db*")) / 2**20)
        write(args.out, report)
        report["runs"] = {}
        for threads in args.threads.split(","):
            out = subprocess.run([sys.executable, __file__, "--probe", str(db), "--threads", threads],
                                 check=True, stdout=subprocess.PIPE, text=True).stdout
            report["runs"][threads] = json.loads(out.strip().splitlines()[-1])
            write(args.out, report)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report["finished"] = now()
    write(args.out, report)


# -- the database -----------------------------------------------------------------
def make_database(src: Path, db: Path, links: Path, n: int, seed: int, features: str = "cycled") -> dict:
    """Copy ``src`` to ``db`` and grow it to ``n`` images; the setup's figures."""
    from indexer.store import Store

    db.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    copy_database(src, db)
    store = Store(db, create=False)
    try:
        real = real_rows(store)
        if len(real["ids"]) >= n:
            raise SystemExit(f"{src} already holds {len(real['ids'])} images; ask for more than that")
        fill(store, real, links, n - len(real["ids"]), seed, features)
        fill_s = time.perf_counter() - t
        t = time.perf_counter()
        centring = learn_centring(store)
        centre_s = time.perf_counter() - t
        index_figures = build_index(store)
    finally:
        store.close()
    return {"real_images": len(real["ids"]), "synthetic_images": n - len(real["ids"]),
            "fill_s": round(fill_s, 1), "centring": centring, "centring_s": round(centre_s, 1),
            **index_figures}


def copy_database(src: Path, dst: Path) -> None:
    """A consistent copy of ``src`` (read-only: another process may be using it)."""
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()


def real_rows(store) -> dict:
    """The real images' paths, file facts and local-feature bytes, in id order."""
    from sqlalchemy import select

    from indexer.store import OK, ImageRow

    with store.session() as s:
        rows = s.execute(select(ImageRow.id, ImageRow.path, ImageRow.size, ImageRow.mtime_ns,
                                ImageRow.width, ImageRow.height)
                         .where(ImageRow.status == OK).order_by(ImageRow.id)).all()
    blobs = store.local_features([r.id for r in rows])
    missing = [r.path for r in rows if r.id not in blobs]
    if missing:
        raise SystemExit(f"{store.path}: {len(missing)} images without local features, e.g. {missing[0]}")
    return {"ids": [r.id for r in rows], "rows": rows, "blobs": [blobs[r.id] for r in rows]}


def fill(store, real: dict, links: Path, count: int, seed: int, features: str = "cycled") -> None:
    """``count`` synthetic rows after the real ones, CHUNK per transaction."""
    import synth
    from sqlalchemy import func, insert, select

    from indexer.store import OK, ImageRow, LocalRow, now as stamp, pack_vector

    with store.session() as s:
        first = int(s.execute(select(func.max(ImageRow.id))).scalar()) + 1
    done, when, rows, how = 0, stamp(), real["rows"], features
    rng = random.Random(seed)  # the SHA-256s: distinct, and the same at each run
    for chunk in synth.descriptors(count, seed=seed, chunk=CHUNK):
        images, features = [], []
        for v in chunk:
            j = done + len(images)
            r = rows[j % len(rows)]
            path = link(Path(r.path), links / f"s{j % FOLDERS:02d}", j)
            images.append(dict(id=first + j, path=str(path), size=r.size, mtime_ns=r.mtime_ns,
                               sha256=rng.randbytes(32).hex(), width=r.width, height=r.height, status=OK,
                               error=None, embedding=pack_vector(v), indexed_at=when))
            blob = real["blobs"][j % len(rows)]
            features.append(dict(image_id=first + j, data=shuffled(blob, rng) if how == "shuffled" else blob))
        with store.session() as s:
            s.execute(insert(ImageRow), images)
            s.execute(insert(LocalRow), features)
            store.bump_generation(s)
            s.commit()
        done += len(images)
        print(f"  {done} of {count} synthetic rows", file=sys.stderr, flush=True)


def shuffled(blob: bytes, rng: random.Random) -> bytes:
    """Stored local features (indexer.local's format) with the keypoints' places permuted."""
    import zlib

    from indexer import local

    magic, version, n, dims, w, h, _ = local._HEADER.unpack_from(blob)
    payload = blob[local._HEADER.size:]
    places = [payload[4 * i:4 * i + 4] for i in range(n)]
    rng.shuffle(places)
    payload = b"".join(places) + payload[4 * n:]
    return local._HEADER.pack(magic, version, n, dims, w, h, zlib.crc32(payload)) + payload


def link(real: Path, folder: Path, j: int) -> Path:
    """A hard link to ``real`` in ``folder``, named uniquely by ``j``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{j:06d}_{real.name}"
    if not out.exists():
        os.link(real, out)
    return out


def learn_centring(store) -> str:
    """Centre on the whole collection, as indexer.sync's Indexer._learn does."""
    from indexer.whitening import Moments, learn

    moments = Moments(store.recipe().dim)
    for _, vecs in store.embeddings():
        moments.add(vecs)
    w = learn(moments, "center", learned_at=now())
    with store.session() as s:
        store.set_whitening(s, w)
        s.commit()
    return w.describe()


def build_index(store) -> dict:
    """The index the collection calls for (vectors.choose), built and saved, timed."""
    from indexer import vectors

    count, dim = store.count("ok"), store.recipe().dim
    key = vectors.choose(count, dim)
    t = time.perf_counter()
    index = vectors.build(store, key)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    vectors.save(store, index, store.generation())
    return {"images": count, "index": key, "exact_max": vectors.EXACT_MAX, "index_build_s": round(build_s, 1),
            "index_save_s": round(time.perf_counter() - t, 1)}


# -- one timed run, in its own process ------------------------------------------------
def probe(db: Path, threads: str) -> dict:
    """Open a Searcher on ``db`` and time duplicates.find by stage."""
    from search import Searcher, duplicates

    if threads != "default":
        # The pairs are checked on os.cpu_count() threads: this process is only this run.
        os.cpu_count = lambda: int(threads)
    t = time.perf_counter()
    searcher = Searcher(str(db))
    out = {"code": code_version(), "pair_threads": os.cpu_count(), "open_s": round(time.perf_counter() - t, 1),
           "images": len(searcher), "rss_after_open_mb": rss_mb()}
    marks: dict[str, list[float]] = {}
    totals: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        marks.setdefault(stage, []).append(time.perf_counter())
        totals[stage] = total
        if len(marks[stage]) % 20 == 1 or done == total:
            print(f"  {stage} {done} of {total}", file=sys.stderr, flush=True)

    cpu, busy = time.process_time(), machine_busy_s()
    t = time.perf_counter()
    groups = duplicates.find(searcher, progress=progress)
    end = time.perf_counter()
    out.update(stages(t, end, marks, totals))
    own = time.process_time() - cpu
    out.update(cpu_s=round(own, 1), other_processes_cpu_s=round(machine_busy_s() - busy - own, 1),
               peak_rss_mb=round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), **describe_groups(groups, db))
    return out


def stages(start: float, end: float, marks: dict, totals: dict) -> dict:
    """Wall time per stage from the progress calls, in the order they came: each stage
    ends at its last call (the first also holds what find does before it), and its
    total is the last total it reported; "grouping" is what follows the last stage."""
    out, last = {"total_s": round(end - start, 1)}, start
    for stage, times in sorted(marks.items(), key=lambda kv: kv[1][0]):
        out[f"{stage}_s"] = round(times[-1] - last, 1)
        out[f"{stage}_items"] = totals[stage]
        last = times[-1]
    out["grouping_s"] = round(end - last, 1)
    if "pairs" in marks:
        out["pairs_per_s"] = round(totals["pairs"] / max(out["pairs_s"], 0.1), 1)
    return out


def describe_groups(groups, db: Path) -> dict:
    """How many groups, of which kind and size, and how many hold only real images."""
    synthetic = str(db.parent / "files")
    sizes = [len(g.members) for g in groups]
    real_only = sum(all(not m.path.startswith(synthetic) for m in g.members) for g in groups)
    return {"groups": len(groups), "exact_groups": sum(g.kind == "exact" for g in groups),
            "images_in_groups": sum(sizes), "largest_group": max(sizes, default=0),
            "groups_of_real_images_only": real_only}


# -- bookkeeping ------------------------------------------------------------------------
def code_version() -> str:
    """The commit, and the SHA-256 of search/duplicates.py as it is (it may hold changes)."""
    import hashlib

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    text = (REPO / "search" / "duplicates.py").read_bytes()
    return f"{head}, search/duplicates.py sha256 {hashlib.sha256(text).hexdigest()[:12]}"


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (/proc/stat): others' share of a run."""
    f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def rss_mb() -> int:
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    mem = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) / 2**20
    return f"{os.cpu_count()} cores {cpu}, {mem:.0f} GiB RAM"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def write(path: str, report: dict) -> None:
    Path(path).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
