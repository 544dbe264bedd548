"""lookalike export and import (indexer.exchange): Parquet files of paths and descriptors."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select

from conftest import drop_pg_database, new_pg_database, save_photo
from indexer import Indexer, RecipeMismatch
from indexer.exchange import ExchangeError, export, import_embeddings
from indexer.recipe import Recipe
from indexer.store import ImageRow, Store


@pytest.fixture
def db(any_db):
    """The database imported into (or made for a test): every test here runs on SQLite and
    on PostgreSQL."""
    return any_db


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """Five small photos, made once for the whole module."""
    root = tmp_path_factory.mktemp("exchange") / "photos"
    for i in range(5):
        save_photo(root / f"p{i}.jpg", seed=40 + i, quality=92)
    return root


@pytest.fixture(scope="module")
def indexed(library, tmp_path_factory) -> tuple[Path, Path]:
    """(photos folder, database): the photos indexed once for the whole module, in a file."""
    db = tmp_path_factory.mktemp("exchange-db") / "source.db"
    Indexer(db, image_size=128, workers=0).index([library])
    return library, db


@pytest.fixture(scope="module")
def pg_indexed(library, pg_server):
    """(photos folder, database URL): the photos indexed once for the whole module, in a new
    PostgreSQL database, dropped at the end."""
    name, db = new_pg_database(pg_server)
    try:
        Indexer(db, image_size=128, workers=0).index([library])
        yield library, db
    finally:
        drop_pg_database(pg_server, name)


@pytest.fixture(params=["sqlite", "postgresql"])
def source(request):
    """(photos folder, database) to export from: the module's file, or its server database."""
    return request.getfixturevalue("indexed" if request.param == "sqlite" else "pg_indexed")


@pytest.fixture(scope="module")
def exported(indexed, tmp_path_factory) -> Path:
    """The source database exported to one Parquet file (read only by the tests)."""
    out = tmp_path_factory.mktemp("export") / "all.parquet"
    with _open(indexed[1]) as store:
        export(store, out)
    return out


class _open:
    """A Store as a context manager, closed at the end."""

    def __init__(self, db):
        self.store = Store(db)

    def __enter__(self) -> Store:
        return self.store

    def __exit__(self, *exc) -> None:
        self.store.close()


def _import(db, source: Path, **kw):
    with _open(db) as store:
        return import_embeddings(store, source, **kw)


def _vectors(db) -> dict[str, np.ndarray]:
    """Every indexed image's descriptor, by path."""
    with _open(db) as store:
        with store.session() as s:
            paths = s.execute(select(ImageRow.path)).scalars().all()
        return store.embeddings_at(paths)


def _write(path: Path, table: pa.Table, recipe_json: str, fmt: str = "1") -> Path:
    meta = {b"lookalike.recipe": recipe_json.encode(), b"lookalike.format": fmt.encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)
    return path


def _recipe_json(exported: Path) -> str:
    return pq.ParquetFile(exported).metadata.metadata[b"lookalike.recipe"].decode()


def test_export_writes_the_documented_format(source, tmp_path):
    root, db = source
    exported = tmp_path / "out" / "all.parquet"
    exported.parent.mkdir()
    with _open(db) as store:
        export(store, exported)
    table = pq.read_table(exported)
    assert table.num_rows == 5, f"expected 5 rows, got {table.num_rows}"
    with _open(db) as store:
        recipe = store.recipe()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), recipe.dim), table.schema
    assert table.schema.field("width").type == pa.int32(), table.schema
    assert sorted(table.column("path").to_pylist()) == sorted(str(p) for p in root.glob("*.jpg"))
    assert all(len(s) == 64 for s in table.column("sha256").to_pylist()), "every row keeps its hash"
    meta = pq.ParquetFile(exported).metadata.metadata
    assert meta[b"lookalike.format"] == b"1", meta
    assert meta[b"lookalike.recipe"].decode() == recipe.to_json(), "the recipe travels with the file"
    assert not list(exported.parent.glob(".*.tmp")), "no temp file is left behind"

    # A folder: parts of rows_per_file rows; a later, smaller export drops the stale parts.
    with _open(db) as store:
        parts = export(store, tmp_path / "parts", rows_per_file=2, batch=3)
        assert [p.name for p in parts.files] == ["part-00000.parquet", "part-00001.parquet",
                                                 "part-00002.parquet"], parts
        assert parts.rows == 5, parts
        again = export(store, tmp_path / "parts", rows_per_file=4)
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["part-00000.parquet",
                                                                      "part-00001.parquet"], again


