"""The vector index at scale: a database of N synthetic descriptors, built and searched
through lookalike's own code (indexer.vectors, search.Searcher), on this machine.

    python bench/scale.py 1000000 [--work DIR] [--key KEY] [--out bench/scale-1M.json]

Descriptors come from bench/synth.py (a model fitted to real Lite0 descriptors; uniform
points on the sphere say nothing about an IVF). Rows are written to a real lookalike
database (float16 blobs, as an index run writes them) with paths in 1,000 folders, so
that ``under`` filters select 0.1 %, 1 % and 10 % of the collection.

Measured, and written to the JSON file as each stage ends (a long run can be read while
it goes): database fill; training, adding and nprobe tuning (the product's ``build``);
bytes per vector on disk and in RAM; ``Searcher`` open time and resident memory, cold
(file pages dropped where the OS lets us) and warm; recall@10 against exact search for
near-duplicate and fresh queries; p50/p95 latency of the search itself
(VectorIndex.search) and of a whole Searcher.search_vectors, at 1 and 2 threads;
filtered recall at each selectivity; and after 20 % of the collection changed (10 %
deleted, 10 % added), that no deleted id is returned and recall holds.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import synth  # noqa: E402

FOLDERS = 1000
QUERIES = 500


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Record:
    """The figures so far, rewritten to ``path`` after each stage."""

    def __init__(self, path: Path, **head):
        self.path, self.data = path, {"machine": machine(), "started": now(), **head}

    def __setitem__(self, key, value):
        self.data[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) / 2**20
    return f"{os.cpu_count()} cores {cpu}, {mem:.0f} GiB RAM"


def path_of(i: int, batch: str = "") -> str:
    return f"/synthetic/f{i % FOLDERS:03d}/{batch}{i:08d}.jpg"


def fill(store, n: int, seed: int) -> None:
    """``n`` rows of synthetic descriptors, committed 50,000 at a time."""
    from sqlalchemy import insert

    from indexer.store import OK, ImageRow, now as stamp, pack_vector

    done, when = 0, stamp()
    with store.session() as s:
        for chunk in synth.descriptors(n, seed=seed, chunk=50_000):
            rows = [dict(path=path_of(done + j), size=1, mtime_ns=0, sha256=None, width=640, height=480,
                         status=OK, error=None, embedding=pack_vector(v), indexed_at=when)
                    for j, v in enumerate(chunk)]
            s.execute(insert(ImageRow), rows)
            store.bump_generation(s)
            s.commit()
            done += len(chunk)
            print(f"  {done} rows", file=sys.stderr, flush=True)


def new_database(db: Path, n: int, seed: int):
    from indexer.recipe import make_recipe
    from indexer.store import Store

    store = Store(db)
    if store.recipe() is None:
        from indexer.backbone import DEFAULT_MODEL, resolve_weights

        recipe = make_recipe(DEFAULT_MODEL, pooling="gem", gem_p=3.0, image_size=448,
                             weights_sha256=resolve_weights(DEFAULT_MODEL, None)[1], local_features="none")
        with store.session() as s:
            store.set_setting(s, "recipe", recipe.to_json())
            store.set_setting(s, "whitening", "none")
            s.commit()
    if store.count("ok") < n:
        fill(store, n, seed)
    return store


def timed_build(store, key: str, rec: Record):
    """vectors.build with each stage timed."""
    from indexer import vectors

    times = {}

    def timing(name, fn):
        def wrapped(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            times[name] = round(time.perf_counter() - t, 1)
            return out
        return wrapped

    real = vectors._train, vectors._fill, vectors.tune
    vectors._train, vectors._fill, vectors.tune = (timing("train_s", real[0]), timing("add_s", real[1]),
                                                   timing("tune_s", real[2]))
    try:
        t = time.perf_counter()
        index = vectors.build(store, key)
        times["total_s"] = round(time.perf_counter() - t, 1)
    finally:
        vectors._train, vectors._fill, vectors.tune = real
    rec["build"] = {"key": key, **times, "layout": index.describe()}
    t = time.perf_counter()
    vectors.save(store, index, store.generation())
    rec["save_s"] = round(time.perf_counter() - t, 1)
    return index


def exact_truth(store, index, q: np.ndarray, k: int = 10, allowed: np.ndarray | None = None) -> np.ndarray:
    from indexer import vectors

    if allowed is None:
        return vectors.exact_neighbours(index, q, k)
    found = store.vectors_by_id(allowed)
    x = index.space(np.stack([found[int(i)] for i in allowed]))
    return vectors._top(q @ x.T, allowed, k)[1]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth))
    return round(hits / max(1, (truth >= 0).sum()), 4)


def latencies(fn, q: np.ndarray) -> dict:
    out = []
    for row in q:
        t = time.perf_counter()
        fn(row[None])
        out.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(float(np.percentile(out, 50)), 2), "p95_ms": round(float(np.percentile(out, 95)), 2)}


def drop_caches(path: Path) -> bool:
    """Evict ``path``'s pages from the page cache (posix_fadvise), so an open is cold."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False


