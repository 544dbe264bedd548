"""The FAISS index: derived from the database, kept next to it, rebuilt when they disagree."""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from .store import Store

log = logging.getLogger(__name__)


def index_path(db: Path) -> Path:
    return db.with_name(db.name + ".faiss")


def _meta_path(db: Path) -> Path:
    return db.with_name(db.name + ".faiss.json")


def new_index(dim: int):
    """Exact inner-product search (cosine on L2-normalised vectors), ids = database ids."""
    import faiss

    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def rebuild(store: Store, dim: int):
    index = new_index(dim)
    for ids, vecs in store.embeddings():
        index.add_with_ids(vecs, ids)
    return index


def is_current(store: Store) -> bool:
    """Whether the FAISS file on disk claims the database's generation and count (cheap)."""
    try:
        meta = json.loads(_meta_path(store.path).read_text())
    except (OSError, ValueError):
        return not store.count("ok") and not index_path(store.path).exists()
    return (index_path(store.path).exists() and meta.get("generation") == store.generation()
            and meta.get("count") == store.count("ok"))


def carry_over(store: Store, before: int) -> None:
    """After a commit that changed no embedding (whitening), keep a current FAISS file current.

    The caller holds the writer's lock. The vectors on disk are the raw
    descriptors, which whitening does not touch; only the sidecar's
    generation moves, so that searchers reload. A file that was stale
    before is rebuilt.
    """
    meta_path = _meta_path(store.path)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return
    if meta.get("generation") == before and meta.get("count") == store.count("ok"):
        meta["generation"] = store.generation()
        text = json.dumps(meta)
        _write_atomically(meta_path, lambda tmp: Path(tmp).write_text(text))
    elif store.count("ok"):
        # Stale already (a run killed after such a commit): rebuild it from the database.
        load(store, store.recipe().dim)


def load(store: Store, dim: int, save_rebuilt: bool = True):
    """The FAISS index for ``store``, read from disk if it matches the database, else rebuilt.

    A match means: the same embedding generation, the same dimension and the
    same number of vectors as the database holds. A rebuilt index is written
    back only if ``save_rebuilt`` (the caller holds the writer's lock).
    """
    import faiss

    path, meta_path = index_path(store.path), _meta_path(store.path)
    generation = store.generation()
    count = store.count("ok")
    why = None
    if not path.exists():
        why = "no FAISS index on disk" if count else None
    else:
        try:
            meta = json.loads(meta_path.read_text())
            index = faiss.read_index(str(path))
            if meta.get("generation") != generation:
                why = f"it is at generation {meta.get('generation')}, the database at {generation}"
            elif index.d != dim or index.ntotal != count:
                why = f"it holds {index.ntotal} vectors of {index.d} dims, the database {count} of {dim}"
            else:
                return index
        except Exception as exc:  # noqa: BLE001 - unreadable or partial file: rebuild it
            why = f"it could not be read ({exc})"
    if why:
        log.warning("rebuilding the FAISS index from the database: %s", why)
    index = rebuild(store, dim)
    if not save_rebuilt:
        return index
    try:
        save(store, index, generation)
    except OSError as exc:  # a read-only folder: search from memory all the same
        log.warning("cannot write the FAISS index next to %s: %s", store.path, exc.strerror or exc)
    return index


def save(store: Store, index, generation: int) -> None:
    """Write the index and its generation atomically (temp file, then rename).

    The caller holds the writer's lock, so temp files found next to the index
    were left by a writer that was killed: they are removed. Raises OSError.
    """
    import faiss

    path, meta_path = index_path(store.path), _meta_path(store.path)
    for stale in temp_files(store):
        stale.unlink(missing_ok=True)

    def write_index(tmp):
        try:
            faiss.write_index(index, tmp)
        except RuntimeError as exc:  # FAISS reports a failed write as "... (File too large)"
            raise _os_error(exc) from None

    _write_atomically(path, write_index)
    # Written second: a crash in between leaves an old generation, which
    # only costs a rebuild on the next open.
    recipe = store.recipe()
    # The recipe travels with the vectors, so a changed recipe in the database shows.
    meta = json.dumps({"generation": generation, "count": int(index.ntotal), "dim": int(index.d),
                       "recipe": recipe.to_json() if recipe else None})
    _write_atomically(meta_path, lambda tmp: Path(tmp).write_text(meta))


def temp_files(store: Store) -> list[Path]:
    """Temp files of writes of the index or its sidecar that did not finish (a killed writer)."""
    path = index_path(store.path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


_ERRNO_BY_TEXT = {os.strerror(code): code for code in errno.errorcode}


def _os_error(exc: RuntimeError) -> OSError:
    """The OSError behind a FAISS I/O error, from the reason at the end of its message."""
    text = str(exc).strip()
    m = re.search(r"\(([^()]+)\)$", text) or re.search(r":\s*([^:]+)$", text)
    reason = m.group(1).strip() if m else text.splitlines()[-1]
    return OSError(_ERRNO_BY_TEXT.get(reason, errno.EIO), reason)


def _write_atomically(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # mkstemp makes the file private (0600); give it the mode the database got
    # from the umask, so other users who may read the database may read this too.
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def to_device(index, device: str):
    """A GPU copy of ``index`` when ``device`` is CUDA and FAISS sees a GPU; else ``index``."""
    import faiss

    if not device.startswith("cuda") or not hasattr(faiss, "get_num_gpus") or not faiss.get_num_gpus():
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except Exception as exc:  # noqa: BLE001 - fall back to CPU search, which is exact too
        log.warning("FAISS could not move the index to the GPU (%s); searching on the CPU", exc)
        return index


def remove(index, ids) -> None:
    ids = np.asarray(list(ids), dtype=np.int64)
    if len(ids):
        index.remove_ids(ids)