def test_round_trip_gives_the_same_embeddings_and_results(source, db, tmp_path):
    root, db, new = *source, db
    with _open(db) as store:
        export(store, tmp_path / "parts", rows_per_file=2)
    seen = []
    result = _import(new, tmp_path / "parts", batch=2, progress=lambda done, total: seen.append((done, total)))
    assert (result.added, result.updated, result.unchanged, result.failed, result.files) == (5, 0, 0, [], 3), result
    assert seen[-1] == (5, 5), f"progress ends at all rows: {seen}"
    before, after = _vectors(db), _vectors(new)
    assert sorted(before) == sorted(after), "the same paths"
    for path, vec in before.items():
        assert np.allclose(vec, after[path], atol=1e-3), f"{path}: the embedding changed on the way"
    with _open(db) as a, _open(new) as b:
        # Its global part: the files hold no local features, so the new database has none.
        assert a.recipe().global_only() == b.recipe(), "a new database takes the file's recipe"
        assert b.local_stats()[0] == 0, "imported rows carry no local features"

    from search import Searcher

    with Searcher(db) as sa, Searcher(new) as sb:
        queries = np.stack([before[str(root / f"p{i}.jpg")] for i in range(5)])
        for ra, rb in zip(sa.search_vectors(queries, k=5), sb.search_vectors(queries, k=5)):
            assert [m.path for m in ra] == [m.path for m in rb], "the same neighbours in the same order"
            assert np.allclose([m.score for m in ra], [m.score for m in rb], atol=1e-3), (ra, rb)


def test_importing_again_changes_nothing(exported, db):
    new = db
    assert _import(new, exported).added == 5
    with _open(new) as store:
        generation = store.generation()
    again = _import(new, exported)
    assert (again.added, again.updated, again.unchanged, again.failed) == (0, 0, 5, []), again
    with _open(new) as store:
        assert store.generation() == generation, "an import that changes nothing commits no change"


def test_a_killed_import_is_finished_by_importing_again(exported, db):
    new = db

    def killed(done: int, total: int) -> None:
        if done >= 2:
            raise KeyboardInterrupt  # as if the process died after the first batch's commit

    with pytest.raises(KeyboardInterrupt):
        _import(new, exported, batch=2, progress=killed)
    with _open(new) as store:
        assert store.count() == 2, "the committed batch is kept"
    again = _import(new, exported, batch=2)
    assert (again.added, again.unchanged, again.failed) == (3, 2, []), again
    with _open(new) as store:
        from indexer import vectors

        assert vectors.is_current(store), "the FAISS file is brought up to date"


def test_a_new_database_takes_the_files_whitening(exported, db, tmp_path):
    meta = dict(pq.ParquetFile(exported).metadata.metadata)
    meta[b"lookalike.whitening"] = b"none"  # turned off for good in the source
    table = pq.read_table(exported).replace_schema_metadata(meta)
    pq.write_table(table, tmp_path / "w.parquet")
    new = db
    assert _import(new, tmp_path / "w.parquet").added == 5
    with _open(new) as store:
        assert store.whitening_setting() == "none", "the whitening setting travels with the recipe"


def test_a_changed_embedding_updates_the_row(exported, db, tmp_path):
    new = db
    _import(new, exported)
    table = pq.read_table(exported)
    dim = table.schema.field("embedding").type.list_size
    vecs = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    vecs[0] = np.roll(vecs[0], 1)  # another unit vector
    table = table.set_column(1, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), dim))
    result = _import(new, _write(tmp_path / "changed.parquet", table, _recipe_json(exported)))
    assert (result.added, result.updated, result.unchanged) == (0, 1, 4), result
    stored = _vectors(new)[table.column("path")[0].as_py()]
    assert np.allclose(stored, vecs[0], atol=1e-3), "the row holds the new embedding"


def test_bad_rows_are_reported_and_the_rest_imported(exported, db, tmp_path):
    source = pq.read_table(exported)
    vecs = [np.asarray(v, np.float32) for v in source.column("embedding").to_pylist()]
    paths = source.column("path").to_pylist()
    nan = vecs[1].copy()
    nan[3] = np.nan
    rows = [(paths[0], vecs[0]), (paths[1], nan), (paths[2], vecs[2][:-1]), ("p3.jpg", vecs[3]),
            (paths[4], vecs[4] * 2), ("/elsewhere/near.jpg", vecs[4] * (1 + 5e-4))]
    # No optional column at all, and a variable-length list: both allowed.
    table = pa.table({"path": [p for p, _ in rows],
                      "embedding": pa.array([v.tolist() for _, v in rows], pa.list_(pa.float32()))})
    bad = _write(tmp_path / "bad.parquet", table, _recipe_json(exported))
    new = db
    result = _import(new, bad)
    assert result.added == 2, result
    reasons = [reason for file, reason in result.failed]
    assert all(file == str(bad) for file, _ in result.failed), result.failed
    assert len(reasons) == 4 and all("\n" not in r for r in reasons), reasons
    for row, words in ((1, "NaN"), (2, "values"), (3, "not absolute"), (4, "unit length")):
        assert any(r.startswith(f"row {row} ") and words in r for r in reasons), f"row {row}: {reasons}"
    with _open(new) as store:
        near = store.embeddings_at(["/elsewhere/near.jpg"])["/elsewhere/near.jpg"]
        assert abs(np.linalg.norm(near) - 1) < 1e-3, "a vector within the tolerance is normalised"
        assert store.id_of(paths[0]) is not None
        with store.session() as s:
            size, mtime, sha = s.execute(select(ImageRow.size, ImageRow.mtime_ns, ImageRow.sha256)
                                         .where(ImageRow.path == paths[0])).one()
    assert (size, mtime, sha) == (0, 0, None), "missing optional columns take their defaults"


