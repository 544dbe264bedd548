"""Contact sheets: self-contained HTML of search results and duplicate groups."""
from __future__ import annotations

import base64
import io
import os
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_photo, save_photo
from search import Match, Searcher, sheet


class Page(HTMLParser):
    """What a browser would see: the text, each <img>'s src, links, and figures' classes."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.imgs, self.links, self.figures, self.chunks, self.polygons = [], [], [], [], []
        self.in_style = False
        self.feed(text)
        self.text = "".join(self.chunks)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.in_style = tag == "style"
        if tag == "br":
            self.chunks.append("\n")
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "a":
            self.links.append(a["href"])
        elif tag == "figure":
            self.figures.append(a.get("class", ""))
        elif tag in ("polygon", "svg"):
            self.polygons.append((tag, a))

    def handle_endtag(self, tag):
        self.in_style = False

    def handle_data(self, data):
        if not self.in_style:
            self.chunks.append(data)


def jpeg_of(src: str) -> Image.Image:
    assert src.startswith("data:image/jpeg;base64,"), src[:40]
    im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
    assert im.format == "JPEG"
    im.load()
    return im


def assert_self_contained(text: str) -> Page:
    assert not re.search(r"https?://", text)
    assert not re.search(r"""(src|href)\s*=\s*["']?/""", text)
    assert "<script" not in text and "<link" not in text and "@import" not in text and "url(" not in text
    page = Page(text)
    for img in page.imgs:
        jpeg_of(img["src"])
    assert all(link.startswith("file:///") for link in page.links)
    return page


def match(path: Path, score: float = 0.5, id: int = 1, size=(96, 64), **kw) -> Match:
    return Match(id=id, path=str(path), score=score, width=size[0], height=size[1], **kw)


def test_query_sheet_is_one_self_contained_file(tmp_path):
    paths = [save_photo(tmp_path / f"p{i}.jpg", seed=i, quality=92) for i in range(3)]
    html = sheet.query_sheet([(paths[0], [match(paths[0], 1.0), match(paths[1], 0.81234, 2, inliers=17)]),
                              (paths[2], [match(paths[1], 0.4, 2)])], title="My sheet")
    page = assert_self_contained(html)
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    assert "<title>My sheet</title>" in html and "2 queries, 3 results" in page.text
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", page.text)  # the date
    assert len(page.imgs) == 5  # 2 queries + 3 results, none missing
    assert "score 1.0000" in page.text and "score 0.8123" in page.text and "score 0.4000" in page.text
    assert page.text.count("inliers") == 1 and "17 inliers" in page.text
    assert "#1" in page.text and "#2" in page.text
    assert page.figures.count("query") == 2
    assert Path(paths[1]).as_uri() in page.links and str(paths[1]) in page.text


def test_thumbnails_are_upright_for_an_exif_rotated_source(tmp_path):
    upright = make_photo(3, (120, 80))
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned; the tag says turn it back
    rotated = tmp_path / "rotated.jpg"
    upright.transpose(Image.Transpose.ROTATE_270).save(rotated, quality=95, exif=exif)
    assert Image.open(rotated).size == (80, 120)
    html = sheet.query_sheet([(rotated, [match(rotated, 1.0, size=(120, 80))])], thumb=64)
    page = assert_self_contained(html)
    for img in page.imgs:
        shown = jpeg_of(img["src"]).convert("RGB")
        assert shown.size == (64, 43)  # landscape, never enlarged past `thumb`
        want = np.asarray(upright.resize(shown.size), np.float32)
        assert np.abs(np.asarray(shown, np.float32) - want).mean() < 20


def test_paths_and_titles_are_escaped(tmp_path):
    odd = save_photo(tmp_path / 'a<b&c"d>e\'.jpg', seed=1)
    html = sheet.query_sheet([(odd, [match(odd, 1.0)])], title='<i>"me" & you</i>')
    page = assert_self_contained(html)
    assert "<i>" not in html and 'a<b' not in html and 'c"d' not in html
    assert '<i>"me" & you</i>' in page.text  # shown as text, as written
    assert page.text.count(str(odd)) >= 2  # the query's heading, its card and the result's card
    assert odd.as_uri() in page.links
    assert len(page.imgs) == 2 and all(img["alt"] == str(odd) for img in page.imgs)


def test_a_file_without_a_thumbnail_gets_a_placeholder_with_the_reason(tmp_path):
    good = save_photo(tmp_path / "good.jpg", seed=2)
    gone = tmp_path / "gone.jpg"
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    html = sheet.query_sheet([(gone, [match(good, 0.9), match(text, 0.8, 2), match(gone, 0.7, 3)])])
    page = assert_self_contained(html)
    assert len(page.imgs) == 1  # only the good one
    missing = re.findall(r'<div class="missing">([^<]*)</div>', html)
    assert missing == ["file not found", "not an image Pillow can read", "file not found"]
    assert gone.as_uri() in page.links and text.as_uri() in page.links


def test_each_path_is_thumbnailed_once_per_sheet(tmp_path, monkeypatch):
    paths = [save_photo(tmp_path / f"p{i}.jpg", seed=i) for i in range(2)]
    made = []
    real = sheet.thumbnail
    monkeypatch.setattr(sheet, "thumbnail", lambda p, *a, **kw: made.append(p) or real(p, *a, **kw))
    entries = [(p, [match(paths[0]), match(paths[1], id=2)]) for p in paths]
    page = Page(sheet.query_sheet(entries))
    assert sorted(made) == sorted(str(p) for p in paths)
    assert len(page.imgs) == 6 and len({img["src"] for img in page.imgs}) == 2
    sheet.query_sheet(entries)  # a new sheet makes its own
    assert len(made) == 4


