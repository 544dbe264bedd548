"""Local features and verification: the same object at an angle, cropped, turned or mirrored is
found first, with the box where it appears; what is stored stays in step with the images."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from conftest import apply_homography, homography, make_photo, make_poster, photograph
from indexer import Indexer, RecipeMismatch, local
from indexer.decode import open_image
from search import Searcher
from search.verify import MIN_INLIERS, rank_order

SIZE = 128  # the global descriptor's image size in these tests; local features keep their own


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


# Where poster 1 lands in its photo: small, at an angle, its bottom-right corner out of the frame.
TARGET = [(300, 150), (480, 180), (510, 495), (280, 440)]


@pytest.fixture(scope="module")
def covers(tmp_path_factory):
    """Photos of fifty posters on one table, indexed; poster 1 is the one at an angle."""
    tmp = tmp_path_factory.mktemp("covers")
    root = tmp / "photos"
    root.mkdir()
    table = make_photo(99, (640, 480))
    photograph(make_poster(1), TARGET, table).save(root / "target.jpg", quality=90)
    for seed in range(2, 51):
        jitter = np.random.default_rng(seed).integers(-40, 40, (4, 2))
        corners = np.array([(160, 40), (480, 40), (480, 440), (160, 440)]) + jitter
        photograph(make_poster(seed), corners, table).save(root / f"other{seed}.jpg", quality=90)
    make_poster(1).save(tmp / "poster1.png")
    db = tmp / "covers.db"
    # Fifty: enough to be centred, so that similarities spread out as in real use.
    Indexer(db, image_size=SIZE, workers=0).index([root])
    return tmp, root, db


def test_a_cover_photographed_at_an_angle_is_verified_first_with_its_box(covers):
    """The test that fails if verification stops helping: on the global descriptor alone
    another cover on the same table comes first."""
    tmp, root, db = covers
    with Searcher(db) as s:
        plain = s.search(tmp / "poster1.png", k=3, verify=0)
        assert plain[0].path != str(root / "target.jpg")
        assert all(m.inliers == 0 and m.box is None for m in plain)
        top = s.search(tmp / "poster1.png", k=3)
    assert top[0].path == str(root / "target.jpg")
    assert top[0].inliers >= 2 * MIN_INLIERS
    assert np.abs(np.array(top[0].box) - np.array(TARGET)).max() < 3
    # The other covers lie on the same table: a few of its features may match, never as many.
    assert all(m.inliers < top[0].inliers / 2 for m in top[1:])


def test_a_turned_or_mirrored_query_is_verified_with_its_corners_in_order(covers):
    tmp, root, db = covers
    poster = Image.open(tmp / "poster1.png")
    w, h = poster.size
    with Searcher(db) as s:
        # Turned 90 degrees counter-clockwise: the query's top-left corner is the poster's
        # top-right one, and so on round.
        turned = s.search(np.asarray(poster.transpose(Image.Transpose.ROTATE_90)), k=1)[0]
        assert turned.path == str(root / "target.jpg") and turned.inliers >= MIN_INLIERS
        assert np.abs(np.array(turned.box) - np.array(TARGET)[[1, 2, 3, 0]]).max() < 3
        upside_down = s.search(np.asarray(poster.transpose(Image.Transpose.ROTATE_180)), k=1)[0]
        assert upside_down.path == str(root / "target.jpg")
        assert np.abs(np.array(upside_down.box) - np.array(TARGET)[[2, 3, 0, 1]]).max() < 3
        # A mirrored copy of the photo: near the top of the global list (the network hardly
        # tells a picture from its mirror image), verified through the mirrored view; its
        # top-left corner is the photo's top-right one.
        photo = Image.open(root / "target.jpg")
        mirrored = s.search(np.asarray(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), k=1)[0]
        assert mirrored.path == str(root / "target.jpg") and mirrored.inliers >= 10 * MIN_INLIERS
        assert np.abs(np.array(mirrored.box) - [(640, 0), (0, 0), (0, 480), (640, 480)]).max() < 3
        assert (w, h) == (360, 480)


def test_a_region_query_is_boxed_where_the_region_is(covers):
    tmp, root, db = covers
    # The poster's upper two thirds, as a box of the flat poster: its outline lands on that
    # part of the poster in the photo.
    with Searcher(db) as s:
        top = s.search(tmp / "poster1.png", k=1, box=(0, 0, 360, 320))[0]
    assert top.path == str(root / "target.jpg") and top.inliers >= MIN_INLIERS
    truth = homography([(0, 0), (360, 0), (360, 480), (0, 480)], TARGET)
    want = apply_homography(truth, [(0, 0), (360, 0), (360, 320), (0, 320)])
    assert np.abs(np.array(top.box) - want).max() < 6


def test_query_cli_shows_inliers_and_json_gives_the_box(covers):
    tmp, root, db = covers
    result = run("query", tmp / "poster1.png", "--db", db, "-k", "2")
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[1].split()
    assert first[0] == "1" and int(first[2]) >= MIN_INLIERS and first[3] == str(root / "target.jpg")
    result = run("query", tmp / "poster1.png", "--db", db, "-k", "5", "--json")
    assert result.exit_code == 0, result.output
    results = json.loads(result.output)["results"]
    hit = results[0]
    assert hit["inliers"] >= MIN_INLIERS and len(hit["box"]) == 4
    assert np.abs(np.array(hit["box"]) - np.array(TARGET)).max() < 3
    assert all((r["box"] is None) == (r["inliers"] == 0) for r in results)
    assert any(r["box"] is None for r in results)
    result = run("query", tmp / "poster1.png", "--db", db, "-k", "2", "--json", "--verify", "0")
    assert all(r["inliers"] == 0 for r in json.loads(result.output)["results"])


def test_verification_never_pushes_a_strong_unverified_match_below_a_weak_verified_one():
    # A shortlist in global order: a near-copy that cannot be verified (a thumbnail without
    # keypoints) keeps its place above verified results, even one with many inliers, which
    # passes every middling similarity; a few inliers lift less; nothing moves down.
    similarity = np.array([0.95, 0.6, 0.5, 0.45, 0.4, 0.3, 0.2])
    inliers = np.array([0, 0, MIN_INLIERS - 1, 0, MIN_INLIERS, 0, 200])
    order = list(rank_order(similarity, inliers))
    assert order == [0, 6, 4, 1, 2, 3, 5]
    # The same order when the similarities are rescaled keeping 1 in place (no centring).
    assert list(rank_order(0.5 + similarity / 2, inliers)) == order
    # Nothing verified: the global order.
    assert list(rank_order(similarity, np.zeros(7))) == list(range(7))


def test_verified_results_are_ordered_by_inliers_and_similarity_together():
    # A copy turned sideways (low global similarity, 430 inliers) passes another photo of
    # the same building (30 inliers); of two like counts the globally closer leads.
    assert list(rank_order(np.array([0.74, 0.43]), np.array([30, 430]))) == [1, 0]
    assert list(rank_order(np.array([0.94, 0.83]), np.array([20, 25]))) == [0, 1]
    # An unverified result is never lifted over a verified one it was below, even when a
    # strongly verified result from further down leads them both.
    assert list(rank_order(np.array([0.9, 0.89, 0.2]), np.array([MIN_INLIERS, 0, 400]))) == [2, 0, 1]
    # And a weakly verified one does not pass it: 0.3 with 10 inliers is worth 0.72 < 0.89.
    assert list(rank_order(np.array([0.89, 0.3]), np.array([0, MIN_INLIERS]))) == [0, 1]


# -- local features --------------------------------------------------------
def test_the_mirrored_view_equals_a_real_extraction_of_the_mirrored_picture():
    gray = np.asarray(make_poster(3).convert("L"))
    kp = local.extract(gray, 300)
    mirrored = local.extract(np.ascontiguousarray(gray[:, ::-1]), 300)
    view = local.views(kp, mirror=True)[1]
    real = local.views(mirrored)[0]
    # Pair keypoints by place; the permuted descriptors must be the real ones.
    d = ((view.xy[:, None] - real.xy[None]) ** 2).sum(-1)
    j = d.argmin(axis=1)
    close = d[np.arange(len(j)), j] < 1.0
    assert close.sum() > 100
    cos = (view.desc[close] * real.desc[j[close]]).sum(axis=1)
    assert np.median(cos) > 0.99


def test_features_round_trip_and_damage_is_named():
    kp = local.extract(np.asarray(make_poster(4).convert("L")), 200)
    assert 100 < len(kp.xy) <= 200
    blob = local.encode(kp)
    assert len(blob) < 40 * 200  # 36 bytes a keypoint and a small header
    f = local.decode(blob)
    assert np.abs(f.xy - kp.xy).max() < 0.01
    assert np.allclose(np.linalg.norm(f.desc, axis=1), 1, atol=1e-5)
    assert (f.desc * local.project(kp.raw)).sum(axis=1).min() > 0.99
    assert local.agreement(f, local.decode(blob)) == 1.0
    with pytest.raises(local.FeaturesError, match="truncated"):
        local.decode(blob[:10])
    with pytest.raises(local.FeaturesError, match="expected"):
        local.decode(blob[:-36])
    damaged = bytearray(blob)
    damaged[-5] ^= 0xFF
    with pytest.raises(local.FeaturesError, match="checksum"):
        local.decode(bytes(damaged))
    empty = local.decode(local.encode(local.extract(np.zeros((50, 60), np.uint8))))
    assert len(empty) == 0 and (empty.width, empty.height) == (60, 50)


def test_the_grey_picture_comes_from_the_same_decode_and_is_never_enlarged(tmp_path):
    big = tmp_path / "big.jpg"
    make_photo(1, (1600, 1200)).save(big, quality=90)
    d = open_image(big, 128, gray=480)
    assert d.pixels.shape == (96, 128, 3) and d.gray.shape == (360, 480)
    small = tmp_path / "small.png"
    make_photo(2, (200, 100)).save(small)
    assert open_image(small, 128, gray=480).gray.shape == (100, 200)
    assert open_image(big, 128, gray=480, box=(0, 0, 400, 300)).gray.shape == (300, 400)
    assert open_image(big, 128).gray is None


# -- what is stored ----------------------------------------------------------
def _local_rows(db) -> dict[int, bytes]:
    with sqlite3.connect(db) as con:
        return dict(con.execute("select image_id, data from local_features"))


def _ok_ids(db) -> set[int]:
    with sqlite3.connect(db) as con:
        return {r[0] for r in con.execute("select id from images where status = 'ok'")}


def test_local_features_follow_moves_changes_and_deletes(photos, db):
    Indexer(db, image_size=SIZE, workers=0).index([photos])
    first = _local_rows(db)
    assert set(first) == _ok_ids(db) and len(first) == 6
    (photos / "p0.jpg").rename(photos / "moved.jpg")
    (photos / "p1.jpg").unlink()
    make_photo(50).save(photos / "p2.jpg", quality=90)  # changed content
    (photos / "p3.jpg").write_bytes(b"not an image any more")
    (photos / "copy.jpg").write_bytes((photos / "p4.jpg").read_bytes())
    summary = Indexer(db, image_size=SIZE, workers=0).index([photos])
    assert (summary.moved, summary.removed, summary.updated, summary.failed, summary.added) == (1, 1, 1, 1, 1)
    after = _local_rows(db)
    assert set(after) == _ok_ids(db)
    with Searcher(db) as s:
        assert after[s.id_of(photos / "moved.jpg")] == first[s.id_of(photos / "moved.jpg")]
        assert after[s.id_of(photos / "copy.jpg")] == after[s.id_of(photos / "p4.jpg")]
        assert after[s.id_of(photos / "p2.jpg")] != first[s.id_of(photos / "p2.jpg")]
    assert run("check", "--db", db).exit_code == 0


def test_check_finds_missing_damaged_and_stray_local_features_and_repair_mends_them(photos, db):
    Indexer(db, image_size=SIZE, workers=0).index([photos])
    good = _local_rows(db)
    ids = sorted(good)
    with sqlite3.connect(db) as con:
        con.execute("pragma foreign_keys = off")  # as another tool might write it
        con.execute("delete from local_features where image_id = ?", (ids[0],))
        con.execute("update local_features set data = substr(data, 1, length(data) - 4) "
                    "where image_id = ?", (ids[1],))
        con.execute("insert into local_features (image_id, data) values (9999, x'00')")
    result = run("check", "--db", db)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert any(f"(id {ids[0]}): it has no local features" in line for line in lines), result.output
    assert any(f"(id {ids[1]}): local features of " in line and "expected" in line
               for line in lines), result.output
    assert "row: local features of id 9999, which is not an indexed image" in lines
    result = run("check", "--db", db, "--repair")
    assert result.exit_code == 0, result.output
    assert _local_rows(db) == good
    assert run("check", "--db", db).exit_code == 0


def test_check_finds_local_features_that_differ_from_a_fresh_extraction(photos, db):
    Indexer(db, image_size=SIZE, workers=0).index([photos])
    rows = _local_rows(db)
    other = local.encode(local.extract(np.asarray(make_poster(8).convert("L").resize((96, 64)))))
    victim = min(rows)
    with sqlite3.connect(db) as con:
        con.execute("update local_features set data = ? where image_id = ?", (other, victim))
    result = run("check", "--db", db, "--all")
    assert result.exit_code == 1
    assert "its local features differ from a fresh extraction" in result.output, result.output
    assert run("check", "--db", db, "--repair", "--all").exit_code == 0
    assert _local_rows(db) == rows


def test_without_local_features_nothing_is_stored_and_verification_is_refused(photos, db):
    result = run("index", photos, "--db", db, "--image-size", SIZE, "--local-features", "none",
                 "--workers", 0)
    assert result.exit_code == 0, result.output
    assert _local_rows(db) == {}
    with Searcher(db) as s:
        assert s.recipe.local_features == "none" and s.verify_depth(None) == 0
        assert s.search(photos / "p0.jpg", k=1)[0].inliers == 0
    result = run("query", photos / "p0.jpg", "--db", db, "--verify", "5")
    assert result.exit_code == 1
    assert "holds no local features to verify with" in result.output
    # The recipe is kept: asking for local features on this database is refused.
    with pytest.raises(RecipeMismatch, match="local_features: index has none, asked for sift"):
        Indexer(db, local_features="sift", workers=0).index([photos])
    assert "local_features none" in run("info", "--db", db).output


def test_keypoints_are_part_of_the_recipe(photos, db):
    Indexer(db, image_size=SIZE, keypoints=100, workers=0).index([photos])
    assert all(len(local.decode(b)) <= 100 for b in _local_rows(db).values())
    with pytest.raises(RecipeMismatch, match="local_keypoints: index has 100, asked for 200"):
        Indexer(db, keypoints=200, workers=0).index([photos])
    result = run("index", photos, "--db", db, "--keypoints", "5")
    assert result.exit_code == 2 and "5 is not in the range 16<=x<=4000" in result.output


def test_a_database_from_before_local_features_is_upgraded_and_searched_without_them(photos, db):
    Indexer(db, image_size=SIZE, local_features="none", workers=0).index([photos])
    # Make it what lookalike wrote before: schema 0001, a recipe without the local fields.
    with sqlite3.connect(db) as con:
        recipe = json.loads(con.execute("select value from settings where key = 'recipe'").fetchone()[0])
        for key in ("local_features", "local_size", "local_keypoints", "local_codec"):
            del recipe[key]
        con.execute("update settings set value = ? where key = 'recipe'", (json.dumps(recipe),))
        con.execute("drop table local_features")
        con.execute("drop table retuned")
        con.execute("drop index ix_images_status")
        con.execute("update alembic_version set version_num = '0001'")
    with Searcher(db) as s:
        assert s.recipe.local_features == "none" and s.verify_depth(None) == 0
        assert s.search(photos / "p0.jpg", k=1)[0].path == str(photos / "p0.jpg")
    summary = Indexer(db, workers=0).index([photos])
    assert summary.unchanged == 6
    with sqlite3.connect(db) as con:
        assert con.execute("select version_num from alembic_version").fetchone()[0] == "0004"
    assert run("check", "--db", db).exit_code == 0
