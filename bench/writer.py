"""The ceiling of the one writer of an index run, in descriptors per second.

However many machines embed (Ray actors, --shard runs), every descriptor of a run goes
through one commit loop: Indexer._embed writes each batch's rows (and local features) in
one transaction, moves the generation, and adds the vectors to the in-memory FAISS index.
This feeds that loop synthetic descriptors as fast as it takes them (the embedding engine
replaced by a generator of random unit vectors, nothing decoded), on SQLite and on
PostgreSQL, and prints the rate.

    python bench/writer.py --n 20000 --postgres postgresql://lookalike:lookalike@localhost/postgres
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


def run(db, n: int, batch: int, local: bool) -> float:
    """Descriptors per second through Indexer._embed into ``db`` (a new database)."""
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
        files = [FileStat(f"/synthetic/{i:08}.jpg", 100_000, i) for i in range(n)]
        hashes = {f.path: f"{i:064x}" for i, f in enumerate(files)}
        pipeline.embed_files = synthetic(n, recipe.dim, LOCAL_BYTES if local else 0, batch)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="descriptors per run")
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 256],
                    help="descriptors per commit (index --batch-size)")
    ap.add_argument("--postgres", help="an admin URL of a server where a database may be created")
    args = ap.parse_args()
    os.environ.setdefault("LOOKALIKE_CACHE", tempfile.mkdtemp(prefix="writer-bench-cache-"))
    print("| database | local features | batch | descriptors/s |\n|---|---|---|---|")
    for batch in args.batch:
        for local in (False, True):
            targets = [("SQLite", Path(tempfile.mkdtemp(prefix="writer-bench-")) / "w.db")]
            if args.postgres:
                targets.append(("PostgreSQL", fresh_postgres(args.postgres)))
            for name, db in targets:
                rate = run(db, args.n, batch, local)
                size = f"{LOCAL_BYTES // 1000} KB" if local else "none"
                print(f"| {name} | {size} | {batch} | {rate:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
