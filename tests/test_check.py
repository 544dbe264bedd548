"""`lookalike check` finds each planted inconsistency, and `--repair` mends it without losing good embeddings."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from conftest import faiss_file, index_agrees_with_db, save_photo, sql
from indexer import Indexer
from indexer.check import check
from indexer.store import describe, pack_vector, resolve_db, unpack_vector
from search import Searcher


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def db(any_db):
    """Every test here runs on SQLite and on PostgreSQL."""
    return any_db


def embeddings(db) -> dict[str, bytes]:
    return {path: bytes(blob) for path, blob in sql(db, "select path, embedding from images where status = 'ok'")}


def consistent(db, photos: Path) -> None:
    """The state every repair must end in: check is clean and FAISS equals the database."""
    report = check(db, sample=-1)
    assert report.ok and not report.problems, [p.line() for p in report.problems]
    index_agrees_with_db(db)
    on_disk = {str(p) for p in photos.rglob("*") if p.is_file()}
    assert {p for (p,) in sql(db, "select path from images")} <= on_disk


@pytest.fixture
def indexed(photos, db):
    Indexer(db, workers=0).index([photos])
    return photos, db


def test_a_consistent_index_passes(indexed):
    photos, db = indexed
    result = run("check", "--db", db)
    assert result.exit_code == 0, result.output
    assert "6 indexed images (6 in FAISS), 0 failed, 6 files checked, 6 embeddings recomputed" in result.output
    assert result.output.strip().endswith("all consistent")


def test_a_deleted_faiss_file_is_found_and_rebuilt(indexed):
    photos, db = indexed
    path = faiss_file(db)
    path.unlink()
    result = run("check", "--db", db)
    assert result.exit_code == 1
    assert f"faiss: {path}: the FAISS file is missing" in result.output
    assert "'lookalike check --repair' fixes 1 of them" in result.output
    result = run("check", "--db", db, "--repair")
    assert result.exit_code == 0, result.output
    assert "fixed: faiss:" in result.output
    consistent(db, photos)


def test_an_extra_row_is_found_and_dropped(indexed):
    photos, db = indexed
    before = embeddings(db)
    ghost = str(photos / "ghost.jpg")
    sql(db, "insert into images (path, size, mtime_ns, sha256, status, embedding, indexed_at) "
        "select :ghost, size, mtime_ns, sha256, status, embedding, indexed_at from images "
        "where id = 1", ghost=ghost)
    result = run("check", "--db", db)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert f"file: {ghost}: the file is gone" in lines
    assert any(line.startswith("faiss:") and "it lacks 1 of the database's images" in line
               for line in lines), result.output
    assert run("check", "--db", db, "--repair").exit_code == 0
    assert embeddings(db) == before
    consistent(db, photos)


def test_a_vanished_image_file_is_dropped_and_the_rest_kept_bit_for_bit(indexed):
    photos, db = indexed
    before = embeddings(db)
    (photos / "p3.jpg").unlink()
    result = run("check", "--db", db, "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert [p["message"] for p in report["problems"]] == [f"{photos / 'p3.jpg'}: the file is gone"]
    result = run("check", "--db", db, "--repair", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"]
    del before[str(photos / "p3.jpg")]
    assert embeddings(db) == before
    consistent(db, photos)
    with Searcher(db) as s:
        assert len(s) == 5


def test_a_changed_recipe_is_found_and_restored(indexed):
    photos, db = indexed
    before = embeddings(db)
    [(value,)] = sql(db, "select value from settings where key = 'recipe'")
    recipe = json.loads(value)
    recipe["image_size"] = 224
    sql(db, "update settings set value = :value where key = 'recipe'", value=json.dumps(recipe, sort_keys=True))
    result = run("check", "--db", db)
    assert result.exit_code == 1
    assert ("recipe: the database's recipe is not the one its FAISS file was built with "
            "(image_size: FAISS file has 448, database 224)") in result.output
    result = run("check", "--db", db, "--repair")
    assert result.exit_code == 0, result.output
    assert embeddings(db) == before
    [(value,)] = sql(db, "select value from settings where key = 'recipe'")
    assert json.loads(value)["image_size"] == 448
    consistent(db, photos)


def test_damaged_and_swapped_embeddings_are_recomputed(indexed):
    photos, db = indexed
    fresh = embeddings(db)
    # One embedding scaled (no longer unit length), one swapped for another image's.
    vec = unpack_vector(fresh[str(photos / "p1.jpg")], 1280) * 2
    update = "update images set embedding = :blob where path = :path"
    sql(db, update, blob=pack_vector(vec), path=str(photos / "p1.jpg"))
    sql(db, update, blob=fresh[str(photos / "p4.jpg")], path=str(photos / "p2.jpg"))
    result = run("check", "--db", db, "--all")
    assert result.exit_code == 1
    assert f"row: {photos / 'p1.jpg'} (id 2): its embedding is not unit length (norm 2.0000)" in result.output
    assert f"row: {photos / 'p2.jpg'} (id 3): its embedding differs from a fresh computation" in result.output
    # The scaled one is the same direction: the index holds unit vectors, so only the swap shows.
    assert "1 of its vectors differ from the database's" in result.output
    assert run("check", "--db", db, "--repair", "--all").exit_code == 0
    repaired = embeddings(db)
    for path, blob in fresh.items():
        assert np.allclose(unpack_vector(repaired[path], 1280), unpack_vector(blob, 1280), atol=1e-3), path
    consistent(db, photos)


def test_a_file_changed_on_disk_is_embedded_again(indexed):
    photos, db = indexed
    save_photo(photos / "p0.jpg", seed=99, quality=92)
    result = run("check", "--db", db)
    assert result.exit_code == 1
    assert f"file: {photos / 'p0.jpg'}: changed on disk since it was indexed" in result.output
    assert run("check", "--db", db, "--repair").exit_code == 0
    consistent(db, photos)
    with Searcher(db) as s:
        assert s.search(photos / "p0.jpg", k=1)[0].score > 0.999


def test_a_truncated_faiss_file_and_leftover_temp_files_are_mended(indexed):
    photos, db = indexed
    path = faiss_file(db)
    path.write_bytes(path.read_bytes()[:100])
    tmp = path.with_name(f".{path.name}.abc123.tmp")
    tmp.write_bytes(b"half a file")
    result = run("check", "--db", db)
    assert result.exit_code == 1
    assert f"temp: {tmp}: a temporary file left by an interrupted run" in result.output
    assert f"faiss: {path}: unreadable (" in result.output
    assert run("check", "--db", db, "--repair").exit_code == 0
    assert not tmp.exists()
    consistent(db, photos)


def test_a_missing_folder_is_reported_but_its_rows_are_kept(indexed):
    photos, db = indexed
    shutil.rmtree(photos / "sub")
    result = run("check", "--db", db, "--repair")
    assert result.exit_code == 1
    assert (f"file: {photos / 'sub' / 'p5.png'}: its folder is gone too (a drive not mounted?); "
            "kept until 'lookalike index' runs on it again") in result.output
    assert str(photos / "sub" / "p5.png") in embeddings(db)


def test_check_refuses_what_is_not_a_database(tmp_path):
    result = run("check", "--db", tmp_path / "none.db")
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {tmp_path / 'none.db'}: no such database; run 'lookalike index' first"
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"SQLite format 3\x00" + os.urandom(5000))
    result = run("check", "--db", junk)
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_check_refuses_a_server_database_that_holds_no_index(pg_db):
    """The server's counterpart of a missing file: an empty database is refused, not made one."""
    result = run("check", "--db", pg_db)
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {describe(resolve_db(pg_db))}: not a lookalike database; "
                                     "run 'lookalike index' to make one")
    assert sql(pg_db, "select count(*) from information_schema.tables where table_schema = 'public'") == [(0,)]


def test_an_unchanged_file_that_cannot_be_decoded_here_keeps_its_embedding(indexed, monkeypatch):
    photos, db = indexed
    before = embeddings(db)

    def refuse(path, *args, **kw):
        from indexer.decode import DecodeError

        raise DecodeError("no decoder for this format here")

    # As if a format plugin (say pillow-heif) were missing on this machine.
    monkeypatch.setattr("indexer.pipeline.open_image", refuse)
    result = run("check", "--db", db, "--repair")
    assert result.exit_code == 1
    assert (f"file: {photos / 'p0.jpg'}: cannot be read now: no decoder for this format here; kept, "
            "since the file is unchanged") in result.output
    assert embeddings(db) == before
