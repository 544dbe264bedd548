"""Contact sheets: one self-contained HTML file of search results or duplicate groups.

Every thumbnail is inline (a base64 JPEG ``data:`` URI) and the CSS too: the
file needs nothing else, no network and no JavaScript, so it can be mailed or
opened on a phone as it is.

    from search import Searcher, sheet
    with Searcher("photos.db") as s:
        html = sheet.query_sheet([(q, s.search(q)) for q in queries])
    sheet.write_sheet("results.html", html)
"""
from __future__ import annotations

import base64
import html as _html
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from indexer.atomic import write_atomically
from indexer.decode import DEFAULT_THUMBNAIL, DecodeError, thumbnail

from .searcher import Match

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

# Mobile first: one column of cards on a phone, as many as fit on a wide screen.
# The box over a thumbnail is an SVG stretched over the <img>: its viewBox is the
# thumbnail's size, so the polygon stays on the picture at any displayed size.
CSS = """
*{box-sizing:border-box}
body{margin:0;padding:12px;font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;
color:#1d1d1f;background:#f4f4f6}
header h1{margin:0 0 4px;font-size:1.4em;overflow-wrap:anywhere}
header p{margin:0 0 12px;color:#555}
section{background:#fff;border-radius:8px;padding:10px;margin:0 0 14px;box-shadow:0 1px 3px #0002}
section h2{margin:0 0 8px;font-size:1.05em;overflow-wrap:anywhere}
.grid{display:grid;gap:10px;grid-template-columns:repeat(auto-fill,minmax(min(100%%,%(col)dpx),1fr))}
figure{margin:0;padding:6px;border:1px solid #ddd;border-radius:6px;min-width:0}
figure.query{border:2px solid #2b6cb0;background:#ebf4ff}
figure.keep{border:2px solid #2f855a;background:#f0fff4}
.thumb{position:relative;display:block;width:fit-content;max-width:100%%;margin:0 auto}
.thumb img{display:block;max-width:100%%;height:auto}
.thumb svg{position:absolute;left:0;top:0;width:100%%;height:100%%;pointer-events:none}
.thumb polygon{fill:#e53e3e22;stroke:#e53e3e;stroke-width:2;vector-effect:non-scaling-stroke}
.missing{display:flex;align-items:center;justify-content:center;aspect-ratio:4/3;width:100%%;
padding:8px;background:#eee;border:1px dashed #999;color:#900;text-align:center;overflow-wrap:anywhere}
figcaption{margin-top:6px;font-size:.9em}
figcaption b{font-variant-numeric:tabular-nums}
.tag{display:inline-block;padding:0 6px;border-radius:4px;background:#2b6cb0;color:#fff;font-size:.85em}
.keep .tag{background:#2f855a}
.path{display:block;font-family:ui-monospace,monospace;font-size:.85em;overflow-wrap:anywhere}
.path a{color:#2c5282}
"""


def query_sheet(entries: Sequence[tuple[PathLike, Sequence[Match]]], *, title: str = "lookalike",
                thumb: int = DEFAULT_THUMBNAIL) -> str:
    """A contact sheet of search results: for each (query path, its matches) a section with
    the query's thumbnail, then each result's, rank, score, inliers, box and path."""
    thumbs = _Thumbs(thumb)
    results = sum(len(matches) for _, matches in entries)
    counts = f"{_plural(len(entries), 'query', 'queries')}, {_plural(results, 'result')}"
    body = "".join(_query_section(n, query, matches, thumbs)
                   for n, (query, matches) in enumerate(entries, 1))
    return _page(title, counts, body, thumb)


def duplicates_sheet(groups: Sequence[Any], *, title: str = "lookalike duplicates",
                     thumb: int = DEFAULT_THUMBNAIL) -> str:
    """A contact sheet of duplicate groups (search.duplicates.Group: ``kind``, ``members``
    keeper first): one section per group, the keeper marked "keep"."""
    thumbs = _Thumbs(thumb)
    exact = sum(1 for g in groups if g.kind == "exact")
    images = sum(len(g.members) for g in groups)
    counts = (f"{_plural(len(groups), 'group')} ({exact} exact, {len(groups) - exact} near), "
              f"{_plural(images, 'image')}")
    body = "".join(_group_section(n, group, thumbs) for n, group in enumerate(groups, 1))
    return _page(title, counts, body, thumb)


def write_sheet(path: PathLike, html: str) -> None:
    """Write a sheet to ``path`` as UTF-8, atomically (a reader never sees half of it).

    Raises OSError when it cannot be written; its message may name the temp file beside
    ``path``, so a caller reporting it names ``path`` and gives exc.strerror.
    """
    target = Path(path)
    data = html.encode("utf-8")
    write_atomically(target, lambda tmp: Path(tmp).write_bytes(data))
    log.info("wrote %s (%d bytes)", target, len(data))


# --- thumbnails ---------------------------------------------------------------------------


