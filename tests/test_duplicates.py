"""lookalike duplicates: exact and near copies grouped, other shots of the scene left apart."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageEnhance, ImageOps

from cli import main
from conftest import make_poster
from indexer import Indexer
from search import Searcher, duplicates

DAY = 86400


def _save(img: Image.Image, path: Path, mtime: int, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    os.utime(path, (mtime, mtime))
    return path


def _moved_subject(img: Image.Image) -> Image.Image:
    """The scene again with one thing moved, as in the next frame of a burst."""
    out = img.copy()
    patch = img.crop((40, 60, 160, 180))
    out.paste(patch, (200, 300))
    return out


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> dict:
    """Posters with planted copies, indexed once: {name: path} plus the database."""
    root = tmp_path_factory.mktemp("library")
    original = make_poster(31)
    files = {
        "original": _save(original, root / "a" / "original.jpg", 1_000 * DAY, quality=95),
        "resized": _save(original.resize((240, 320)), root / "b" / "resized.jpg", 1_001 * DAY, quality=40),
        "grey": _save(ImageOps.grayscale(original).convert("RGB"), root / "b" / "grey.jpg", 1_002 * DAY),
        "turned": _save(original.transpose(Image.Transpose.ROTATE_90), root / "b" / "turned.jpg", 1_003 * DAY,
                        quality=70),
        "cropped": _save(ImageEnhance.Contrast(original.crop((12, 16, 348, 464))).enhance(1.2),
                         root / "b" / "cropped.jpg", 1_004 * DAY, quality=90),
        "burst": _save(_moved_subject(original), root / "c" / "burst.png", 1_005 * DAY),
        "other": _save(make_poster(32), root / "c" / "other.png", 1_006 * DAY),
        "other2": _save(make_poster(33), root / "c" / "other2.png", 1_007 * DAY),
    }
    twin = root / "c" / "other-copy.png"
    shutil.copyfile(files["other"], twin)
    os.utime(twin, (2_000 * DAY, 2_000 * DAY))  # younger than its twin: not the keeper
    files["twin"] = twin
    db = root / "lib.db"
    Indexer(db, workers=0).index([root])
    return {"db": db, "root": root, **{k: str(v) for k, v in files.items()}}


def _by_keeper(groups) -> dict:
    return {g.keeper.path: g for g in groups}


def test_finds_exact_and_near_copies_and_leaves_the_burst_frame_out(library):
    with Searcher(library["db"]) as s:
        groups = s.duplicates()
    found = _by_keeper(groups)
    assert set(found) == {library["original"], library["other"]}, [g.to_dict() for g in groups]
    near = found[library["original"]]
    assert near.kind == "near"
    assert {m.path for m in near.members} == {library[k] for k in
                                              ("original", "resized", "grey", "turned", "cropped")}
    assert library["burst"] not in {m.path for m in near.members}
    # Each copy was checked against the keeper itself: keypoints and a similarity.
    for m in near.members[1:]:
        assert m.inliers >= duplicates.MIN_INLIERS and 0 < m.similarity <= 1, m
    exact = found[library["other"]]
    assert exact.kind == "exact" and [m.path for m in exact.members] == [library["other"], library["twin"]]
    assert [m.similarity for m in exact.members] == [1.0, 1.0]


def test_the_keeper_has_the_most_pixels_then_the_largest_file_then_the_oldest(library):
    with Searcher(library["db"]) as s:
        found = _by_keeper(s.duplicates())
    near = found[library["original"]].members
    # The turned copy has as many pixels as the original; the original's file is larger.
    turned = next(m for m in near if m.path == library["turned"])
    assert turned.width * turned.height == near[0].width * near[0].height
    assert near[0].bytes > turned.bytes
    assert all(m.width * m.height <= near[0].width * near[0].height for m in near)
    # The twin has the same pixels and bytes: the older file is kept.
    exact = found[library["other"]].members
    assert exact[0].mtime < exact[1].mtime


def test_exact_only_and_folder_filter(library):
    with Searcher(library["db"]) as s:
        exact = s.duplicates(exact_only=True)
        under_b = s.duplicates(under=Path(library["root"]) / "b")
        under_ab = s.duplicates(under=[Path(library["root"]) / "a", Path(library["root"]) / "b"])
    assert [g.kind for g in exact] == ["exact"]
    # Under b alone the copies still match one another, without the original.
    assert len(under_b) == 1 and library["original"] not in {m.path for m in under_b[0].members}
    assert {m.path for m in under_ab[0].members} >= {library["original"], library["turned"]}


def test_a_strict_threshold_keeps_only_the_closest_copies(library):
    with Searcher(library["db"]) as s:
        loose = _by_keeper(s.duplicates())[library["original"]]
        strict = s.duplicates(threshold=0.999)
    strict_near = [g for g in strict if g.kind == "near"]
    assert sum(len(g.members) for g in strict_near) < len(loose.members)
    with pytest.raises(ValueError, match="threshold"):
        with Searcher(library["db"]) as s:
            s.duplicates(threshold=1.5)


def test_cli_listing_json_csv_and_sheet(library, tmp_path):
    runner = CliRunner()
    db = str(library["db"])
    result = runner.invoke(main, ["duplicates", "--db", db])
    assert result.exit_code == 0, result.output
    assert "group 1 (near, 5 images)" in result.output and "keep" in result.output

    result = runner.invoke(main, ["duplicates", "--db", db, "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [g["kind"] for g in lines] == ["near", "exact"]
    assert lines[0]["keeper"] == library["original"] == lines[0]["members"][0]["path"]
    assert set(lines[0]["members"][0]) == {"id", "path", "similarity", "inliers", "width", "height",
                                           "bytes", "mtime"}

    sheet = tmp_path / "dups.html"
    result = runner.invoke(main, ["duplicates", "--db", db, "--csv", "--html", str(sheet)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 7 and sum(r["keep"] == "1" for r in rows) == 2
    assert "data:image/jpeg;base64," in sheet.read_text()
    # Nothing was deleted or moved.
    assert all(Path(library[k]).exists() for k in ("resized", "grey", "turned", "cropped", "twin"))


def test_cli_refuses_bad_options_in_one_line(library):
    runner = CliRunner()
    result = runner.invoke(main, ["duplicates", "--db", str(library["db"]), "--threshold", "2"])
    assert result.exit_code == 2 and "threshold" in result.output
    result = runner.invoke(main, ["duplicates", "--db", str(library["db"]), "--json", "--csv"])
    assert result.exit_code == 2 and "--json and --csv" in result.output
    result = runner.invoke(main, ["duplicates", "--db", str(library["root"] / "none.db")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1


class _Pairs:
    """Stands in for the pair checker in the grouping tests: a fixed set of duplicate pairs."""

    def __init__(self, pairs):
        self.pairs = {tuple(sorted(p)) for p in pairs}

    def check(self, a, b):
        return (0.9, 20) if tuple(sorted((a, b))) in self.pairs else None


def _records(n):
    from datetime import datetime

    from indexer.store import ImageRecord

    # Image 1 has the most pixels, then 2, ...: keepers are predictable.
    return {i: ImageRecord(i, f"/p/{i}.jpg", 100 - i, 100, 1000, i, f"sha{i}", datetime(2026, 1, 1))
            for i in range(1, n + 1)}


def test_a_chain_of_neighbours_does_not_join_unrelated_pictures():
    # 1-2, 2-3, 3-4 are duplicates, but 1 and 3, 1 and 4 are not: a chain.
    edges = {(1, 2): (0.9, 20), (2, 3): (0.9, 20), (3, 4): (0.9, 20)}
    records = _records(4)
    checker = _Pairs(edges)
    groups = [g for c in duplicates._components(edges)
              for g in duplicates._split(c, edges, records, checker)]
    assert [[m.id for m in g.members] for g in groups] == [[1, 2], [3, 4]]


def test_members_joined_through_others_are_checked_against_the_keeper():
    # 2 is a copy of 1 and of 3, and 3 of 1 too (not a candidate pair): one group.
    edges = {(1, 2): (0.9, 20), (2, 3): (0.9, 20)}
    groups = duplicates._split({1, 2, 3}, edges, _records(3), _Pairs([*edges, (1, 3)]))
    assert [[m.id for m in g.members] for g in groups] == [[1, 2, 3]]


def test_without_local_features_pixels_confirm_whole_frame_copies(library, tmp_path):
    db = tmp_path / "global.db"
    Indexer(db, workers=0, local_features="none").index([library["root"] / "a", library["root"] / "b"])
    with Searcher(db) as s:
        groups = s.duplicates()
    assert len(groups) == 1, [g.to_dict() for g in groups]
    members = {m.path for m in groups[0].members}
    # Resized and recoloured copies keep the frame; a crop or a turn cannot be placed.
    assert {library["original"], library["resized"], library["grey"]} <= members
    assert library["turned"] not in members and library["cropped"] not in members


def test_query_writes_a_contact_sheet_beside_its_table(library, tmp_path):
    sheet = tmp_path / "out" / "sheet.html"
    result = CliRunner().invoke(main, ["query", library["resized"], "--db", str(library["db"]), "-k", "3",
                                       "--html", str(sheet)])
    assert result.exit_code == 1 and "out/sheet.html" in result.output  # its folder does not exist
    sheet.parent.mkdir()
    result = CliRunner().invoke(main, ["query", library["resized"], "--db", str(library["db"]), "-k", "3",
                                       "--html", str(sheet)])
    assert result.exit_code == 0, result.output
    assert "original.jpg" in result.stdout
    html = sheet.read_text()
    assert html.count("data:image/jpeg;base64,") == 4  # the query and its three results
    assert "original.jpg" in html


def test_the_same_groups_with_caches_smaller_than_the_collection(library, monkeypatch):
    with Searcher(library["db"]) as s:
        expected = [g.to_dict() for g in s.duplicates()]
    monkeypatch.setattr(duplicates, "PAIR_BATCH", 2)
    monkeypatch.setattr(duplicates, "CACHE", 4)  # features and pictures evicted and read again
    with Searcher(library["db"]) as s:
        assert [g.to_dict() for g in s.duplicates()] == expected
