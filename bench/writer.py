"""The ceiling of the one writer of an index run, in descriptors per second.

However many machines embed (Ray actors, --shard runs), every descriptor of a run goes
through one commit loop: Indexer._embed writes each batch's rows (and local features) in
one transaction, moves the generation, and adds the vectors to the in-memory FAISS index.
This feeds that loop synthetic descriptors as fast as it takes them (the embedding engine
replaced by a generator of random unit vectors, nothing decoded), on SQLite and on
PostgreSQL, and prints the rate. With --writers K, K such loops (processes, as K --shard
runs on K machines would be) write disjoint paths into one PostgreSQL database at once, and
the rate is theirs together: their commits take turns under the server's commits lock.

    python bench/writer.py --n 20000 --postgres postgresql://lookalike:lookalike@localhost/postgres
    python bench/writer.py --n 10000 --batch 256 --writers 2 --postgres postgresql://...
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# About what 500 keypoints take as stored (indexer.local's codec, on camera photos).
LOCAL_BYTES = 20_000


def synthetic(n: int, dim: int, local_bytes: int, batch: int):
    """An embed_files stand-in: Results of random unit vectors, ``batch`` at a time."""
    from indexer.pipeline import Result

    rng = np.random.default_rng(0)
    blob = bytes(local_bytes) if local_bytes else None

    def embed_files(paths, encoder, **_):
        for start in range(0, len(paths), batch):
            count = min(batch, len(paths) - start)
            vecs = rng.standard_normal((count, dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            yield [Result(start + i, vecs[i], 640, 480, local=blob) for i in range(count)]
    return embed_files


def run(db, n: int, batch: int, local: bool, prefix: str = "/synthetic", ready=None) -> float:
    """Descriptors per second through Indexer._embed into ``db``, of ``n`` new images under
    ``prefix``; ``ready`` (a barrier) is waited on when all is set, just before the clock starts."""
    from indexer import Indexer, pipeline, vectors
    from indexer.scan import FileStat
    from indexer.store import Store
    from indexer.sync import Summary

    writer = Indexer(db, workers=0, batch_size=batch, local_features="sift" if local else "none")
    store = Store(writer.db)
    try:
        recipe, _ = writer._bind_recipe(store, "cpu")
        index = vectors.load(store)
        writer._seen, writer._behind = index.generation, False
        files = [FileStat(f"{prefix}/{i:08}.jpg", 100_000, i) for i in range(n)]
        hashes = {f.path: f"{i:064x}" for i, f in enumerate(files)}
        pipeline.embed_files = synthetic(n, recipe.dim, LOCAL_BYTES if local else 0, batch)
        if ready is not None:
            ready.wait()
        start = time.perf_counter()
        writer._embed(store, None, recipe, files, {}, hashes, index, Summary(), None)
        return n / (time.perf_counter() - start)
    finally:
        store.close()


def fresh_postgres(admin: str) -> str:
    import psycopg
    from sqlalchemy import make_url

    url = make_url(admin)
    name = f"lookalike_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(host=url.host, port=url.port or 5432, user=url.username, password=url.password,
                         dbname=url.database, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False)


def _one_writer(db, n, batch, local, k, ready, out) -> None:
    # Summed per-writer rates would overstate a shared ceiling: each reports its span.
    start = time.time()
    run(db, n, batch, local, prefix=f"/synthetic/w{k}", ready=ready)
    out.put((start, time.time()))


def together(db, writers: int, n: int, batch: int, local: bool) -> float:
    """Descriptors per second of ``writers`` processes writing ``n`` each into ``db`` at once:
    all of them over the time from the first start to the last end."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, out = ctx.Barrier(writers), ctx.Queue()
    procs = [ctx.Process(target=_one_writer, args=(db, n, batch, local, k, ready, out))
             for k in range(writers)]
    for p in procs:
        p.start()
    spans = [out.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a writer failed (exit code {p.exitcode})")
    # Each span starts after the barrier; the slowest start is within a millisecond of it.
    first = min(s for s, _ in spans)
    return writers * n / (max(e for _, e in spans) - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="descriptors per run")
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 256],
                    help="descriptors per commit (index --batch-size)")
    ap.add_argument("--postgres", help="an admin URL of a server where a database may be created")
    ap.add_argument("--writers", type=int, default=1,
                    help="processes writing into one PostgreSQL database at once (needs --postgres)")
    args = ap.parse_args()
    if args.writers > 1 and not args.postgres:
        ap.error("--writers needs --postgres: a SQLite file has one writer at a time")
    os.environ.setdefault("LOOKALIKE_CACHE", tempfile.mkdtemp(prefix="writer-bench-cache-"))
    print("| database | writers | local features | batch | descriptors/s |\n|---|---|---|---|---|")
    for batch in args.batch:
        for local in (False, True):
            targets = []
            if args.writers == 1:
                targets.append(("SQLite", Path(tempfile.mkdtemp(prefix="writer-bench-")) / "w.db"))
            if args.postgres:
                targets.append(("PostgreSQL", fresh_postgres(args.postgres)))
            for name, db in targets:
                rate = (run(db, args.n, batch, local) if args.writers == 1
                        else together(db, args.writers, args.n, batch, local))
                size = f"{LOCAL_BYTES // 1000} KB" if local else "none"
                print(f"| {name} | {args.writers} | {size} | {batch} | {rate:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