def open_searcher(db: Path, rec: Record, q: np.ndarray) -> None:
    """Open time and memory of a Searcher in a fresh process, cold (the index file's
    pages dropped from the cache) and warm, and its memory after 100 queries."""
    import subprocess

    from indexer import vectors

    np.save(db.with_suffix(".queries.npy"), q[:100])
    for label in ("cold", "warm"):
        if label == "cold":
            drop_caches(vectors.index_path(db))
        out = subprocess.run([sys.executable, __file__, "0", "--probe", str(db)], check=True,
                             capture_output=True, text=True).stdout
        rec[f"open_{label}"] = json.loads(out.strip().splitlines()[-1])


def probe(db: Path) -> None:
    """In this fresh process: open a Searcher, then search 100 queries, printing the time
    and the resident memory (anonymous, and of mapped files) after each step."""
    import faiss  # noqa: F401 - the import is not the index's cost

    from search import Searcher

    def memory() -> dict:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: round(int(fields[k].split()[0]) / 1024, 1) for k in ("RssAnon", "RssFile")}

    before = memory()
    t = time.perf_counter()
    s = Searcher(db)
    took = time.perf_counter() - t
    opened = memory()
    s.search_vectors(np.load(db.with_suffix(".queries.npy")), 10, qe=0)
    after = memory()
    print(json.dumps({"seconds": round(took, 3), "mb_before": before, "mb_opened": opened,
                      "mb_after_100_queries": after}))


def queries_and_truth(store, index, n: int, seed: int):
    q, src = synth.queries(QUERIES, base_n=n, seed=seed)  # held out: a stream of its own
    q = index.space(q)
    return q, src >= 0, exact_truth(store, index, q)


def search_figures(db: Path, store, index, q, dup, truth, rec: Record, label: str = "") -> None:
    import faiss

    from search import Searcher

    found = index.search(q, 10)[1]
    rec[f"recall{label}"] = {"all": recall(found, truth), "near_duplicates": recall(found[dup], truth[dup]),
                             "fresh": recall(found[~dup], truth[~dup])}
    with Searcher(db) as s:
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)
            rec[f"latency{label}_{threads}t"] = {
                "search": latencies(lambda row: index.search(row, 10), q[:200]),
                "searcher": latencies(lambda row: s.search_vectors(row, 10, qe=0), q[:200]),
                "searcher_qe2": latencies(lambda row: s.search_vectors(row, 10), q[:100]),
            }
        rss = rss_mb()
    rec[f"rss_after_queries{label}_mb"] = round(rss, 1)


def filtered(store, index, q, rec: Record) -> None:
    out = {}
    for share, folders in (("0.1%", 1), ("1%", 10), ("10%", 100)):
        allowed = store.ids_under([f"/synthetic/f{i:03d}" for i in range(folders)])
        truth = exact_truth(store, index, q[:100], allowed=allowed)
        t = time.perf_counter()
        found = np.concatenate([index.search(row[None], 10, allowed=allowed)[1] for row in q[:100]])
        ms = (time.perf_counter() - t) * 10  # one query at a time: ms a query
        inside = bool(np.isin(found[found >= 0], allowed).all())
        out[share] = {"images": len(allowed), "recall": recall(found, truth), "mean_ms": round(ms, 2),
                      "all_inside": inside, "full_rows": bool(((found >= 0).sum(axis=1) == 10).all())}
    rec["filtered"] = out


