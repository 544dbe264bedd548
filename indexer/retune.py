"""Embed a whole database again under a new recipe (after fine-tuning): resumable, swapped in one commit.

The new recipe waits in the setting "pending_recipe". Descriptors under it go
to the ``retuned`` table batch by batch, each batch one commit, so a killed
run keeps what it did and the next run (``index``, ``tune`` or ``check
--repair``) goes on from there. When every indexed image has one, one commit
moves them into place, makes the new recipe the database's and forgets the
whitening (learned from the old descriptors). Until that commit searches use
the old recipe and the old descriptors, whole; after it, the new ones.

Local features do not depend on the network: they stay as they are.
"""
from __future__ import annotations

import logging
import os

from sqlalchemy import delete, select, update

from . import vectors
from .recipe import Recipe
from .scan import display_path
from .store import FAILED, OK, ImageRow, LocalRow, RetunedRow, Store, pack_vector

log = logging.getLogger(__name__)

PENDING = "pending_recipe"
ORIGINAL = "original_recipe"  # the recipe before the first fine-tuning, for undoing it
CHANGED = "changed on disk while the database was embedded again; the next index run embeds it"


def pending(store: Store) -> Recipe | None:
    """The recipe the database is being moved to, or None."""
    return store.recipe(PENDING)


def original(store: Store) -> Recipe | None:
    """The recipe before the database was first fine-tuned, or None (never fine-tuned)."""
    return store.recipe(ORIGINAL)


def _done():
    """Ids of indexed images with a descriptor under the pending recipe for their content."""
    return select(RetunedRow.image_id).join(
        ImageRow, (ImageRow.id == RetunedRow.image_id) & (ImageRow.sha256 == RetunedRow.sha256))


def begin(store: Store, recipe: Recipe) -> None:
    """Start moving the database to ``recipe`` (one commit; a move under way restarts)."""
    with store.session() as s:
        s.execute(delete(RetunedRow))
        if not store.get_setting(s, ORIGINAL):
            store.set_setting(s, ORIGINAL, store.get_setting(s, "recipe"))
        store.set_setting(s, PENDING, recipe.to_json())
        s.commit()


def _todo(store: Store) -> list:
    """Indexed images without a descriptor under the pending recipe for their content."""
    with store.session() as s:
        return s.execute(select(ImageRow.id, ImageRow.path, ImageRow.size, ImageRow.mtime_ns, ImageRow.sha256)
                         .where(ImageRow.status == OK, ImageRow.id.not_in(_done()))
                         .order_by(ImageRow.id)).all()


def finish(store: Store, make_encoder, *, batch_size: int, workers: int, max_pixels: int,
           progress=None) -> tuple[int, list[tuple[str, str]]]:
    """Embed what is left under the pending recipe, then swap; (embedded, failures).

    ``make_encoder(recipe)`` makes an Encoder. A file changed or unreadable now
    is recorded as failed with the reason (the next index run takes it again).
    """
    from .pipeline import embed_files

    recipe = pending(store)
    rows = _todo(store)
    failures: dict[int, str] = {}
    current = []
    for r in rows:
        try:
            st = os.stat(r.path)
            same = st.st_size == r.size and st.st_mtime_ns == r.mtime_ns
        except OSError as exc:
            failures[r.id] = f"cannot read: {exc.strerror or exc}"
            continue
        if same:
            current.append(r)
        else:
            failures[r.id] = CHANGED
    log.info("%s: embedding %d images again under the fine-tuned recipe", store.name, len(current))
    embedded = tried = 0
    if progress:
        progress(0, len(current))
    if current:
        plain = recipe.global_only()
        for results in embed_files([r.path for r in current], lambda: make_encoder(plain), recipe=plain,
                                   batch_size=batch_size, workers=min(workers, len(current)),
                                   max_pixels=max_pixels):
            with store.session() as s:
                for res in results:
                    row = current[res.index]
                    if res.vector is None:
                        failures[row.id] = res.error or "unreadable"
                    else:
                        s.merge(RetunedRow(image_id=row.id, sha256=row.sha256,
                                           embedding=pack_vector(res.vector)))
                        embedded += 1
                s.commit()
            tried += len(results)
            if progress:
                progress(tried, len(current))
    paths = {r.id: r.path for r in rows}
    _swap(store, recipe, failures)
    for image_id, reason in failures.items():
        log.warning("%s: not embedded again: %s", display_path(paths[image_id]), reason)
    return embedded, [(paths[i], reason) for i, reason in failures.items()]


def _swap(store: Store, recipe: Recipe, failures: dict[int, str]) -> None:
    """One commit: the new descriptors in place, the rest failed, the new recipe the database's."""
    with store.session() as s:
        fresh = select(RetunedRow.embedding).where(RetunedRow.image_id == ImageRow.id,
                                                   RetunedRow.sha256 == ImageRow.sha256).scalar_subquery()
        s.execute(update(ImageRow).where(ImageRow.status == OK, ImageRow.id.in_(_done()))
                  .values(embedding=fresh), execution_options={"synchronize_session": False})
        left = s.execute(select(ImageRow.id).where(ImageRow.status == OK, ImageRow.id.not_in(_done()))).scalars().all()
        for image_id in left:
            failures.setdefault(image_id, CHANGED)
            s.execute(update(ImageRow).where(ImageRow.id == image_id)
                      .values(status=FAILED, error=failures[image_id], embedding=None))
            s.execute(delete(LocalRow).where(LocalRow.image_id == image_id))
        s.execute(delete(RetunedRow))
        store.set_setting(s, "recipe", recipe.to_json())
        store.set_setting(s, PENDING, "")
        if store.get_setting(s, ORIGINAL) == recipe.to_json():  # back where it started: undone
            store.set_setting(s, ORIGINAL, "")
        store.forget_whitening(s)  # learned from the old descriptors: meaningless now
        s.commit()
    if store.count(OK):  # the FAISS file, from the new descriptors
        vectors.save(store, vectors.rebuild(store), store.generation())
