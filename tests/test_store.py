"""The database: migrations applied in-process, schema matching the models, newer schemas refused."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

import migrations
from indexer.store import Base, Store, StoreError, _alembic_config


def test_exactly_one_head():
    with create_engine("sqlite://").connect() as conn:
        script = ScriptDirectory.from_config(_alembic_config(conn))
    assert len(script.get_heads()) == 1


def test_a_new_database_is_created_at_head_and_matches_the_models(tmp_path):
    store = Store(tmp_path / "a.db")
    try:
        with store.engine.connect() as conn:
            ctx = MigrationContext.configure(conn)
            script = ScriptDirectory.from_config(_alembic_config(conn))
            assert ctx.get_current_heads() == tuple(script.get_heads())
            assert compare_metadata(ctx, Base.metadata) == []
            cols = {c["name"] for c in inspect(conn).get_columns("images")}
        assert {"path", "size", "mtime_ns", "sha256", "width", "height", "status", "error",
                "embedding", "indexed_at"} <= cols
        # WAL: queries never block the indexer.
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        store.close()


def test_an_empty_file_is_upgraded_and_reopening_is_a_no_op(tmp_path):
    path = tmp_path / "b.db"
    sqlite3.connect(path).close()
    Store(path).close()
    Store(path).close()
    with create_engine("sqlite://").connect() as conn:
        head = ScriptDirectory.from_config(_alembic_config(conn)).get_current_head()
    with sqlite3.connect(path) as con:
        assert con.execute("select version_num from alembic_version").fetchall() == [(head,)]


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "c.db"
    Store(path).close()
    with sqlite3.connect(path) as con:
        con.execute("update alembic_version set version_num = '9999_future'")
    with pytest.raises(StoreError, match="newer than this lookalike"):
        Store(path)


def test_not_a_database_and_missing_database(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_text("hello" * 1000)
    with pytest.raises(StoreError, match="not a usable lookalike database"):
        Store(junk)
    with pytest.raises(StoreError, match="no such database"):
        Store(tmp_path / "none.db", create=False)
    with pytest.raises(StoreError, match="is a folder"):
        Store(tmp_path)


def test_migrations_ship_as_package_files():
    folder = Path(migrations.__file__).parent
    assert (folder / "env.py").exists() and (folder / "script.py.mako").exists()
    assert list((folder / "versions").glob("0001_*.py"))