def test_a_bad_file_in_a_folder_is_reported_and_skipped(exported, db, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(exported.read_bytes())
    (folder / "b.parquet").write_text("not parquet at all\n")
    (folder / "notes.txt").write_text("ignored: not a .parquet file\n")
    table = pq.read_table(exported)
    dim = table.schema.field("embedding").type.list_size
    narrow = pa.table({"path": ["/x/a.jpg"], "embedding": pa.array([[1.0] + [0.0] * (dim - 2)],
                                                                   pa.list_(pa.float32(), dim - 1))})
    _write(folder / "c.parquet", narrow, _recipe_json(exported))
    pq.write_table(table.replace_schema_metadata({}), folder / "d.parquet")  # not an export
    result = _import(db, folder)
    assert result.added == 5 and result.files == 1, result
    failed = dict(result.failed)
    assert set(failed) == {str(folder / n) for n in ("b.parquet", "c.parquet", "d.parquet")}, failed
    assert "Parquet" in failed[str(folder / "b.parquet")], failed
    assert f"{dim - 1} values" in failed[str(folder / "c.parquet")], failed
    assert "lookalike.recipe" in failed[str(folder / "d.parquet")], failed


def test_a_file_of_another_recipe_is_refused_naming_it(exported, db, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(exported.read_bytes())
    recipe = Recipe.from_json(_recipe_json(exported))
    other = dataclasses.replace(recipe, pooling="mac", gem_p=0.0)
    _write(folder / "b.parquet", pq.read_table(exported), other.to_json())
    new = db
    with pytest.raises(RecipeMismatch) as caught:
        _import(new, folder)
    message = str(caught.value)
    assert str(folder / "b.parquet") in message and "pooling" in message and "gem_p" in message, message
    assert "\n" not in message, message
    with _open(new) as store:
        assert store.recipe() is None and store.count() == 0, "a refused import writes nothing"


def test_a_database_of_another_recipe_refuses_the_file(indexed, exported, db):
    with _open(indexed[1]) as store:
        recipe = store.recipe()
    with _open(db) as store, store.session() as s:
        store.set_setting(s, "recipe", dataclasses.replace(recipe, image_size=160).to_json())
        s.commit()
    with pytest.raises(RecipeMismatch) as caught:
        _import(db, exported)
    assert str(exported) in str(caught.value) and "image_size" in str(caught.value), caught.value
    with _open(db) as store:
        assert store.count() == 0, "nothing was imported"


def test_nothing_to_import_is_an_error(db, tmp_path):
    (tmp_path / "empty").mkdir()
    for source in (tmp_path / "empty", tmp_path / "missing.parquet"):
        with pytest.raises(ExchangeError) as caught:
            _import(db, source)
        assert str(source) in str(caught.value), caught.value


def test_the_commands_export_and_import_with_one_line_per_failure(source, db, tmp_path):
    from click.testing import CliRunner

    from cli import main
    from search import Searcher

    root, db, new = *source, db
    runner = CliRunner()
    result = runner.invoke(main, ["export", "--db", str(db), str(tmp_path / "parts")])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "5 images exported to 1 file"
    (tmp_path / "parts" / "notes.parquet").write_text("not parquet")
    result = runner.invoke(main, ["import", str(tmp_path / "parts"), "--db", str(new)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith(f"failed: {tmp_path / 'parts' / 'notes.parquet'}: ") and len(lines) == 2
    assert lines[1] == "5 added, 0 updated, 0 unchanged, 1 failed, from 1 file"
    with Searcher(db) as a, Searcher(new) as b:
        q = root / "p2.jpg"
        assert [(m.path, round(m.score, 5)) for m in a.search(q, k=5, verify=0)] == \
            [(m.path, round(m.score, 5)) for m in b.search(q, k=5, verify=0)]
    # Nothing given could be read: the command failed.
    result = runner.invoke(main, ["import", str(tmp_path / "parts" / "notes.parquet"), "--db", str(new)])
    assert result.exit_code == 1 and result.output.strip().endswith("1 failed, from 0 files"), result.output
    result = runner.invoke(main, ["import", str(tmp_path / "nothing-here"), "--db", str(new)])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and len(result.output.splitlines()) == 1
