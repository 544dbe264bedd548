"""The database: migrations applied in-process, schema matching the models, newer schemas refused."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, make_url

import migrations
from conftest import sql
from indexer.store import Base, Store, StoreError, _alembic_config


def _script() -> ScriptDirectory:
    with create_engine("sqlite://").connect() as conn:
        return ScriptDirectory.from_config(_alembic_config(conn))


def _head() -> str:
    return _script().get_current_head()


def test_exactly_one_head():
    assert len(_script().get_heads()) == 1


def test_a_new_database_is_created_at_head_and_matches_the_models(any_db):
    store = Store(any_db)
    try:
        with store.engine.connect() as conn:
            ctx = MigrationContext.configure(conn)
            script = ScriptDirectory.from_config(_alembic_config(conn))
            assert ctx.get_current_heads() == tuple(script.get_heads())
            assert compare_metadata(ctx, Base.metadata) == []
            cols = {c["name"] for c in inspect(conn).get_columns("images")}
        assert {"path", "size", "mtime_ns", "sha256", "width", "height", "status", "error",
                "embedding", "indexed_at"} <= cols
    finally:
        store.close()


def test_a_new_file_is_in_wal_mode(tmp_path):
    """WAL: queries never block the indexer (a server has its own concurrency)."""
    store = Store(tmp_path / "a.db")
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        store.close()


def test_an_empty_file_is_upgraded_and_reopening_is_a_no_op(tmp_path):
    path = tmp_path / "b.db"
    sqlite3.connect(path).close()
    Store(path).close()
    Store(path).close()
    with sqlite3.connect(path) as con:
        assert con.execute("select version_num from alembic_version").fetchall() == [(_head(),)]


def test_a_new_server_database_is_upgraded_and_reopening_is_a_no_op(pg_db):
    first = Store(pg_db)
    first.close()
    settings = sql(pg_db, "select key, value from settings order by key")
    assert sql(pg_db, "select version_num from alembic_version") == [(_head(),)]
    again = Store(pg_db)
    again.close()
    assert sql(pg_db, "select version_num from alembic_version") == [(_head(),)]
    assert sql(pg_db, "select key, value from settings order by key") == settings
    assert again.path == first.path, "the same database keeps its name in the cache"


def test_a_newer_schema_is_refused(any_db):
    Store(any_db).close()
    sql(any_db, "update alembic_version set version_num = '9999_future'")
    with pytest.raises(StoreError, match="newer than this lookalike"):
        Store(any_db)


def test_not_a_database_and_missing_database(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_text("hello" * 1000)
    with pytest.raises(StoreError, match="not a usable lookalike database"):
        Store(junk)
    with pytest.raises(StoreError, match="no such database"):
        Store(tmp_path / "none.db", create=False)
    with pytest.raises(StoreError, match="is a folder"):
        Store(tmp_path)


def test_a_missing_or_empty_server_database(pg_db):
    """An empty database is made one only by a writer; a database the server lacks is refused
    naming it, without the password."""
    with pytest.raises(StoreError, match="not a lookalike database"):
        Store(pg_db, create=False)
    assert sql(pg_db, "select count(*) from information_schema.tables where table_schema = 'public'") == [(0,)]
    url = make_url(pg_db)
    missing = url.set(database=url.database + "_missing").render_as_string(hide_password=False)
    with pytest.raises(StoreError, match=url.database + "_missing") as caught:
        Store(missing)
    assert "\n" not in str(caught.value)
    if url.password:
        assert f":{url.password}@" not in str(caught.value), "the password is never shown"


def test_migrations_ship_as_package_files():
    folder = Path(migrations.__file__).parent
    assert (folder / "env.py").exists() and (folder / "script.py.mako").exists()
    assert list((folder / "versions").glob("0001_*.py"))
