"""index --shard I/N: N runs from any scheduler split the files, into one database or into
N that import merges."""
from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from cli import main
from conftest import index_agrees_with_db, save_photo
from indexer import Indexer
from indexer.scan import in_shard
from indexer.store import Store


def _contents(db) -> dict[str, np.ndarray]:
    store = Store(db, create=False)
    try:
        records = store.records(store.ok_ids())
        vectors = store.vectors_by_id(records)
        return {r.path: vectors[i] for i, r in records.items()}
    finally:
        store.close()


def _folder(root, n=12):
    for i in range(n):
        save_photo(root / f"{i:02}.png", seed=500 + i)
    return root


def test_shards_into_one_database_make_the_whole_and_sweep_only_their_own(tmp_path, any_db):
    root = _folder(tmp_path / "photos")
    whole = tmp_path / "whole.db"
    Indexer(whole, workers=0, image_size=128).index([root])
    added = [Indexer(any_db, workers=0, image_size=128, shard=(i, 3)).index([root]).added for i in range(3)]
    assert sum(added) == 12 and all(added)  # each shard had files
    want, got = _contents(whole), _contents(any_db)
    assert sorted(got) == sorted(want)
    assert max(float(np.abs(got[p] - want[p]).max()) for p in want) == 0.0
    # A file of shard 0 goes: shard 1's run leaves its row, shard 0's sweeps it.
    gone = next(p for p in sorted(want) if in_shard(p, (0, 3)))
    (tmp_path / "photos" / gone.rsplit("/", 1)[1]).unlink()
    assert Indexer(any_db, workers=0, shard=(1, 3)).index([root]).removed == 0
    assert Indexer(any_db, workers=0, shard=(0, 3)).index([root]).removed == 1
    assert sorted(_contents(any_db)) == sorted(set(want) - {gone})
    index_agrees_with_db(any_db)


def test_shards_into_files_merge_by_export_and_import(tmp_path):
    root = _folder(tmp_path / "photos", 8)
    runner = CliRunner()
    for i in range(2):
        shard_db = tmp_path / f"shard-{i}.db"
        result = runner.invoke(main, ["index", str(root), "--db", str(shard_db), "--shard", f"{i}/2",
                                      "--workers", "0", "--image-size", "128"])
        assert result.exit_code == 0, result.output
        result = runner.invoke(main, ["export", str(tmp_path / "parts" / f"{i}.parquet"), "--db", str(shard_db)])
        assert result.exit_code == 0, result.output
    merged = tmp_path / "merged.db"
    result = runner.invoke(main, ["import", str(tmp_path / "parts"), "--db", str(merged)])
    assert result.exit_code == 0, result.output
    whole = tmp_path / "whole.db"
    Indexer(whole, workers=0, image_size=128).index([root])
    want, got = _contents(whole), _contents(merged)
    assert sorted(got) == sorted(want)
    assert max(float(np.abs(got[p] - want[p]).max()) for p in want) == 0.0


def test_a_bad_shard_is_a_usage_error(photos, tmp_path):
    for bad in ("2/2", "1", "a/b", "-1/3"):
        result = CliRunner().invoke(main, ["index", str(photos), "--db", str(tmp_path / "x.db"), "--shard", bad])
        assert result.exit_code == 2 and "--shard" in result.output, result.output
