"""One PostgreSQL database shared by several writers and readers; --db URLs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from conftest import faiss_file, index_agrees_with_db, save_photo, sql
from search import Searcher

REPO = Path(__file__).resolve().parents[1]


def _index_process(root: Path, db: str, cache: Path, *extra: str, size: int = 128) -> subprocess.Popen:
    """`lookalike index ROOT --db URL` in a process of its own, as another machine would run it
    (its own cache folder, so its own FAISS file)."""
    env = {**os.environ, "LOOKALIKE_CACHE": str(cache)}
    cmd = [sys.executable, "-c", "import cli; cli.main()", "index", str(root), "--db", db,
           "--workers", "0", "--image-size", str(size), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _folder(root: Path, n: int, first_seed: int) -> Path:
    for i in range(n):
        save_photo(root / f"{i:02}.png", seed=first_seed + i, size=(160, 120))
    return root


def _count(db: str) -> int:
    try:
        return sql(db, "select count(*) from images")[0][0]
    except Exception:  # noqa: BLE001 - no schema yet
        return 0


def test_two_writers_at_once_end_with_every_image_once(tmp_path, pg_db, monkeypatch):
    a, b = _folder(tmp_path / "a", 10, 100), _folder(tmp_path / "b", 10, 200)
    procs = [_index_process(root, pg_db, tmp_path / f"cache-{root.name}", "--batch-size", "2")
             for root in (a, b)]
    # A reader never waits for them: it sees some committed state at every moment.
    while any(p.poll() is None for p in procs):
        if _count(pg_db):
            with Searcher(pg_db) as s:
                assert len(s) <= 20
        time.sleep(0.2)
    for p in procs:
        assert p.returncode == 0, p.stderr.read().decode()
    assert sql(pg_db, "select count(*), count(distinct path) from images where status = 'ok'") == [(20, 20)]
    # Each machine's FAISS file catches up with what the other committed on its next search.
    for root in (a, b):
        monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / f"cache-{root.name}"))
        with Searcher(pg_db) as s:
            assert len(s) == 20
            hit = s.search(a / "03.png", k=1)[0]
            assert hit.path == str(a / "03.png") and hit.score > 0.999
        index_agrees_with_db(pg_db)


def test_two_writers_over_the_same_folder_add_each_image_once(tmp_path, pg_db, monkeypatch):
    a = _folder(tmp_path / "a", 12, 500)
    procs = [_index_process(a, pg_db, tmp_path / f"cache-{n}", "--batch-size", "2") for n in (1, 2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    assert sql(pg_db, "select count(*), count(distinct path) from images where status = 'ok'") == [(12, 12)]
    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "cache-1"))
    with Searcher(pg_db) as s:
        assert len(s) == 12
    index_agrees_with_db(pg_db)


def test_a_writer_killed_beside_another_loses_only_its_batch_in_flight(tmp_path, pg_db, monkeypatch):
    a, b = _folder(tmp_path / "a", 24, 300), _folder(tmp_path / "b", 6, 400)
    killed = _index_process(a, pg_db, tmp_path / "cache-a", "--batch-size", "1", size=448)
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None and _count(pg_db) < 3:
        time.sleep(0.02)
    other = _index_process(b, pg_db, tmp_path / "cache-b", size=448)
    if killed.poll() is not None:
        pytest.fail(f"the run finished before it could be killed: {killed.stderr.read().decode()}")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert other.wait(timeout=300) == 0, other.stderr.read().decode()
    kept = sql(pg_db, f"select count(*) from images where path like '{a}/%'")[0][0]
    assert 3 <= kept < 24
    # The killed machine runs again and finishes; nothing twice, nothing lost.
    again = _index_process(a, pg_db, tmp_path / "cache-a", size=448)
    assert again.wait(timeout=300) == 0, again.stderr.read().decode()
    assert sql(pg_db, "select count(*), count(distinct path) from images where status = 'ok'") == [(30, 30)]
    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "cache-a"))  # the last run's, current
    index_agrees_with_db(pg_db)


def test_each_machine_keeps_its_own_faiss_file_in_its_cache(photos, pg_db, tmp_path, monkeypatch):
    result = CliRunner().invoke(main, ["index", str(photos), "--db", pg_db, "--workers", "0"])
    assert result.exit_code == 0, result.output
    first = faiss_file(pg_db)
    assert first.is_file() and first.is_relative_to(Path(os.environ["LOOKALIKE_CACHE"]))
    # Another machine (another cache) builds its own from the database on first use.
    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "elsewhere"))
    with Searcher(pg_db) as s:
        assert len(s) == 6 and s.search(photos / "p2.jpg", k=1)[0].path == str(photos / "p2.jpg")
    assert faiss_file(pg_db).is_relative_to(tmp_path / "elsewhere") and faiss_file(pg_db).is_file()
    info = CliRunner().invoke(main, ["info", "--db", pg_db])
    assert info.exit_code == 0, info.output
    assert "postgresql://" in info.output and "lookalike:lookalike@" not in info.output


def test_the_environment_names_a_server_too(photos, pg_db, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_DB", pg_db)
    result = CliRunner().invoke(main, ["index", str(photos), "--workers", "0"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["query", str(photos / "p1.jpg"), "-k", "1"])
    assert result.exit_code == 0, result.output
    assert str(photos / "p1.jpg") in result.output


@pytest.mark.parametrize("url, says", [
    ("mysql://u:secret@host/db", "unsupported database URL scheme 'mysql'"),
    ("https://example.com/x.db", "unsupported database URL scheme 'https'"),
    ("postgresql://u:secret@localhost:1/db", "postgresql://u:***@localhost:1/db: "),
    ("postgresql://u@localhost", "the URL names no database"),
    ("sqlite://", "a sqlite URL needs a file"),
])
def test_a_url_is_never_taken_for_a_file_name(photos, tmp_path, monkeypatch, url, says):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["index", str(photos), "--db", url, "--workers", "0"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.output
    assert "secret" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no folder named after a scheme


def test_a_sqlite_url_is_a_file(photos, tmp_path):
    db = tmp_path / "u.db"
    result = CliRunner().invoke(main, ["index", str(photos), "--db", f"sqlite:///{db}", "--workers", "0"])
    assert result.exit_code == 0, result.output
    with Searcher(db) as s:
        assert len(s) == 6
