"""Find image files under one or more roots."""
from __future__ import annotations

import hashlib
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger(__name__)

BASE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)


def image_extensions() -> frozenset[str]:
    """File extensions we can decode with the Pillow plugins installed here."""
    from .decode import register_plugins

    plugins = register_plugins()
    extra = set()
    if "heif" in plugins:
        extra |= {".heic", ".heif"}
    if "avif" in plugins:
        extra |= {".avif"}
    return BASE_EXTENSIONS | extra


@dataclass(frozen=True)
class FileStat:
    path: str
    size: int
    mtime_ns: int


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _escape(ch: str) -> str:
    if ch in "\\'":
        return "\\" + ch
    if 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it
        return f"\\x{ord(ch) - 0xDC00:02x}"
    if ch.isprintable():
        return ch
    return ascii(ch)[1:-1]  # \n, \t, \x1b, \u200b...


def display_path(path: str | bytes | os.PathLike) -> str:
    """``path`` as it may appear in a one-line message.

    A path of printable characters is returned as it is. Any other (a newline,
    a tab or another control character, a byte that is not UTF-8) is quoted
    and escaped, so that a message naming it stays one line:
    ``'/photos/a\\nb.jpg'``, ``'/photos/caf\\xe9.jpg'``.
    """
    text = os.fsdecode(path)
    if text.isprintable():
        return text
    return "'" + "".join(map(_escape, text)) + "'"


class RootNotFound(Exception):
    """A root given to scan does not exist or is not readable."""


def resolve_root(root: str | os.PathLike) -> str:
    """Absolute, user-expanded root; raises RootNotFound if it is missing."""
    path = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.exists(path):
        raise RootNotFound(f"{display_path(root)}: no such file or directory")
    if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
        raise RootNotFound(f"{display_path(root)}: permission denied")
    return path


def scan(
    roots: Iterable[str | os.PathLike],
    *,
    include_hidden: bool = False,
    extensions: frozenset[str] | None = None,
    unlisted: set[str] | None = None,
) -> Iterator[FileStat]:
    """Yield every image file under ``roots``, each physical file once.

    Symbolic links are followed; a directory already visited (by device and
    inode) is not entered again, which stops link loops. Hidden folders and
    files (name starting with '.') are skipped unless ``include_hidden``.
    A root may also be a single file. Whatever is skipped for a reason (a
    folder that cannot be listed, a file that cannot be examined, a broken
    symbolic link, a name that is not UTF-8) is logged, one line naming it;
    the paths the scan could not see are added to ``unlisted``, so a caller
    can tell "gone" from "unseen".
    """
    exts = extensions if extensions is not None else image_extensions()
    if unlisted is None:
        unlisted = set()
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()

    def unseen(path: str, what: str, exc: OSError) -> None:
        log.warning("%s: %s: %s", display_path(path), what, exc.strerror or exc)
        unlisted.add(path)

    def utf8(path: str, what: str) -> bool:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            # The database stores UTF-8 text; such a name cannot be kept or shown.
            log.warning("%s: skipped: the %s name is not valid UTF-8", display_path(path), what)
            return False
        return True

    def file_entry(path: str) -> FileStat | None:
        if Path(path).suffix.lower() not in exts or not utf8(path, "file"):
            return None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None  # gone since it was listed
        except OSError as exc:
            unseen(path, "cannot stat", exc)
            return None
        key = (st.st_dev, st.st_ino)
        if key in seen_files:
            return None
        seen_files.add(key)
        return FileStat(path, st.st_size, st.st_mtime_ns)

    for root in roots:
        root = resolve_root(root)
        if not os.path.isdir(root):
            entry = file_entry(root)
            if entry:
                yield entry
            continue
        if not utf8(root, "folder"):
            continue
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                st = os.stat(folder)
            except FileNotFoundError:
                continue  # gone since it was listed
            except OSError as exc:
                unseen(folder, "cannot stat folder", exc)
                continue
            if (st.st_dev, st.st_ino) in seen_dirs:
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                unseen(folder, "cannot list folder", exc)
                continue
            subdirs = []
            for e in entries:
                if e.name.startswith(".") and not include_hidden:
                    continue
                try:
                    is_dir = e.is_dir(follow_symlinks=True)
                    is_file = not is_dir and e.is_file(follow_symlinks=True)
                except OSError as exc:  # a link loop, a target that cannot be examined
                    unseen(e.path, "cannot stat", exc)
                    continue
                if is_dir:
                    if utf8(e.path, "folder"):  # one line for the folder, none for each file in it
                        subdirs.append(e.path)
                elif is_file:
                    entry = file_entry(e.path)
                    if entry:
                        yield entry
                elif e.is_symlink() and not os.path.exists(e.path):
                    # Its target may be on a drive not mounted now: what was indexed
                    # through it is kept, as for a folder that cannot be listed.
                    try:
                        target = display_path(os.readlink(e.path))
                    except OSError:
                        continue  # gone since it was listed
                    log.warning("%s: skipped: broken symbolic link to %s", display_path(e.path),
                                target)
                    unlisted.add(e.path)
            stack.extend(reversed(subdirs))


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" as (I, N), 0 <= I < N; ValueError otherwise."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"{text!r} is not a shard I/N, e.g. 0/4") from None
    return check_shard((i, n))


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """``shard`` (I, N) itself when 0 <= I < N; ValueError otherwise."""
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: I must be 0 to N-1")
    return shard


def in_shard(path: str, shard: tuple[int, int] | None) -> bool:
    """Whether ``path`` is in shard (I, N) (None: every path is): a hash of the path, the
    same on every machine and run, so N processes given the same roots split them."""
    if shard is None:
        return True
    i, n = shard
    return zlib.crc32(path.encode("utf-8", "surrogateescape")) % n == i
