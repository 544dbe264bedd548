"""Damaged or awkward state on disk, and readers running beside a writer."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from conftest import faiss_file, index_agrees_with_db, run_unprivileged, save_photo
from indexer import Indexer, vectors
from indexer.store import Store, describe, resolve_db, writer_lock
from search import Searcher

REPO = Path(__file__).resolve().parents[1]
LOOKALIKE = [sys.executable, "-c", "import cli; cli.main()"]


@pytest.fixture
def db(any_db):
    """The tests here that take ``db`` run on SQLite and on PostgreSQL; those about the files
    beside a SQLite database (folders, permissions, the lock file) make their own."""
    return any_db


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def index(db, *roots: Path) -> None:
    Indexer(db, workers=0).index(roots)


def test_a_database_in_a_read_only_folder_is_queried_read_only(photos, tmp_path):
    folder = tmp_path / "ro"
    db = folder / "index.db"
    index(db, photos)
    folder.chmod(0o555)
    try:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        result = run_unprivileged(LOOKALIKE + ["query", str(photos / "p1.jpg"), "--db", str(db),
                                               "-k", "2", "--json"], cwd=REPO, env=env)
        assert result.returncode == 0, result.stderr
        top = json.loads(result.stdout)["results"]
        assert top[0]["path"] == str(photos / "p1.jpg") and top[0]["score"] > 0.999
        assert "Traceback" not in result.stderr

        result = run_unprivileged(LOOKALIKE + ["info", "--db", str(db), "--json"], cwd=REPO, env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["counts"]["ok"] == 6

        result = run_unprivileged(LOOKALIKE + ["index", str(photos), "--db", str(db)],
                                  cwd=REPO, env=env)
        assert result.returncode == 1
        assert result.stderr.strip() == (f"Error: {db}: cannot write to the database: "
                                         "its folder is read-only")
        assert sorted(p.name for p in folder.iterdir()) == [
            "index.db", "index.db.faiss", "index.db.faiss.json", "index.db.lock"]
    finally:
        folder.chmod(0o755)


def test_files_written_beside_the_database_are_readable_by_others(photos, tmp_path):
    db = tmp_path / "index.db"
    # The database follows the umask; the FAISS file must too, or other users rebuild it.
    old = os.umask(0o022)
    try:
        index(db, photos)
    finally:
        os.umask(old)
    for path in (db, vectors.index_path(db)):
        assert path.stat().st_mode & 0o044 == 0o044, path


def test_a_truncated_faiss_file_is_rebuilt(photos, db, caplog):
    index(db, photos)
    path = faiss_file(db)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Searcher(db) as s:
        assert len(s) == 6
        assert s.search(photos / "p2.jpg", k=1)[0].path == str(photos / "p2.jpg")
    assert "rebuilding the vector index from the database: unreadable (" in caplog.text
    assert len(index_agrees_with_db(db)) == 6


def test_a_waiting_index_run_names_the_run_holding_the_lock(photos, tmp_path):
    # The lock file of a SQLite database; on a server, index runs share the advisory lock.
    db = tmp_path / "index.db"
    index(db, photos)
    save_photo(photos / "new.jpg", seed=40)
    outcome = {}
    with writer_lock(db):
        worker = threading.Thread(target=lambda: outcome.setdefault(
            "result", run("index", photos, "--db", db, "--workers", "0")))
        worker.start()
        time.sleep(3)
        # Still waiting: nothing can be added while the lock is held.
        assert worker.is_alive()
        with sqlite3.connect(db) as con:
            assert con.execute("select count(*) from images").fetchone()[0] == 6
    worker.join(120)
    result = outcome["result"]
    assert result.exit_code == 0, result.output
    assert f"waiting for index run pid {os.getpid()} on " in result.output
    assert "1 added" in result.output
    # The lock file no longer names a holder once the run is over.
    assert db.with_name(db.name + ".lock").read_text() == ""


def test_queries_during_an_index_run_see_committed_states(tmp_path, db):
    photos = tmp_path / "photos"
    for i in range(4):
        save_photo(photos / f"p{i:02d}.jpg", seed=500 + i)
    index(db, photos)
    for i in range(4, 24):
        save_photo(photos / f"p{i:02d}.jpg", seed=500 + i)

    proc = subprocess.Popen(LOOKALIKE + ["index", str(photos), "--db", str(db), "--workers", "0",
                                         "--batch-size", "2"], cwd=REPO, stderr=subprocess.PIPE)
    held = Searcher(db)
    sizes, errors, seen = [], [], []
    try:
        while proc.poll() is None:
            try:
                with Searcher(db) as fresh:
                    for s in (fresh, held):
                        matches = s.search(photos / "p00.jpg", k=30)
                        paths = [m.path for m in matches]
                        assert len(paths) == len(set(paths))
                        assert all(Path(p).exists() for p in paths)
                        sizes.append(len(s))
                held.refresh()  # asked to: it loads the batches committed so far
                seen.append(len(held))
            except Exception as exc:  # noqa: BLE001 - every failure is reported below
                errors.append(repr(exc))
        assert proc.returncode == 0, proc.stderr.read().decode()
        assert not errors, errors[:3]
        assert len(sizes) >= 4
        # Only ever adding here: what a held Searcher sees grows, batch by batch.
        assert seen == sorted(seen) and len(set(seen)) > 2, seen
        assert held.refresh() is True or len(held) == 24
        assert len(held) == 24
        assert held.refresh() is False
    finally:
        held.close()
        if proc.poll() is None:
            proc.kill()


def test_a_held_searcher_sees_a_finished_run_without_being_asked(photos, db):
    index(db, photos)
    with Searcher(db) as held:
        assert len(held) == 6
        save_photo(photos / "new.jpg", seed=799)
        (photos / "p2.jpg").unlink()
        index(db, photos)
        paths = {Path(m.path).name for m in held.search(photos / "new.jpg", k=10)}
        assert paths == {"p0.jpg", "p1.jpg", "p3.jpg", "p4.jpg", "p5.png", "new.jpg"}
        assert len(held) == 6 and held.refresh() is False


def test_a_damaged_or_unwritable_model_cache_does_not_stop_a_run(photos, tmp_path, monkeypatch, caplog, db):
    from indexer.encoder import Encoder, cache_dir

    index(db, photos)
    recipe = Store(db).recipe()
    with Searcher(db) as s:
        want = s.embed(photos / "p0.jpg")

    # A cache file cut short (a full disk, a killed export) is exported again.
    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "cache"))
    Encoder(recipe)
    cached = next(cache_dir().glob("*.onnx"))
    cached.write_bytes(cached.read_bytes()[:5000])
    caplog.clear()
    with Searcher(db) as s:
        assert float(s.embed(photos / "p0.jpg") @ want) > 0.9999
    assert f"the cached model {cached} is unusable" in caplog.text
    assert cached.stat().st_size > 5000

    # A cache folder that cannot be made: a temporary copy serves this process.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("LOOKALIKE_CACHE", str(blocker / "cache"))
    caplog.clear()
    with Searcher(db) as s:
        assert float(s.embed(photos / "p0.jpg") @ want) > 0.9999
    assert f"cannot write the model cache in {blocker / 'cache'}" in caplog.text


def test_too_many_open_files_is_one_error_and_keeps_the_index(photos, db):
    index(db, photos)
    for i in range(4):
        save_photo(photos / f"more{i}.jpg", seed=900 + i)

    # Where the descriptors run out depends on how many the interpreter opens
    # first, so a sweep of limits crosses every stage: start-up, the decoding
    # workers, passing images back. Each ends in one line or a finished run,
    # never a hang (torch's shared-memory fd passing once hung here).
    name = describe(resolve_db(db))  # as errors name it: a URL without its password
    outcomes = set()
    for limit in range(12, 33, 3):
        def few_files(limit=limit):
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        proc = subprocess.run(LOOKALIKE + ["index", str(photos), "--db", str(db), "--workers", "2"],
                              cwd=REPO, preexec_fn=few_files, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode in (0, 1), (limit, proc.stderr)
        assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, (limit, proc.stderr)
        outcomes.add(proc.returncode)
        if proc.returncode == 1:
            last = proc.stderr.strip().splitlines()[-1]
            assert last.startswith(f"Error: {name}: ") and "Too many open files" in last, (limit, proc.stderr)
            assert last.endswith("the images committed so far are kept, run again to finish"), proc.stderr
            with Searcher(db) as s:  # nothing indexed before is lost
                assert len(s) >= 6
            continue
        with Searcher(db) as s:
            assert len(s) == 10
        for i in range(4):  # something left to do for the next limit
            (photos / f"more{i}.jpg").unlink()
            save_photo(photos / f"more{i}.jpg", seed=950 + limit + i)
    assert outcomes == {0, 1}
