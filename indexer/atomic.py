"""Atomic file writes: a file is written beside its target, then renamed over it,
so a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def temp_beside(target: Path) -> str:
    """A new, empty temp file ``.{name}.XXXX.tmp`` in ``target``'s folder, with the
    mode the umask gives a new file; the caller writes it and renames or removes it."""
    # Beside the target: the rename stays on one file system, so it is atomic,
    # and the dot name keeps it out of globs of the real files.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    # mkstemp makes the file private (0600); give it the mode the umask gives,
    # so users who may read the folder's other files may read this one too.
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    return tmp


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Have ``write`` fill a temp file beside ``path`` (it gets the temp file's name),
    then rename it over ``path``; on any failure the temp file is removed."""
    tmp = temp_beside(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # gone already when it was renamed
            os.unlink(tmp)