def churn(store, index, n: int, seed: int, rec: Record):
    """10 % of the ids deleted and 10 % new rows added, through the writer's path: rows
    committed, then the open index updated (no rebuild) and saved."""
    from sqlalchemy import delete

    from indexer import vectors
    from indexer.store import ImageRow

    rng = np.random.default_rng(seed + 2)
    ids = store.ok_ids()
    gone = np.sort(rng.choice(ids, len(ids) // 10, replace=False))
    t = time.perf_counter()
    with store.session() as s:
        for start in range(0, len(gone), 500):
            s.execute(delete(ImageRow).where(ImageRow.id.in_(gone[start:start + 500].tolist())))
        store.bump_generation(s)
        s.commit()
    index.remove(gone)
    before = set(store.ok_ids().tolist())
    fill_more(store, len(gone), f"g{store.generation()}-", seed + 3)  # new paths at each run
    new = np.array(sorted(set(store.ok_ids().tolist()) - before), np.int64)
    index.add(new, np.stack([v for _, v in sorted(store.vectors_by_id(new).items())]))
    vectors.save(store, index, store.generation())
    rec["churn"] = {"deleted": len(gone), "added": len(new), "seconds": round(time.perf_counter() - t, 1)}
    return gone


def fill_more(store, count: int, batch: str, seed: int) -> None:
    from sqlalchemy import insert

    from indexer.store import OK, ImageRow, now as stamp, pack_vector

    with store.session() as s:
        done = 0
        for chunk in synth.descriptors(count, seed=seed, chunk=50_000):
            s.execute(insert(ImageRow), [dict(path=path_of(done + j, batch), size=1, mtime_ns=0, sha256=None,
                                              width=640, height=480, status=OK, error=None,
                                              embedding=pack_vector(v), indexed_at=stamp())
                                         for j, v in enumerate(chunk)])
            done += len(chunk)
        store.bump_generation(s)
        s.commit()


def float16_cost(rec: Record, n: int = 200_000, queries: int = 1000) -> None:
    """Recall@10 of exact search over float16-rounded descriptors against float32 ones."""
    from indexer import vectors

    x = np.concatenate(list(synth.descriptors(n, seed=7)))
    q, _ = synth.queries(queries, base_n=n, seed=8)
    x16 = x.astype(np.float16).astype(np.float32)
    ids = np.arange(n, dtype=np.int64)
    truth = vectors._top(q @ x.T, ids, 10)[1]
    found = vectors._top(q @ x16.T, ids, 10)[1]
    cos = (x * x16).sum(axis=1)
    rec["float16"] = {"n": n, "recall_at_10": recall(found, truth),
                      "cosine_to_float32_min": round(float(cos.min()), 7)}


def filters_only(db: Path, n: int, seed: int, rec: Record) -> None:
    """The filter figures again, on an existing database and index."""
    from indexer import vectors
    from indexer.store import Store

    store = Store(db, create=False)
    index = vectors.load(store, mmap=True)
    q, _ = synth.queries(QUERIES, base_n=n, seed=seed)
    filtered(store, index, index.space(q), rec)
    store.close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lookalike-scale"))
    ap.add_argument("--key", help="FAISS key [default: what auto chooses]")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--float16", action="store_true", help="only measure what float16 storage costs")
    ap.add_argument("--reuse", action="store_true", help="keep a current index of the key (no build)")
    ap.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # a fresh process for open_searcher
    ap.add_argument("--filters-only", action="store_true", help="only the filter figures, on an existing run")
    args = ap.parse_args(argv)
    if args.probe:
        return probe(args.probe)
    if args.filters_only:
        db = args.work / f"scale-{args.n}.db"
        rec = Record(args.out or REPO / "bench" / f"scale-{args.n}-filters.json", n=args.n)
        return filters_only(db, args.n, args.seed, rec)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from indexer import vectors

    args.work.mkdir(parents=True, exist_ok=True)
    db = args.work / f"scale-{args.n}.db"
    rec = Record(args.out or REPO / "bench" / f"scale-{args.n}.json", n=args.n)
    if args.float16:
        return float16_cost(rec, args.n)
    t = time.perf_counter()
    store = new_database(db, args.n, args.seed)
    rec["fill_s"] = round(time.perf_counter() - t, 1)
    key = args.key or vectors.choose(args.n, 1280)
    current, _, why = vectors.read(store)
    if args.reuse and current is not None and why is None and current.layout.key == key:
        rec["build"] = {"key": key, "reused": True, "layout": current.describe()}
    else:
        timed_build(store, key, rec)
    faiss_bytes = vectors.index_path(db).stat().st_size
    rec["bytes_per_vector"] = {"faiss_file": round(faiss_bytes / args.n, 1),
                               "database_file": round(db.stat().st_size / args.n, 1)}
    index = vectors.load(store, mmap=True)
    q, dup, truth = queries_and_truth(store, index, args.n, args.seed)
    open_searcher(db, rec, q)
    search_figures(db, store, index, q, dup, truth, rec)
    filtered(store, index, q, rec)
    writer = vectors.load(store)  # in memory, as an index run holds it
    gone = churn(store, writer, args.n, args.seed, rec)
    index = vectors.load(store, mmap=True)
    found = index.search(q, 50)[1]
    truth = exact_truth(store, index, q)
    rec["after_churn"] = {"deleted_returned": int(np.isin(found, gone).sum()),
                          "recall": recall(index.search(q, 10)[1], truth)}
    rec["finished"] = now()
    store.close()


if __name__ == "__main__":
    main()