def test_a_box_is_an_svg_polygon_scaled_to_the_thumbnail(tmp_path):
    big = save_photo(tmp_path / "big.png", seed=4, size=(512, 256))
    box = ((100, 40), (300, 40.4), (300, 200), (-20, 200))  # corners may lie outside
    html = sheet.query_sheet([(big, [match(big, 0.9, size=(512, 256), inliers=42, box=box),
                                     match(big, 0.5, id=2, size=(512, 256))])], thumb=128)
    page = assert_self_contained(html)
    assert [jpeg_of(img["src"]).size for img in page.imgs] == [(128, 64)] * 3
    svgs = [a for tag, a in page.polygons if tag == "svg"]
    polygons = [a for tag, a in page.polygons if tag == "polygon"]
    assert len(svgs) == 1 and len(polygons) == 1  # the match without a box has none
    assert svgs[0]["viewbox"] == "0 0 128.0 64.0"
    assert polygons[0]["points"] == "25.0,10.0 75.0,10.1 75.0,50.0 -5.0,50.0"
    # The overlay lies over the result's own <img>, inside the same thumbnail box.
    assert re.search(r'<div class="thumb"><img [^>]*><svg [^>]*><polygon [^>]*/></svg></div>', html)


@dataclass(frozen=True)
class StandInMember:
    """The attributes of search.duplicates.Member that a sheet reads."""

    id: int
    path: str
    similarity: float
    inliers: int
    width: int
    height: int
    bytes: int
    mtime: str


@dataclass(frozen=True)
class StandInGroup:
    kind: str
    members: tuple


def test_duplicates_sheet_marks_the_keeper(tmp_path):
    a, b, c = (save_photo(tmp_path / f"d{i}.jpg", seed=9 if i < 2 else 10) for i in range(3))
    gone = tmp_path / "gone&<x>.jpg"

    def member(i, path, sim, inliers=0):
        return StandInMember(i, str(path), sim, inliers, 96, 64, 12345 + i, "2024-05-01T10:00:00")

    groups = [StandInGroup("exact", (member(1, a, 1.0), member(2, b, 1.0))),
              StandInGroup("near", (member(3, c, 1.0), member(4, gone, 0.93456, inliers=31)))]
    html = sheet.duplicates_sheet(groups, title="dups")
    page = assert_self_contained(html)
    assert "2 groups (1 exact, 1 near), 4 images" in page.text
    assert page.figures == ["keep", "", "keep", ""]
    assert page.text.count("keep") == 2
    assert re.findall(r'<figure class="keep">.*?</figure>', html)[0].count(a.as_uri()) == 1
    assert "similarity 0.9346" in page.text and "31 inliers" in page.text
    assert "96×64 px · 12,346 bytes" in page.text and "2024-05-01T10:00:00" in page.text
    assert str(gone) in page.text and "file not found" in page.text
    assert len(page.imgs) == 3


def test_write_sheet_writes_utf8_atomically(tmp_path):
    html = sheet.query_sheet([], title="empty — ünïcode")
    out = tmp_path / "sheet.html"
    out.write_text("old")
    sheet.write_sheet(out, html)
    assert out.read_text(encoding="utf-8") == html
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheet.html"]  # no temp file left
    with pytest.raises(OSError):
        sheet.write_sheet(tmp_path / "no-such-folder" / "sheet.html", html)
    assert "0 queries, 0 results" in Page(html).text


def test_a_sheet_of_real_search_results(photos, db):
    from indexer import Indexer

    Indexer(db, workers=0).index([photos])
    queries = [photos / "p2.jpg", photos / "sub" / "p5.png"]
    with Searcher(db) as s:
        entries = [(q, s.search(q, k=3)) for q in queries]
    html = sheet.query_sheet(entries, thumb=64)
    page = assert_self_contained(html)
    assert "2 queries, 6 results" in page.text and len(page.imgs) == 8
    assert "score 1.0000" in page.text
    for q, matches in entries:
        assert matches[0].path == str(q.resolve())
        assert Path(matches[0].path).as_uri() in page.links
    out = db.parent / "results.html"
    sheet.write_sheet(out, html)
    assert out.read_text(encoding="utf-8") == html


def test_a_sheet_of_real_duplicate_groups(photos, db):
    duplicates = pytest.importorskip("search.duplicates")
    from indexer import Indexer

    copy = photos / "sub" / "copy of p1.jpg"
    copy.write_bytes((photos / "p1.jpg").read_bytes())
    Indexer(db, workers=0).index([photos])
    with Searcher(db) as s:
        groups = duplicates.find(s)
    exact = [g for g in groups if g.kind == "exact"]
    assert len(exact) == 1
    html = sheet.duplicates_sheet(groups, thumb=64)
    page = assert_self_contained(html)
    assert page.figures.count("keep") == len(groups)
    assert Path(exact[0].keeper.path).as_uri() in page.links
    assert str(copy.resolve()) in page.text and str((photos / "p1.jpg").resolve()) in page.text


def test_a_file_name_that_is_not_utf8_is_shown_and_linked(tmp_path):
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.jpg"))
    save_photo(odd, seed=5)
    html = sheet.query_sheet([(odd, [match(odd, 1.0)])])
    out = tmp_path / "sheet.html"
    sheet.write_sheet(out, html)  # valid UTF-8 all the same
    page = assert_self_contained(out.read_text(encoding="utf-8"))
    assert len(page.imgs) == 2 and "caf\ufffd.jpg" in page.text
    assert odd.as_uri().endswith("/caf%E9.jpg") and odd.as_uri() in page.links