class _Thumbs:
    """The thumbnails of one sheet, each file decoded once however often it appears."""

    def __init__(self, longest: int):
        if longest < 1:
            raise ValueError("a thumbnail's longest side must be at least 1")
        self.longest = longest
        self._made: dict[str, tuple[str | None, str | None]] = {}

    def get(self, path: PathLike) -> tuple[str | None, str | None]:
        """(data URI, None) for a thumbnail of ``path``, or (None, one-line reason)."""
        key = os.path.abspath(os.fspath(path))
        if key not in self._made:
            self._made[key] = self._make(key)
        return self._made[key]

    def _make(self, path: str) -> tuple[str | None, str | None]:
        try:
            jpeg = thumbnail(path, self.longest)
        except (DecodeError, OSError) as exc:
            # A sheet shows what it can: a vanished or unreadable file gets a placeholder.
            reason = str(exc) or type(exc).__name__
            log.debug("%s: no thumbnail: %s", path, reason)
            return None, " ".join(reason.split())
        return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii"), None

    def scale(self, width: int, height: int) -> float:
        """How much an image of ``width`` x ``height`` is shrunk in its thumbnail (never enlarged)."""
        return min(1.0, self.longest / max(width, height, 1))


# --- sections -----------------------------------------------------------------------------


def _query_section(n: int, query: PathLike, matches: Sequence[Match], thumbs: _Thumbs) -> str:
    cards = [_card(query, thumbs, "query", '<span class="tag">query</span>')]
    for rank, m in enumerate(matches, 1):
        facts = f"#{rank} · score <b>{m.score:.4f}</b>"
        if m.inliers > 0:
            facts += f" · <b>{m.inliers}</b> inliers"
        cards.append(_card(m.path, thumbs, "", facts, _box_svg(m, thumbs)))
    if not matches:
        cards.append('<p class="none">no results</p>')
    heading = f"Query {n}: {_esc(_shown(query))} — {_plural(len(matches), 'result')}"
    return f'<section><h2>{heading}</h2><div class="grid">{"".join(cards)}</div></section>\n'


def _group_section(n: int, group: Any, thumbs: _Thumbs) -> str:
    cards = []
    for i, member in enumerate(group.members):
        keeper = i == 0
        facts = ('<span class="tag">keep</span> ' if keeper else "") + _member_facts(member)
        cards.append(_card(member.path, thumbs, "keep" if keeper else "", facts))
    heading = f"Group {n}: {_esc(group.kind)} — {_plural(len(group.members), 'image')}"
    return f'<section><h2>{heading}</h2><div class="grid">{"".join(cards)}</div></section>\n'


def _member_facts(member: Any) -> str:
    facts = f"similarity <b>{member.similarity:.4f}</b>"
    if member.inliers > 0:
        facts += f" · <b>{member.inliers}</b> inliers"
    facts += f"<br>{member.width}×{member.height} px · {member.bytes:,} bytes"
    if member.mtime:
        facts += f"<br>modified {_esc(str(member.mtime))}"
    return facts


def _card(path: PathLike, thumbs: _Thumbs, kind: str, facts: str, overlay: str = "") -> str:
    """One figure: the thumbnail (or a placeholder with the reason), ``facts`` (HTML) and the
    path as text and as a file:// link."""
    uri, reason = thumbs.get(path)
    if uri is None:
        picture = f'<div class="missing">{_esc(reason)}</div>'
    else:
        picture = f'<div class="thumb"><img src="{uri}" alt="{_esc(_shown(path))}">{overlay}</div>'
    link = f'<a href="{_esc(_file_uri(path))}">{_esc(_shown(path))}</a>'
    cls = f' class="{kind}"' if kind else ""
    return (f"<figure{cls}>{picture}<figcaption>{facts}"
            f'<span class="path">{link}</span></figcaption></figure>')


def _box_svg(m: Match, thumbs: _Thumbs) -> str:
    """The matched region as an SVG polygon in thumbnail pixels, to lay over the <img>."""
    if not m.box or m.width < 1 or m.height < 1:
        return ""
    s = thumbs.scale(m.width, m.height)
    points = " ".join(f"{x * s:.1f},{y * s:.1f}" for x, y in m.box)
    return (f'<svg viewBox="0 0 {m.width * s:.1f} {m.height * s:.1f}" preserveAspectRatio="none" '
            f'aria-hidden="true"><polygon points="{points}"/></svg>')


# --- page and text ------------------------------------------------------------------------


def _page(title: str, counts: str, body: str, thumb: int) -> str:
    now = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    css = CSS % {"col": min(thumb, 150) + 14}  # two columns on a phone
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{css}</style></head><body>\n"
            f"<header><h1>{_esc(title)}</h1><p>{_esc(now)} · {counts}</p></header>\n"
            f"<main>\n{body}</main></body></html>\n")


def _esc(text: Any) -> str:
    return _html.escape(str(text), quote=True)


def _shown(path: PathLike) -> str:
    """A path as text that can be written as UTF-8 (undecodable bytes shown as U+FFFD)."""
    return os.fsencode(path).decode("utf-8", "replace")


def _file_uri(path: PathLike) -> str:
    # as_uri percent-encodes the file's own bytes, so even an undecodable name links right.
    return Path(os.path.abspath(os.fspath(path))).as_uri()


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else many or word + 's'}"


__all__ = ["query_sheet", "duplicates_sheet", "write_sheet"]
