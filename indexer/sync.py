"""Bring the index in line with folders on disk: mark what changed, embed only that, sweep the rest."""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.exc import OperationalError

from . import vectors
from .decode import DEFAULT_MAX_PIXELS, PROCESS_ERRNOS
from .errors import first_line
from .recipe import Recipe
from .scan import FileStat, check_shard, display_path, file_sha256, in_shard, resolve_root, scan
from .store import (
    FAILED,
    OK,
    ImageRow,
    LocalRow,
    Store,
    StoreError,
    resolve_db,
    now,
    pack_vector,
    unpack_vector,
    writer_lock,
)
from .tuning import Tuning

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass
class Summary:
    """What one index run did. Every scanned file is counted once, in exactly one of
    added, updated, moved, unchanged or failed; removed counts rows swept away."""

    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    embedded: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        return (f"{self.added} added, {self.updated} updated, {self.moved} moved, "
                f"{self.removed} removed, {self.unchanged} unchanged, {self.failed} failed "
                f"({self.embedded} embedded in {self.seconds:.1f}s)")


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _hidden_below(path: str, roots: Sequence[str]) -> bool:
    """Whether a part of ``path`` below the root holding it starts with a dot."""
    for root in roots:
        if _under(path, [root]):
            rest = os.path.relpath(path, root) if path != root else ""
            return any(part.startswith(".") for part in Path(rest).parts)
    return False


def _save(store: Store, index: vectors.VectorIndex, generation: int,
          previous: tuple[str, int] | None = None) -> None:
    """Write the vector index, first rebuilt if the collection now calls for another kind
    (``previous``: the choice before this run asked for a new one, kept again if the new
    one cannot be built); a failed write is a StoreError (the database is already saved)."""
    try:
        index = vectors.maintain(store, index, asked=previous is not None)
    except vectors.IndexChoiceError:
        if previous is not None:
            vectors.set_choice(store, *previous, store.recipe().dim)
        raise
    try:
        vectors.save(store, index, generation)
    except OSError as exc:
        raise StoreError(f"{vectors.index_path(store.path)}: cannot write the FAISS index: "
                         f"{exc.strerror or exc}; the database is saved and the next run "
                         "writes it again") from None


# Failures of access, not of content: the file may be readable the next time.
_ACCESS_FAILURES = ("cannot read:", "file not found", "permission denied")


def _access_failure(error: str | None) -> bool:
    return bool(error) and error.startswith(_ACCESS_FAILURES)


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


