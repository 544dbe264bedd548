"""Find image files under one or more roots."""
from __future__ import annotations

import hashlib
import logging
import os
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


class RootNotFound(Exception):
    """A root given to scan does not exist or is not readable."""


def resolve_root(root: str | os.PathLike) -> str:
    """Absolute, user-expanded root; raises RootNotFound if it is missing."""
    path = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.exists(path):
        raise RootNotFound(f"{root}: no such file or directory")
    if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
        raise RootNotFound(f"{root}: permission denied")
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
    A root may also be a single file. Folders that cannot be listed are
    logged and added to ``unlisted``, so a caller can tell "gone" from "unseen".
    """
    exts = extensions if extensions is not None else image_extensions()
    if unlisted is None:
        unlisted = set()
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()

    def file_entry(path: str) -> FileStat | None:
        if Path(path).suffix.lower() not in exts:
            return None
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            # The database stores UTF-8 text; such a name cannot be kept or shown.
            log.warning("%s: skipped: the file name is not valid UTF-8", ascii(path))
            return None
        try:
            st = os.stat(path)
        except OSError as exc:
            log.warning("%s: cannot stat: %s", path, exc.strerror or exc)
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
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                st = os.stat(folder)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen_dirs:
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                log.warning("%s: cannot list folder: %s", folder, exc.strerror or exc)
                unlisted.add(folder)
                continue
            subdirs = []
            for e in entries:
                if e.name.startswith(".") and not include_hidden:
                    continue
                try:
                    is_dir = e.is_dir(follow_symlinks=True)
                except OSError:
                    continue
                if is_dir:
                    subdirs.append(e.path)
                elif e.is_file(follow_symlinks=True):
                    entry = file_entry(e.path)
                    if entry:
                        yield entry
            stack.extend(reversed(subdirs))
