"""Re-indexing: only what changed is embedded; moves, edits and deletions are tracked."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import indexer.encoder
from conftest import faiss_file, index_agrees_with_db, save_photo, sql
from indexer import Indexer
from search import Searcher

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(any_db):
    """Every test here runs on SQLite and on PostgreSQL."""
    return any_db


def index(db, *roots, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("image_size", 128)
    return Indexer(db, **kw).index(roots)


def counts(s):
    return (s.added, s.updated, s.moved, s.removed, s.unchanged, s.failed)


def faiss_agrees_with_db(db) -> None:
    """The FAISS file on disk holds exactly the database's descriptors, under their ids."""
    index_agrees_with_db(db)


def test_second_run_embeds_nothing_and_loads_no_model(photos, db, monkeypatch):
    first = index(db, photos)
    assert counts(first) == (6, 0, 0, 0, 0, 0) and first.embedded == 6

    def no_model(*a, **k):
        raise AssertionError("the model was loaded although nothing changed")

    monkeypatch.setattr(indexer.encoder.Encoder, "__init__", no_model)
    second = index(db, photos)
    assert counts(second) == (0, 0, 0, 0, 6, 0) and second.embedded == 0


def test_add_change_move_rename_delete(photos, db):
    index(db, photos)
    with Searcher(db) as s:
        old_vec = s.embed(photos / "p1.jpg")
        ids = {m.path: m.id for m in s.search(photos / "p0.jpg", k=10)}

    save_photo(photos / "new.jpg", seed=100)                      # added
    save_photo(photos / "p1.jpg", seed=101, quality=90)           # changed in place
    (photos / "moved").mkdir()
    os.rename(photos / "p2.jpg", photos / "moved" / "p2.jpg")     # moved
    os.rename(photos / "p3.jpg", photos / "renamed.jpg")          # renamed
    os.remove(photos / "p4.jpg")                                  # deleted
    summary = index(db, photos)
    assert counts(summary) == (1, 1, 2, 1, 2, 0), summary.line()
    assert summary.embedded == 2  # the new file and the changed one, not the moves

    with Searcher(db) as s:
        assert len(s) == 6
        hits = {m.path: m for m in s.search(photos / "renamed.jpg", k=10)}
        assert str(photos / "p4.jpg") not in hits and str(photos / "p3.jpg") not in hits
        assert hits[str(photos / "renamed.jpg")].score > 0.999
        # A move keeps its database id and so its FAISS id.
        assert hits[str(photos / "renamed.jpg")].id == ids[str(photos / "p3.jpg")]
        assert hits[str(photos / "moved" / "p2.jpg")].id == ids[str(photos / "p2.jpg")]
        changed = s.search(photos / "p1.jpg", k=1)[0]
        assert changed.path == str(photos / "p1.jpg") and changed.score > 0.999
        assert float(old_vec @ s.embed(photos / "p1.jpg")) < 0.99
    faiss_agrees_with_db(db)


def test_swapped_names_swap_descriptors(photos, db):
    index(db, photos)
    with Searcher(db) as s:
        before = {n: s.embed(photos / n) for n in ("p0.jpg", "p1.jpg", "p2.jpg")}
    # Rotate three names: p0 -> p1 -> p2 -> p0.
    os.rename(photos / "p0.jpg", photos / "tmp")
    os.rename(photos / "p2.jpg", photos / "p0.jpg")
    os.rename(photos / "p1.jpg", photos / "p2.jpg")
    os.rename(photos / "tmp", photos / "p1.jpg")
    summary = index(db, photos)
    assert summary.embedded == 0 and summary.failed == 0
    with Searcher(db) as s:
        for old, new in (("p0.jpg", "p1.jpg"), ("p1.jpg", "p2.jpg"), ("p2.jpg", "p0.jpg")):
            top = s.search(before[old], k=1)[0]
            assert top.path == str(photos / new) and top.score > 0.999
    faiss_agrees_with_db(db)


def test_ids_of_deleted_images_are_never_reused(photos, db):
    index(db, photos)
    with Searcher(db) as s:
        last = max(m.id for m in s.search(photos / "p0.jpg", k=6))
        (photos / "sub" / "p5.png").unlink()
        save_photo(photos / "zz.png", seed=60)
        index(db, photos)
        # A Searcher left open sees the new run, and the new image has a new id.
        top = s.search(photos / "zz.png", k=1)[0]
        assert top.path == str(photos / "zz.png") and top.id > last
        assert len(s) == 6