class Indexer(Tuning):
    """Index image folders into a lookalike database.

    Options left as None take the value stored in an existing database, or the
    default for a new one; an option that contradicts the stored recipe is
    refused with RecipeMismatch.
    """

    def __init__(self, db: str | os.PathLike | None = None, *, model: str | None = None,
                 weights: str | os.PathLike | None = None, layer: str | None = None,
                 pooling: str | None = None, gem_p: float | None = None,
                 image_size: int | None = None, device: str = "auto", batch_size: int = 32,
                 workers: int | None = None, include_hidden: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, retry_failed: bool = False,
                 scales: Sequence[float] | None = None, whiten: str | None = "auto",
                 local_features: str | None = None, keypoints: int | None = None,
                 index: str | None = None, memory: int | None = None, ray: str | None = None,
                 shard: tuple[int, int] | None = None):
        """``index``: the vector index, "auto" (by size and ``memory``, bytes of RAM for
        it), "exact" or a FAISS factory key with IVF; None keeps the database's choice.
        ``ray``: embed on a Ray cluster (indexer.cluster) at this address, "auto" for
        $RAY_ADDRESS or a local one; None embeds in this process. ``shard`` (I, N): only
        the files of shard I of N (scan.in_shard), for N runs at once from any scheduler."""
        self.db = resolve_db(db)
        self.options = dict(model=model, layer=layer, pooling=pooling, gem_p=gem_p,
                            image_size=image_size, scales=tuple(scales) if scales else None,
                            local_features=local_features, keypoints=keypoints)
        if whiten not in ("auto", None, "none", "center", "pca"):
            raise ValueError(f"unknown whitening {whiten!r}; use auto, none, center or pca")
        self.whiten_mode = whiten
        if memory is not None and memory < 1:
            raise ValueError("the memory budget must be positive")
        self.index_choice, self.memory = index, memory
        self.weights = weights
        self.device = device
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        self.batch_size = batch_size
        self.workers = default_workers() if workers is None else workers
        if self.workers < 0:
            raise ValueError("workers must be 0 or more")
        self.include_hidden = include_hidden
        self.max_pixels = max_pixels
        self.retry_failed = retry_failed
        self.ray = ray
        self.shard = None if shard is None else check_shard(shard)

    # -- recipe -----------------------------------------------------------
    def _recipe(self, store: Store) -> Recipe:
        from .backbone import DEFAULT_MODEL, get_spec, resolve_weights
        from .recipe import DEFAULT_SCALES, make_recipe

        o = self.options
        stored = store.recipe()
        if stored is None:
            model = o["model"] or DEFAULT_MODEL
            _, sha = resolve_weights(model, self.weights)
            return make_recipe(model, layer=o["layer"], pooling=o["pooling"] or "gem",
                               gem_p=o["gem_p"] or 3.0, image_size=o["image_size"] or 448,
                               weights_sha256=sha, scales=o["scales"] or DEFAULT_SCALES,
                               local_features=o["local_features"], keypoints=o["keypoints"])
        model = o["model"] or stored.model
        same_model = get_spec(model).name == stored.model
        pooling = o["pooling"] or stored.pooling
        asked = make_recipe(
            model,
            layer=o["layer"] or (stored.layer if same_model else None),
            pooling=pooling,
            gem_p=o["gem_p"] or (stored.gem_p if pooling == stored.pooling and stored.gem_p else 3.0),
            image_size=o["image_size"] or stored.image_size,
            scales=o["scales"] or stored.scales,
            weights_sha256=resolve_weights(model, self.weights)[1] if self.weights else stored.weights_sha256,
            local_features=o["local_features"] or stored.local_features,
            keypoints=o["keypoints"] or stored.local_keypoints or None,
            local_size=stored.local_size or None,
        )
        stored.require_same(asked, store.name)
        return stored

    # -- the run ----------------------------------------------------------
    def index(self, roots: Iterable[str | os.PathLike], progress: Progress | None = None) -> Summary:
        """Scan ``roots`` and bring the database and the FAISS index in line with them."""
        start = time.perf_counter()
        from .encoder import resolve_device

        roots = [resolve_root(r) for r in roots]
        if not roots:
            raise ValueError("no folder to index")
        device = resolve_device(self.device)  # a bad device fails now, not after the scan
        if self.ray is not None:  # an unreachable cluster or an unreadable root fails now too
            from . import cluster

            cluster.start(self.ray)
            cluster.check_roots(roots)
        # On a server, index runs share the writers' lock and take turns commit by
        # commit; on a file they run one at a time.
        with writer_lock(self.db, shared=True):
            store = Store(self.db)
            try:
                self._finish_retune(store, device)
                summary = self._index(store, roots, device, progress)
                self._auto_whiten(store)
            except (OperationalError, OSError) as exc:
                if isinstance(exc, OperationalError):  # a failed write (disk full, I/O error)
                    reason = first_line(exc)
                elif exc.errno in PROCESS_ERRNOS:  # too many open files: say where it stopped
                    at = f" at {display_path(exc.filename)}" if isinstance(exc.filename, str) else ""
                    reason = f"the run stopped{at}: {exc.strerror}"
                else:
                    raise
                raise StoreError(f"{store.name}: {reason}; the images committed so far are kept, "
                                 "run again to finish") from None
            finally:
                store.close()
        summary.seconds = time.perf_counter() - start
        return summary

    # -- whitening --------------------------------------------------------
    def _auto_whiten(self, store: Store) -> None:
        """Learn centring once the collection is large enough, unless told otherwise.

        "auto" never overrides a choice stored before: a whitening learned on
        request, or one turned off (``whiten("none")``), stays as it is.
        """
        from .whitening import CENTER_MIN_IMAGES, LEARNED

        if self.whiten_mode in ("center", "pca"):
            # Decoded only here: a PCA whitening is megabytes of JSON, and "auto"
            # runs after every index run.
            stored = store.whitening()
            if stored is None or stored.kind != self.whiten_mode:
                self._learn(store, self.whiten_mode)
        elif self.whiten_mode == "auto":
            setting = store.whitening_setting()
            if setting == "none" or store.count(OK) < CENTER_MIN_IMAGES:
                return
            if setting is None:
                self._learn(store, "center")
                return
            stored = store.whitening()
            if stored.kind == LEARNED and not stored.centred_on:
                # Tuned before the collection was there: centre on it now that it is.
                self._set_whitening(store, stored.centred(self._collection(store)))
        elif store.whitening_setting() != "none":
            self._set_whitening(store, None)

    @staticmethod
    def _set_whitening(store: Store, whitening, forget: bool = False) -> None:
        """Store ``whitening`` (None: off for good), or with ``forget`` none at all, as if never set."""
        with store.session(write=True) as s:
            if forget:
                store.forget_whitening(s)
            else:
                store.set_whitening(s, whitening)
            s.commit()
        vectors.update(store)

    def _learn(self, store: Store, kind: str, shrinkage: float | None = None):
        from .whitening import DEFAULT_SHRINKAGE, learn

        x = self._collection(store, second=kind == "pca")
        if not x.n:
            from .whitening import WhiteningError

            raise WhiteningError(f"{store.name}: the database holds no images to learn whitening from")
        w = learn(x, kind,
                  DEFAULT_SHRINKAGE if shrinkage is None else shrinkage,
                  learned_at=now().strftime("%Y-%m-%d %H:%M:%S"))
        self._set_whitening(store, w)
        log.info("%s: %s", store.name, w.describe())
        return w

    @staticmethod
    def _collection(store: Store, second: bool = False):
        """The moments of every indexed image's raw descriptor (whitening.Moments), read in
        chunks: memory bounded by a chunk, whatever the collection's size."""
        from .whitening import Moments

        moments = Moments(store.recipe().dim, second)
        for _, vecs in store.embeddings():
            moments.add(vecs)
        return moments

    def whiten(self, kind: str = "center", shrinkage: float | None = None):
        """(Re-)learn whitening from what the database holds now; ``kind`` "none" removes it
        for good, "auto" returns to the default (centring, now or once the collection is
        large enough), which also undoes a tuning."""
        from .whitening import CENTER_MIN_IMAGES

        with writer_lock(self.db):
            store = Store(self.db, create=False)
            try:
                if kind in ("none", None):
                    self._set_whitening(store, None)
                    return None
                if kind == "auto":
                    if store.count(OK) < CENTER_MIN_IMAGES:
                        self._set_whitening(store, None, forget=True)
                        return None
                    kind = "center"
                return self._learn(store, kind, shrinkage)
            finally:
                store.close()

    def _bind_recipe(self, store: Store, device: str):
        """(recipe, an Encoder or None): the stored recipe, or a new database's, now kept."""
        recipe = self._recipe(store)
        encoder = None
        with store.session(write=True) as s:
            if store.get_setting(s, "recipe") is None:
                if self.weights is not None:
                    from .encoder import Encoder

                    # Load a weights file of the user's before the recipe is kept: bad
                    # weights must not leave a database bound to them. (The packaged
                    # weights are known good: their model is made while decoding starts.)
                    encoder = Encoder(recipe, self.weights, device)
                store.set_setting(s, "recipe", recipe.to_json())
                s.commit()
        return recipe, encoder

    def _index(self, store: Store, roots: list[str], device: str,
               progress: Progress | None) -> Summary:
        recipe, encoder = self._bind_recipe(store, device)
        asked = (self.index_choice, self.memory) != (None, None)
        previous = vectors.stored_choice(store) if asked else None
        if asked:
            vectors.set_choice(store, self.index_choice, self.memory, recipe.dim)
        summary = Summary()
        unlisted: set[str] = set()
        files = {f.path: f for f in scan(roots, include_hidden=self.include_hidden, unlisted=unlisted)
                 if in_shard(f.path, self.shard)}
        with store.session() as s:
            rows = s.execute(select(ImageRow.id, ImageRow.path, ImageRow.size, ImageRow.mtime_ns,
                                    ImageRow.sha256, ImageRow.status, ImageRow.error)).all()
        by_path = {r.path: r for r in rows}
        # Swept: entries under the roots whose files are gone, but not those the scan
        # could not see (an unreadable folder, a hidden path when hidden ones are skipped).
        missing = {r.path: r for r in rows
                   if _under(r.path, roots) and r.path not in files and in_shard(r.path, self.shard)
                   and not _under(r.path, list(unlisted))
                   and (self.include_hidden or not _hidden_below(r.path, roots))}
        candidates: list[FileStat] = []
        for path, f in files.items():
            row = by_path.get(path)
            if row is not None and row.size == f.size and row.mtime_ns == f.mtime_ns and not (
                    row.status == FAILED and (self.retry_failed or _access_failure(row.error))):
                if row.status == FAILED:
                    summary.failed += 1
                else:
                    summary.unchanged += 1
            else:
                candidates.append(f)
        if not files:
            log.warning("no image files under %s", ", ".join(map(display_path, roots)))
        if not candidates and not missing:
            if asked or not vectors.is_current(store):  # rebuild and save a stale FAISS file
                _save(store, vectors.load(store, save_rebuilt=False), store.generation(), previous)
            return summary

        hashes, unreadable = self._hash(candidates)
        # Descriptors of content already indexed, read before any row changes:
        # when names are swapped, a live row may already hold its new content.
        known: dict[str, tuple[int, bytes, int, int, bytes | None]] = {}
        with store.session(write=True) as s:
            for sha in set(hashes.values()):
                hit = s.execute(select(ImageRow.id, ImageRow.embedding, ImageRow.width,
                                       ImageRow.height, LocalRow.data)
                                .outerjoin(LocalRow, LocalRow.image_id == ImageRow.id)
                                .where(ImageRow.sha256 == sha, ImageRow.status == OK).limit(1)).first()
                # Without the local features the recipe asks for, the copy is embedded afresh.
                if hit and (hit.data is not None or not recipe.has_local):
                    known[sha] = tuple(hit)
        missing_by_sha: dict[str, list] = {}
        for row in missing.values():
            if row.sha256:
                missing_by_sha.setdefault(row.sha256, []).append(row)

        index = vectors.load(store)
        self._seen, self._behind = index.generation, False
        to_embed: list[FileStat] = []
        with store.session() as s:
            changed_vectors = False
            for f in candidates:
                if f.path in unreadable:
                    reason = unreadable[f.path]
                    log.info("%s: %s", display_path(f.path), reason)
                    summary.failures.append((f.path, reason))
                    summary.failed += 1
                    self._fail(s, by_path.get(f.path), f, None, reason, index)
                    continue
                sha = hashes[f.path]
                row = by_path.get(f.path)
                if row is not None and row.sha256 == sha and row.status == OK:
                    db_row = s.get(ImageRow, row.id)
                    db_row.size, db_row.mtime_ns = f.size, f.mtime_ns
                    summary.unchanged += 1
                elif row is None and missing_by_sha.get(sha):
                    old = missing_by_sha[sha].pop()
                    del missing[old.path]
                    db_row = s.get(ImageRow, old.id)
                    db_row.path, db_row.size, db_row.mtime_ns = f.path, f.size, f.mtime_ns
                    if db_row.status == FAILED:
                        summary.failed += 1
                    else:
                        summary.moved += 1
                elif sha in known and (row is None or row.id != known[sha][0]):
                    # Same bytes as an indexed image: same descriptor, no need to embed.
                    _, embedding, width, height, local = known[sha]
                    vec = unpack_vector(embedding, recipe.dim)[None]
                    target = self._upsert(s, row, f, sha, OK, None, embedding, width, height)
                    s.flush()
                    if recipe.has_local:
                        store.set_local(s, target.id, local)
                    if row is not None:
                        index.remove([target.id])
                    index.add([target.id], vec)
                    changed_vectors = True
                    if row is None:
                        summary.added += 1
                    else:
                        summary.updated += 1
                else:
                    to_embed.append(f)
            if missing:
                ids = [r.id for r in missing.values()]
                for chunk in range(0, len(ids), 500):
                    s.execute(delete(ImageRow).where(ImageRow.id.in_(ids[chunk:chunk + 500])))
                index.remove(ids)
                summary.removed += len(ids)
                changed_vectors = True
            generation = self._commit(store, s, bump=bool(changed_vectors or summary.failures))

        if to_embed:
            generation = self._embed(store, encoder or (lambda: self._encoder(recipe, device)),
                                     recipe, to_embed, by_path, hashes, index, summary, progress)
        if self._behind:  # other writers of the server's database committed meanwhile
            index = vectors.load(store, save_rebuilt=False, expected=True)
            generation = index.generation
        _save(store, index, generation, previous)
        return summary

    def _commit(self, store: Store, s, bump: bool = True) -> int:
        """Commit ``s``, moving the generation if ``bump``; the generation now. Notes when
        another writer (of a server's database) has committed since this run's last commit:
        this run's vector index then misses their changes, and is rebuilt before it is saved."""
        # The generation the commit makes is known before it: read after it, in a new
        # transaction, it would cost a lookup and (on a server) the commits lock again.
        now = store.bump_generation(s) if bump else store.generation(s)
        if (now - 1 if bump else now) != self._seen:
            self._behind = True
        s.commit()
        self._seen = now
        return now

    def _hash(self, files: list[FileStat]) -> tuple[dict[str, str], dict[str, str]]:
        """Content hashes of ``files`` (threads: hashlib releases the GIL), and reasons for the unreadable."""
        def one(f: FileStat):
            try:
                return f.path, file_sha256(f.path), None
            except OSError as exc:
                if exc.errno in PROCESS_ERRNOS:
                    raise  # not the file's fault: stop rather than record it as failed
                return f.path, None, f"cannot read: {exc.strerror or exc}"

        hashes, unreadable = {}, {}
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
            for path, sha, reason in pool.map(one, files):
                if reason:
                    unreadable[path] = reason
                else:
                    hashes[path] = sha
        return hashes, unreadable

    def _upsert(self, s, row, f: FileStat, sha, status, error, embedding, width, height) -> ImageRow:
        if row is None:
            db_row = ImageRow(path=f.path)
            s.add(db_row)
        else:
            db_row = s.get(ImageRow, row.id)
        db_row.size, db_row.mtime_ns, db_row.sha256 = f.size, f.mtime_ns, sha
        db_row.status, db_row.error, db_row.embedding = status, error, embedding
        db_row.width, db_row.height, db_row.indexed_at = width, height, now()
        return db_row

    def _fail(self, s, row, f: FileStat, sha, reason: str, index) -> None:
        db_row = self._upsert(s, row, f, sha, FAILED, reason, None, None, None)
        if row is not None and row.status == OK:
            Store.set_local(s, db_row.id, None)
            index.remove([db_row.id])

    def _encoder(self, recipe: Recipe, device: str):
        from .encoder import Encoder

        return Encoder(recipe, self.weights, device)

    def _embed(self, store: Store, encoder, recipe: Recipe, files: list[FileStat], by_path, hashes,
               index, summary: Summary, progress: Progress | None) -> int:
        """Embed ``files`` and commit them batch by batch; ``encoder`` may be a function that
        makes the model (see embed_files)."""
        from .pipeline import embed_files

        done = 0
        if progress:
            progress(0, len(files))
        generation = store.generation()
        paths = [f.path for f in files]
        if self.ray is not None:
            from . import cluster

            batches = cluster.embed_files(paths, recipe, weights=self.weights, batch_size=self.batch_size,
                                          max_pixels=self.max_pixels)
        else:
            batches = embed_files(paths, encoder, recipe=recipe, batch_size=self.batch_size,
                                  workers=min(self.workers, len(files)), max_pixels=self.max_pixels)
        for results in batches:
            generation = self._write_batch(store, recipe, results, files, by_path, hashes, index, summary)
            done += len(results)
            if progress:
                progress(done, len(files))
        return generation

    def _write_batch(self, store: Store, recipe: Recipe, results, files: list[FileStat], by_path, hashes,
                     index, summary: Summary) -> int:
        """Commit one batch of embedded files (rows, local features, the generation) in one
        transaction, then change the vector index to match; the generation now."""
        with store.session(write=True) as s:
            if store.is_server:  # another machine's run over the same folder may have added some
                by_path = {**self._rows_at(s, [files[r.index].path for r in results]), **by_path}
            written, new_ids, new_vecs, replaced = [], [], [], []
            for r in results:
                f = files[r.index]
                row = by_path.get(f.path)
                if r.vector is None:
                    log.info("%s: %s", display_path(f.path), r.error)
                    summary.failures.append((f.path, r.error))
                    summary.failed += 1
                    # Bytes that could not be opened say nothing about their content:
                    # keep no hash, so the row is never the source of a move.
                    sha = None if _access_failure(r.error) else hashes[f.path]
                    self._fail(s, row, f, sha, r.error, index)
                    continue
                blob = pack_vector(r.vector)
                db_row = self._upsert(s, row, f, hashes[f.path], OK, None, blob, r.width, r.height)
                written.append((db_row, row, r.local))
                new_vecs.append(unpack_vector(blob, recipe.dim))  # the index holds what the database does
            s.flush()  # one round of inserts for the batch: the new rows' ids
            for db_row, row, local in written:
                if recipe.has_local:  # in the row's transaction: both or neither
                    store.set_local(s, db_row.id, local, new=row is None)
                if row is not None:
                    replaced.append(db_row.id)
                    summary.updated += 1
                else:
                    summary.added += 1
                new_ids.append(db_row.id)
            summary.embedded += len(written)
            generation = self._commit(store, s)
        index.remove(replaced)
        if new_ids:
            index.add(new_ids, np.stack(new_vecs))
        return generation

    @staticmethod
    def _rows_at(s, paths: list[str]) -> dict:
        """The rows (id, status) at ``paths`` now, by path."""
        return {r.path: r for r in s.execute(select(ImageRow.id, ImageRow.path, ImageRow.status)
                                             .where(ImageRow.path.in_(paths)))}
