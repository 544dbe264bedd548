"""Tuning to a labelled collection: whitening learned from groups (lookalike tune, evaluate --tune-on)."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from conftest import labelled_set, save_photo
from indexer import Indexer
from indexer.groundtruth import leave_one_out_map as mean_ap
from indexer.whitening import (
    LEARNED,
    Whitening,
    WhiteningError,
    learn,
    learn_from_groups,
    pair_count,
)
from search import Searcher

SIZE = ["--image-size", "64", "--local-features", "none", "--workers", "0"]


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def info(db: Path) -> dict:
    result = run("info", "--db", db, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# -- the projection ------------------------------------------------------------
def brute_force(x: np.ndarray, groups: list[str], dim: int, shrinkage: float) -> np.ndarray:
    """Learned whitening by listing every matching pair, for comparison."""
    mean = x.mean(axis=0)
    diffs = np.array([x[i] - x[j] for i, j in itertools.combinations(range(len(x)), 2)
                      if groups[i] == groups[j]])
    w, v = np.linalg.eigh(diffs.T @ diffs / len(diffs))
    w = (1 - shrinkage) * w + shrinkage * w.mean()
    first = v / np.sqrt(w)
    y = (x - mean) @ first
    w2, v2 = np.linalg.eigh(y.T @ y / len(x))
    p = first @ v2[:, np.argsort(w2)[::-1][:dim]]
    out = (x - mean) @ p
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_pair_covariance_in_closed_form_equals_listing_the_pairs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12))
    groups = [f"g{i % 7}" for i in range(40)]
    w = learn_from_groups(x, groups, dim=8, shrinkage=0.2)
    assert w.kind == LEARNED and w.dim == 8 and w.projection.shape == (12, 8)
    ours, theirs = w.apply(x), brute_force(x, groups, 8, 0.2)
    # Eigenvector signs are arbitrary: compare what search sees, the similarities.
    np.testing.assert_allclose(ours @ ours.T, theirs @ theirs.T, atol=1e-4)
    assert pair_count(groups) == sum(n * (n - 1) // 2 for n in (6, 6, 6, 6, 6, 5, 5))


def nuisance_data(seed: int, groups: int, per: int = 4, dim: int = 64):
    """Groups whose views differ mostly along a few nuisance directions shared by all groups."""
    rng = np.random.default_rng(seed)
    nuisance = np.linalg.qr(np.random.default_rng(99).normal(size=(dim, 6)))[0].T
    x, labels = [], []
    for g in range(groups):
        centre = rng.normal(size=dim)
        for _ in range(per):
            x.append(centre + 4.0 * rng.normal(size=6) @ nuisance + 0.3 * rng.normal(size=dim))
            labels.append(f"{seed}-{g}")
    x = np.array(x)
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.array(labels)


def test_learned_whitening_finds_groups_it_never_saw_where_centring_fails():
    train, train_labels = nuisance_data(1, groups=30)
    test, test_labels = nuisance_data(2, groups=30)
    centred = mean_ap(learn(test, "center").apply(test), test_labels)
    tuned = learn_from_groups(train, train_labels).centred(test)
    assert mean_ap(tuned.apply(test), test_labels) > centred + 0.2, centred


def test_too_few_pairs_and_a_bad_dimension_are_refused():
    x = np.random.default_rng(0).normal(size=(10, 8))
    with pytest.raises(WhiteningError, match="needs at least 20 matching pairs.*give 5"):
        learn_from_groups(x, ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"])
    with pytest.raises(WhiteningError, match="to 9 dimensions: choose 1..8"):
        learn_from_groups(np.tile(x, (3, 1)), ["a"] * 30, dim=9)


def test_a_learned_whitening_survives_its_json():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 16))
    w = learn_from_groups(x, [f"g{i % 3}" for i in range(30)], dim=5, name="mine").centred(x[:20])
    back = Whitening.from_json(w.to_json())
    assert (back.kind, back.dim, back.centred_on, back.source) == (LEARNED, 5, 20, w.source)
    assert "mine: 3 groups, 135 matching pairs" in back.describe()
    np.testing.assert_array_equal(back.apply(x), w.apply(x))


# -- lookalike tune ------------------------------------------------------------
def test_tune_a_new_database_then_index_and_query(tmp_path, photos):
    labelled, db = labelled_set(tmp_path / "labelled"), tmp_path / "tuned.db"
    result = run("tune", labelled, "--db", db, *SIZE)
    assert result.exit_code == 0, result.output
    assert "tuned (whiten)" in result.output and "24 of the labelled images embedded" in result.output
    data = info(db)
    assert data["counts"]["ok"] == 0  # the labelled images are not part of the collection
    assert data["whitening"].startswith("learned from 24 labelled images (labelled: 8 groups, 24 matching pairs)")
    assert "centred on the labelled images" in data["whitening"]

    result = run("index", photos, "--db", db)  # the recipe is the tuned database's
    assert result.exit_code == 0, result.output
    assert info(db)["whitening"].startswith("learned from 24")  # "auto" keeps a tuned whitening
    result = run("query", photos / "p1.jpg", "--db", db, "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    first = json.loads(result.output.splitlines()[0])["results"][0]
    assert first["path"] == str(photos / "p1.jpg") and first["score"] == pytest.approx(1.0, abs=1e-4)
    result = run("check", "--db", db)
    assert result.exit_code == 0, result.output

    result = run("tune", "--undo", "--db", db)
    assert result.exit_code == 0, result.output
    assert "the learned whitening is replaced by the default" in result.output
    assert info(db)["whitening"] is None
    assert run("tune", "--db", db, labelled).exit_code == 0
    result = run("whiten", "--db", db, "--kind", "auto")  # the same, by the whitening's command
    assert result.exit_code == 0, result.output
    assert "centring comes once 50 images are indexed" in result.output
    assert info(db)["whitening"] is None
    result = run("tune", "--db", db)
    assert result.exit_code == 2 and "missing the LABELLED set" in result.output


def test_tuning_reuses_what_is_indexed_and_centres_on_the_collection(tmp_path):
    labelled, db = labelled_set(tmp_path / "labelled"), tmp_path / "index.db"
    for i in range(52):
        save_photo(tmp_path / "collection" / f"c{i}.png", seed=900 + i)
    assert run("index", labelled, tmp_path / "collection", "--db", db, *SIZE).exit_code == 0
    result = run("tune", labelled / "groundtruth.csv", "--db", db, "--dim", "16")
    assert result.exit_code == 0, result.output
    assert "0 of the labelled images embedded" in result.output
    assert "16 dimensions" in info(db)["whitening"]
    assert "centred on the collection's 76 images" in info(db)["whitening"]
    result = run("whiten", "--db", db, "--kind", "auto")
    assert result.exit_code == 0 and result.output.startswith("centred"), result.output
    assert run("tune", labelled, "--db", db, "--dim", "16").exit_code == 0
    with Searcher(db) as s:
        assert s.whitening.dim == 16
        own = s.id_of(str(labelled / "g0" / "v0.jpg"))
        matches = s.search(labelled / "g0" / "v0.jpg", k=2)
        assert matches[0].id == own and matches[0].score == pytest.approx(1.0, abs=1e-4)


def test_a_tuned_empty_database_centres_on_the_collection_once_it_has_enough(tmp_path):
    labelled, db = labelled_set(tmp_path / "labelled"), tmp_path / "index.db"
    assert Indexer(db, image_size=64, local_features="none", workers=0).tune(labelled).pairs == 24
    for i in range(50):
        save_photo(tmp_path / "collection" / f"c{i}.png", seed=1900 + i)
    Indexer(db, workers=0).index([tmp_path / "collection"])
    assert "centred on the collection's 50 images" in info(db)["whitening"]


def test_a_bad_file_in_the_labelled_set_is_left_out_and_named(tmp_path):
    labelled = labelled_set(tmp_path / "labelled", groups=9)
    (labelled / "g0" / "v0.jpg").write_bytes(b"not a picture")
    result = run("tune", labelled, "--db", tmp_path / "t.db", *SIZE)
    assert result.exit_code == 0, result.output
    assert f"failed: {labelled / 'g0' / 'v0.jpg'}:" in result.output
    assert "1 unreadable" in result.output
    assert "learned from 26 labelled images" in info(tmp_path / "t.db")["whitening"]


@pytest.mark.parametrize("csv_text, message", [
    ("path,label\na.jpg,1\n", "needs the columns path and group, has label, path"),
    ("path,group\n", "no images listed"),
])
def test_a_bad_ground_truth_is_one_line(tmp_path, csv_text, message):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "groundtruth.csv").write_text(csv_text)
    result = run("tune", tmp_path / "set", "--db", tmp_path / "t.db")
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    result = run("tune", tmp_path, "--db", tmp_path / "t.db")
    assert result.exit_code == 1 and "no groundtruth.csv in this folder" in result.output


def test_too_few_labelled_pairs_are_refused_and_nothing_is_stored(tmp_path, photos, db):
    assert run("index", photos, "--db", db, *SIZE).exit_code == 0
    before = info(db)["whitening"]
    result = run("tune", labelled_set(tmp_path / "labelled", groups=3), "--db", db)
    assert result.exit_code == 1 and "needs at least 20 matching pairs" in result.output, result.output
    assert info(db)["whitening"] == before


# -- lookalike evaluate --tune-on ----------------------------------------------
def test_evaluate_tuned_on_another_set(tmp_path):
    learn_on = labelled_set(tmp_path / "A", groups=8, first_seed=700)
    measure = labelled_set(tmp_path / "B", groups=6, first_seed=800)
    result = run("evaluate", measure, "--tune-on", learn_on, "--json", *SIZE)
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output.splitlines()[-1])
    assert scores["tuning"].startswith("tuned (whiten)")
    assert scores["whitening"].startswith("learned from 24 labelled images (A: 8 groups")
    untuned = json.loads(run("evaluate", measure, "--json", *SIZE).output.splitlines()[-1])
    assert untuned["tuning"] is None and untuned["map"] != scores["map"]

    result = run("evaluate", measure, "--tune-on", measure, *SIZE)
    assert result.exit_code == 1 and "18 of its images are in the set measured" in result.output
    result = run("evaluate", measure, "--tune-on", learn_on, "--whiten", "center", *SIZE)
    assert result.exit_code == 1 and "leave --whiten at auto" in result.output