def test_two_index_runs_on_one_database_take_turns(photos, db, tmp_path):
    other = tmp_path / "other"
    for i in range(6):
        save_photo(other / f"o{i}.png", seed=300 + i)
    index(db, photos)
    cmd = [sys.executable, "-c", "import cli; cli.main()", "index", "--db", str(db),
           "--workers", "0", "--batch-size", "1"]
    procs = [subprocess.Popen(cmd + [str(root)], cwd=REPO, stderr=subprocess.PIPE)
             for root in (other, photos)]
    for i in range(5):
        save_photo(photos / f"p{i}.jpg", seed=200 + i)
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    index(db, photos)
    index(db, other)
    faiss_agrees_with_db(db)


def test_identical_copy_reuses_the_descriptor(photos, db):
    index(db, photos)
    (photos / "copy.jpg").write_bytes((photos / "p0.jpg").read_bytes())
    summary = index(db, photos)
    assert counts(summary) == (1, 0, 0, 0, 6, 0) and summary.embedded == 0
    with Searcher(db) as s:
        top = s.search(photos / "p0.jpg", k=2)
        assert {m.path for m in top} == {str(photos / "p0.jpg"), str(photos / "copy.jpg")}
        assert min(m.score for m in top) > 0.999


def test_touched_file_with_same_content_is_unchanged(photos, db):
    index(db, photos)
    os.utime(photos / "p0.jpg", ns=(1, 1_000_000_000))
    summary = index(db, photos)
    assert counts(summary) == (0, 0, 0, 0, 6, 0) and summary.embedded == 0


def test_rows_outside_the_roots_are_kept(photos, db, tmp_path):
    other = tmp_path / "other"
    save_photo(other / "o.jpg", seed=50)
    index(db, photos)
    index(db, other)
    summary = index(db, photos)  # must not sweep 'other'
    assert summary.removed == 0
    with Searcher(db) as s:
        assert len(s) == 7


def test_faiss_file_is_rebuilt_when_it_disagrees(photos, db, caplog):
    index(db, photos)
    faiss_path = faiss_file(db)
    faiss_path.write_bytes(b"garbage")
    with Searcher(db) as s:
        assert len(s) == 6
        assert s.search(photos / "p0.jpg", k=1)[0].score > 0.999
    assert "rebuilding the vector index" in caplog.text
    # A stale but readable file (older generation) is rebuilt too.
    stale = faiss_path.read_bytes(), faiss_path.with_name(faiss_path.name + ".json").read_text()
    save_photo(photos / "late.jpg", seed=77)
    index(db, photos)
    faiss_path.write_bytes(stale[0])
    faiss_path.with_name(faiss_path.name + ".json").write_text(stale[1])
    with Searcher(db) as s:
        assert len(s) == 7
    faiss_agrees_with_db(db)


def test_kill_9_mid_run_loses_nothing(tmp_path, db):
    root = tmp_path / "many"
    n = 40
    for i in range(n):
        save_photo(root / f"{i:03}.png", seed=1000 + i, size=(200, 150))
    cmd = [sys.executable, "-c", "import cli; cli.main()", "index", str(root), "--db", str(db),
           "--workers", "0", "--batch-size", "1", "--image-size", "448"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def committed_so_far() -> int:
        if isinstance(db, Path) and not db.exists():
            return 0  # connecting would create the file under the run
        try:
            return sql(db, "select count(*) from images")[0][0]
        except Exception:  # noqa: BLE001 - no schema yet, or a file being made
            return 0

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if committed_so_far() >= 3:
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail(f"index finished before it could be killed: {proc.stderr.read().decode()}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = sql(db, "select count(*) from images")[0][0]
    assert 3 <= committed < n

    summary = Indexer(db, workers=0).index([root])
    assert summary.unchanged == committed
    assert summary.added == n - committed and summary.failed == 0
    assert sql(db, "select count(*), count(distinct path) from images") == [(n, n)]
    faiss_agrees_with_db(db)
    with Searcher(db) as s:
        assert len(s) == n


def test_unseen_entries_are_not_swept(photos, db):
    save_photo(photos / ".hidden" / "h.png", seed=90)
    assert index(db, photos, include_hidden=True).added == 7
    # Skipping hidden paths this time does not mean they are gone.
    summary = index(db, photos)
    assert summary.removed == 0 and summary.unchanged == 6
    with Searcher(db) as s:
        assert len(s) == 7


def test_a_name_that_is_not_utf8_is_skipped_not_fatal(photos, db):
    raw = os.path.join(os.fsencode(photos), b"bad\xff.png")
    with open(raw, "wb") as f:
        from conftest import make_photo

        make_photo(91).save(f, format="PNG")
    summary = index(db, photos)
    assert summary.added == 6 and summary.failed == 0
    faiss_agrees_with_db(db)
