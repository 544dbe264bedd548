"""The vector index: which kind a collection gets, a compressed one kept in line with the
database, filters by folder, and float16 descriptors (migrated from float32)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from conftest import index_agrees_with_db, save_photo, sql, vector_index_of
from indexer import Indexer, vectors
from indexer.store import Store
from search import Searcher

SIZE = 128
# A tiny IVF of the kind auto chooses: 2 lists, 32 codes of 4 bits (fast scan); trains on
# 16 images or more.
TINY_IVF = "IVF2,PQ32x4fs"


@pytest.fixture
def db(any_db):
    """Every test here that takes ``db`` runs on SQLite and on PostgreSQL."""
    return any_db


def index(db, *roots, **kw):
    kw.setdefault("image_size", SIZE)
    kw.setdefault("workers", 0)
    kw.setdefault("local_features", "none")
    return Indexer(db, **kw).index(list(roots))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """24 photos in three folders of eight."""
    root = tmp_path / "library"
    for i in range(24):
        save_photo(root / f"f{i % 3}" / f"p{i:02d}.jpg", seed=300 + i, quality=92)
    return root


def test_auto_is_exact_while_small_then_ivf_pq_sized_to_the_memory_budget():
    assert vectors.choose(1000, 1280) == "exact"
    assert vectors.choose(vectors.EXACT_MAX, 1280) == "exact"
    assert vectors.choose(1_000_000, 1280) == "IVF4096,PQ256x4fs"
    assert vectors.choose(10_000_000, 1280) == "IVF16384_HNSW32,PQ256x4fs"
    # A smaller budget: smaller codes; exact only while the float32 vectors fit it.
    assert vectors.choose(10_000_000, 1280, memory=1 << 30) == "IVF16384_HNSW32,PQ128x4fs"
    assert vectors.choose(50_000, 1280, memory=100 << 20) == "IVF1024,PQ256x4fs"
    # Past 4,096 lists an HNSW graph finds them; a dimension no code size divides is rotated.
    assert vectors.choose(100_000_000, 1280) == "IVF32768_HNSW32,PQ64x4fs"
    assert vectors.choose(1_000_000, 1000) == "PCAR256,IVF4096,PQ128x4fs"
    # Once compressed, it goes back to exact only well below the line.
    ivf = vectors.Layout("IVF1024,PQ256x4fs", trained_on=200_000)
    assert vectors.choose(80_000, 1280, current=ivf) != "exact"
    assert vectors.choose(40_000, 1280, current=ivf) == "exact"
    assert vectors.choose(10, 1280, "exact") == "exact"
    assert vectors.parse_memory("2G") == 2 << 30 and vectors.parse_memory("512MiB") == 512 << 20
    with pytest.raises(ValueError, match="not a size"):
        vectors.parse_memory("lots")


def test_a_bad_index_choice_is_refused_in_one_line_and_nothing_changes(library, db):
    index(db, library)
    result = run("index", library, "--db", db, "--index", "HNSW32")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: 'HNSW32': not an IVF index; use 'exact', 'auto' or a FAISS key with IVF "
        "(for example IVF4096,PQ128x4fs)"]
    result = run("index", library, "--db", db, "--index", "IVF4,Bogus")
    assert result.exit_code == 1 and "'IVF4,Bogus': FAISS cannot build it" in result.output
    # 24 images cannot train 64 lists: refused, the database keeps its exact index.
    result = run("index", library, "--db", db, "--index", "IVF64,PQ2x4")
    assert result.exit_code == 1 and "cannot be trained on 24 images" in result.output
    assert run("index", library, "--db", db, "--memory", "lots").exit_code == 2
    info = json.loads(run("info", "--db", db, "--json").output)["vector_index"]
    assert (info["key"], info["choice"]) == ("exact", "auto")  # the refused choice is not kept
    assert run("index", library, "--db", db).exit_code == 0  # so later runs work
    index_agrees_with_db(db)


def test_a_compressed_index_finds_what_exact_search_finds_and_follows_changes(library, db):
    index(db, library)
    with Searcher(db) as s:
        exact = [[(m.path, round(m.score, 4)) for m in s.search(p, k=5, qe=0)]
                 for p in sorted(library.rglob("*.jpg"))[:6]]
    index(db, library, index=TINY_IVF)
    info = json.loads(run("info", "--db", db, "--json").output)["vector_index"]
    assert info["key"] == TINY_IVF and info["trained_on"] == 24 and info["choice"] == TINY_IVF
    assert info["recall"] >= vectors.TARGET_RECALL and info["current"]
    assert TINY_IVF in run("info", "--db", db).output
    with Searcher(db) as s:
        assert s.index.layout.key == TINY_IVF and len(s) == 24
        # The shortlist is re-ranked by exact cosines: the same results and scores.
        got = [[(m.path, round(m.score, 4)) for m in s.search(p, k=5, qe=0)]
               for p in sorted(library.rglob("*.jpg"))[:6]]
        assert got == exact
    # Incremental: a file deleted, one added, one changed; no new training.
    (library / "f0" / "p00.jpg").unlink()
    save_photo(library / "f1" / "new.jpg", seed=900)
    save_photo(library / "f2" / "p02.jpg", seed=901, quality=80)
    summary = index(db, library)
    assert (summary.added, summary.updated, summary.removed) == (1, 1, 1)
    assert len(index_agrees_with_db(db)) == 24
    indexed, store = vector_index_of(db)
    try:
        assert indexed.layout.trained_on == 24  # kept: not outgrown
    finally:
        store.close()
    with Searcher(db) as s:
        top = s.search(library / "f1" / "new.jpg", k=3)
        assert top[0].path == str(library / "f1" / "new.jpg") and top[0].score > 0.999
        assert str(library / "f0" / "p00.jpg") not in {m.path for m in s.search(library / "f0" / "p03.jpg", k=24)}
    result = run("check", "--db", db)
    assert result.exit_code == 0, result.output
    assert f"recall@10 1.000 of {TINY_IVF}" in result.output
    # Back to exact on request.
    index(db, library, index="exact")
    assert json.loads(run("info", "--db", db, "--json").output)["vector_index"]["key"] == "exact"
    index_agrees_with_db(db)


def test_a_compressed_index_is_trained_again_once_outgrown(library, tmp_path, db, monkeypatch):
    first = tmp_path / "first"
    for i in range(16):
        save_photo(first / f"q{i:02d}.jpg", seed=500 + i)
    index(db, first, index=TINY_IVF)
    monkeypatch.setattr(vectors, "RETRAIN_FACTOR", 2)
    index(db, first, library)  # 40 images: more than twice the 16 it was trained on
    indexed, store = vector_index_of(db)
    try:
        assert indexed.layout.key == TINY_IVF and indexed.layout.trained_on == 40
    finally:
        store.close()


def test_under_keeps_the_k_best_images_of_the_folders(library, db):
    index(db, library)
    query = library / "f0" / "p00.jpg"
    with Searcher(db) as s:
        every = s.search(query, k=24, qe=0)
        got = s.search(query, k=5, qe=0, under=library / "f1")
        assert [m.path for m in got] == [m.path for m in every if "/f1/" in m.path][:5]
        both = s.search(query, k=20, under=[library / "f1", str(library / "f2") + "/"])
        assert len(both) == 16 and all("/f0/" not in m.path for m in both)
        assert s.search(query, k=5, under=library / "nowhere") == []
        # A folder whose name starts like another's is not inside it.
        assert s.search(query, k=5, under=library / "f") == []
    result = run("query", query, "--db", db, "-k", "3", "--under", library / "f2", "--json")
    assert result.exit_code == 0, result.output
    paths = [m["path"] for m in json.loads(result.output)["results"]]
    assert len(paths) == 3 and all(p.startswith(str(library / "f2") + "/") for p in paths)


@pytest.mark.parametrize("small_filter", [vectors.SMALL_FILTER, 0], ids=["exact", "selector"])
def test_under_works_on_a_compressed_index_too(library, db, monkeypatch, small_filter):
    # 0: no filter is small, so the ids go to FAISS as a selector (with widening).
    monkeypatch.setattr(vectors, "SMALL_FILTER", small_filter)
    index(db, library, index=TINY_IVF)
    with Searcher(db) as s:
        got = s.search(library / "f0" / "p00.jpg", k=8, under=library / "f2")
        assert sorted(m.path for m in got) == sorted(str(p) for p in (library / "f2").glob("*.jpg"))
        three = s.search(library / "f0" / "p00.jpg", k=3, qe=0, under=library / "f1")
        every = [m for m in s.search(library / "f0" / "p00.jpg", k=24, qe=0) if "/f1/" in m.path]
        assert [m.path for m in three] == [m.path for m in every[:3]]


def test_descriptors_are_stored_as_float16_and_float32_databases_are_migrated(library, db):
    index(db, library)
    assert {len(b) for (b,) in sql(db, "select embedding from images")} == {2 * 1280}
    if isinstance(db, Path):
        assert sql(db, "pragma page_size") == [(8192,)]  # three rows a page
    query = library / "f1" / "p04.jpg"
    with Searcher(db) as s:
        before = [(m.path, m.score) for m in s.search(query, k=6)]
    # What lookalike wrote before: float32 rows at schema 0003.
    for i, blob in sql(db, "select id, embedding from images"):
        sql(db, "update images set embedding = :blob where id = :id",
            blob=np.frombuffer(blob, "<f2").astype("<f4").tobytes(), id=i)
    assert {len(b) for (b,) in sql(db, "select embedding from images")} == {4 * 1280}
    sql(db, "drop index ix_images_status")
    sql(db, "update alembic_version set version_num = '0003'")
    Store(db).close()
    assert {len(b) for (b,) in sql(db, "select embedding from images")} == {2 * 1280}
    assert sql(db, "select version_num from alembic_version") == [("0004",)]
    with Searcher(db) as s:
        after = [(m.path, m.score) for m in s.search(query, k=6)]
    assert [p for p, _ in after] == [p for p, _ in before]
    assert np.allclose([x for _, x in after], [x for _, x in before], atol=1e-6)
    assert run("check", "--db", db).exit_code == 0


def test_an_augmented_index_is_made_once_and_refused_for_a_compressed_one(library, db):
    index(db, library)
    with Searcher(db, dba=1) as s:
        made = s.index
        for p in sorted(library.rglob("*.jpg"))[:2]:
            assert s.search(p, k=3)[0].path == str(p)
        assert s.index is made  # not made again at each search
    index(db, library, index=TINY_IVF)
    with pytest.raises(ValueError, match="needs an exact index"):
        Searcher(db, dba=1)
