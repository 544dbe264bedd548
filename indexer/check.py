"""Check that the database, the FAISS file and the files on disk agree; mend what can be mended.

The database is the source of truth. What can always be rebuilt from it (the
FAISS file) is rebuilt; rows whose files are gone are dropped; rows whose
embedding is damaged, stale or not reproducible are embedded again from their
file. A good embedding is never deleted: a row is only dropped when its file
is gone, and replaced only by a fresh computation from the same file.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import asdict, dataclass, field

import numpy as np
from sqlalchemy import delete, select, text

from . import local, vectors
from .decode import DEFAULT_MAX_PIXELS
from .recipe import Recipe
from .scan import display_path, file_sha256
from .store import (FAILED, OK, ImageRow, LocalRow, Store, StoreError, lock_holder, now,
                    pack_vector, unpack_vector, writer_lock)

log = logging.getLogger(__name__)

# Cosine below which a stored embedding is taken to differ from a fresh one. ONNX
# Runtime and torch agree to 1e-6; fp16 on a GPU to about 1e-3.
SAME_COSINE = 0.995
# Share of freshly found keypoints that must agree with the stored ones (same place,
# same descriptor). The same code and libraries agree exactly; another OpenCV or
# Pillow build moves a few.
SAME_LOCAL = 0.8


@dataclass
class Problem:
    """One disagreement, in one line; ``fixed`` once --repair has mended it."""

    what: str  # database, recipe, faiss, row, file, temp
    message: str
    fixable: bool = True
    fixed: bool = False

    def line(self) -> str:
        return f"{self.what}: {self.message}"


@dataclass
class Report:
    """What ``check`` looked at and what it found."""

    database: str
    rows: int = 0
    failed_rows: int = 0
    faiss_vectors: int | None = None
    vector_index: str | None = None  # the index's kind: "exact" or its FAISS key
    recall: float | None = None  # a compressed index's recall@10 on a sample
    files_checked: int = 0
    recomputed: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def remaining(self) -> list[Problem]:
        return [p for p in self.problems if not p.fixed]

    @property
    def ok(self) -> bool:
        return not self.remaining

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        return data


class _Repairs:
    """Row-level mends collected while checking, applied in one transaction."""

    def __init__(self):
        self.drop: dict[int, Problem] = {}
        self.reembed: dict[int, list[Problem]] = {}
        self.drop_local: dict[int, Problem] = {}  # local features of no indexed image
        self.rebuild_faiss: list[Problem] = []
        self.restore_recipe: tuple[Recipe, Problem] | None = None

    def add_reembed(self, row_id: int, problem: Problem) -> None:
        self.reembed.setdefault(row_id, []).append(problem)


def check(db: str | os.PathLike | None = None, *, repair: bool = False, sample: int = 32,
          weights: str | os.PathLike | None = None, device: str = "auto") -> Report:
    """Verify the database at ``db`` against its FAISS file and the files on disk.

    ``sample`` embeddings (of files unchanged on disk) are recomputed and
    compared; a negative ``sample`` recomputes all of them. With ``repair``,
    every fixable problem is mended and the FAISS file rebuilt.
    """
    from .encoder import resolve_device

    device = resolve_device(device)
    store = Store(db, create=False)
    try:
        if repair and store.read_only:
            raise StoreError(f"{store.name}: cannot repair: the database's folder is read-only")
        with writer_lock(store.where, wait=repair) as held:
            if not held and not store.read_only:
                raise StoreError(f"{store.name}: {lock_holder(store.where) or 'an index run'} is "
                                 "working on it; check it when that has finished")
            return _Checker(store, weights, device, sample).run(repair)
    finally:
        store.close()


@dataclass(frozen=True)
class _Row:
    id: int
    path: str
    size: int
    mtime_ns: int


class _Checker:
    def __init__(self, store: Store, weights, device: str, sample: int):
        self.store, self.weights, self.device, self.sample = store, weights, device, sample
        self.report = Report(store.name)
        self.fix = _Repairs()
        self.recipe: Recipe | None = None
        self.faiss_recipe: Recipe | None = None  # the recipe the FAISS file says it was built with
        self.recompute_all: Problem | None = None
        self.unreachable: set[int] = set()  # rows whose files cannot be looked at now: kept as they are
        self._encoders: dict[Recipe, object] = {}

    def problem(self, what: str, message: str, fixable: bool = True) -> Problem:
        p = Problem(what, message, fixable)
        self.report.problems.append(p)
        log.info("%s", p.line())
        return p

    def run(self, repair: bool) -> Report:
        if not self._integrity():
            return self.report
        self._pending_retune(repair)
        self.recipe = self.store.recipe()
        if self.recipe is None:
            self.problem("recipe", "the database holds no recipe: nothing was ever indexed",
                         fixable=False)
            return self.report
        self._temp_files()
        rows = self._rows()
        self._faiss(rows)
        self._recompute(rows)
        if repair:
            self._repair(rows)
        return self.report

    def _pending_retune(self, repair: bool) -> None:
        """A move to fine-tuned weights that a killed run left unfinished; --repair finishes it."""
        from . import retune
        from .encoder import Encoder
        from .sync import default_workers

        if retune.pending(self.store) is None:
            return
        p = self.problem("recipe", "a move to fine-tuned weights is unfinished (a run was stopped); "
                         "'lookalike index' or 'check --repair' finishes it")
        if repair:
            retune.finish(self.store, lambda r: Encoder(r, self.weights, self.device), batch_size=32,
                          workers=default_workers(), max_pixels=DEFAULT_MAX_PIXELS)
            p.fixed = True

    # -- the checks, in order ---------------------------------------------
    def _integrity(self) -> bool:
        if self.store.is_server:  # the server keeps its own pages whole (WAL, checksums)
            return True
        with self.store.engine.connect() as conn:
            result = [r[0] for r in conn.execute(text("PRAGMA quick_check"))]
        if result != ["ok"]:
            self.problem("database", f"SQLite finds the file damaged ({result[0]}); restore it from a "
                         "backup or index again into a new database", fixable=False)
            return False
        return True

    def _temp_files(self) -> None:
        """Temporary files left by a killed run: harmless, but they take space."""
        for tmp in vectors.temp_files(self.store):
            self.fix.rebuild_faiss.append(self.problem(
                "temp", f"{display_path(tmp)}: a temporary file left by an interrupted run"))

    def _rows(self) -> dict[int, _Row]:
        """Every indexed row, checked against its embedding, its local features and its file."""
        dim = self.recipe.dim
        rows: dict[int, _Row] = {}
        with self.store.session() as s:
            self.report.failed_rows = len(s.execute(
                select(ImageRow.id).where(ImageRow.status == FAILED)).all())
            result = s.execute(select(ImageRow.id, ImageRow.path, ImageRow.size, ImageRow.mtime_ns,
                                      ImageRow.embedding, LocalRow.data)
                               .outerjoin(LocalRow, LocalRow.image_id == ImageRow.id)
                               .where(ImageRow.status == OK).order_by(ImageRow.id)
                               .execution_options(yield_per=1024))
            for r in result:
                row = rows[r.id] = _Row(r.id, r.path, r.size, r.mtime_ns)
                for reason in filter(None, (_embedding_fault(r.embedding, dim),
                                            self._local_fault(r.data))):
                    self.fix.add_reembed(row.id, self.problem("row", f"{display_path(row.path)} (id {row.id}): {reason}"))
                self._file(row)
        self.report.rows = len(rows)
        self._stray_local()
        return rows

    def _local_fault(self, blob: bytes | None) -> str | None:
        """What is wrong with a row's stored local features, given the recipe."""
        if not self.recipe.has_local:
            return None if blob is None else "it holds local features the recipe does not ask for"
        if blob is None:
            return "it has no local features"
        try:
            features = local.decode(blob)
        except local.FeaturesError as exc:
            return str(exc)
        if (len(features) > self.recipe.local_keypoints
                or max(features.width, features.height) > self.recipe.local_size):
            return (f"its local features ({len(features)} keypoints at {features.width}x{features.height}) "
                    f"do not follow the recipe ({self.recipe.local_keypoints} at {self.recipe.local_size} px)")
        return None

    def _stray_local(self) -> None:
        """Local features whose image is not indexed (failed, or gone): dropped by --repair."""
        with self.store.session() as s:
            indexed = select(ImageRow.id).where(ImageRow.status == OK)
            stray = s.execute(select(LocalRow.image_id).where(LocalRow.image_id.not_in(indexed))).scalars().all()
        for image_id in stray:
            self.fix.drop_local[image_id] = self.problem(
                "row", f"local features of id {image_id}, which is not an indexed image")

    def _file(self, row: _Row) -> None:
        self.report.files_checked += 1
        try:
            st = os.stat(row.path)
        except FileNotFoundError:
            folder = os.path.dirname(row.path)
            if os.path.isdir(folder):
                self.fix.drop[row.id] = self.problem("file", f"{display_path(row.path)}: the file is gone")
            else:
                # Perhaps a drive that is not mounted now: keep what was indexed.
                self.unreachable.add(row.id)
                self.problem("file", f"{display_path(row.path)}: its folder is gone too (a drive not mounted?); "
                             "kept until 'lookalike index' runs on it again", fixable=False)
            return
        except OSError as exc:
            self.unreachable.add(row.id)
            self.problem("file", f"{display_path(row.path)}: cannot read: {exc.strerror or exc}", fixable=False)
            return
        if st.st_size != row.size or st.st_mtime_ns != row.mtime_ns:
            self.fix.add_reembed(row.id, self.problem(
                "file", f"{display_path(row.path)}: changed on disk since it was indexed"))

    def _faiss(self, rows: dict[int, _Row]) -> None:
        path = vectors.index_path(self.store.path)
        if not path.exists():
            if rows:
                self.fix.rebuild_faiss.append(self.problem("faiss", f"{display_path(path)}: the FAISS file is missing"))
            return
        index, meta, why = vectors.read(self.store)
        if index is None:  # unreadable, or not what its sidecar says
            self.fix.rebuild_faiss.append(self.problem("faiss", f"{display_path(path)}: {why}"))
            return
        self.report.faiss_vectors = len(index)
        self.report.vector_index = index.layout.key
        self._faiss_recipe(meta)
        faults = [why] if why else []
        if index.stored_dim == index.space_dim:
            faults += self._faiss_contents(index, rows)
        if faults:
            self.fix.rebuild_faiss.append(self.problem("faiss", f"{display_path(path)}: {'; '.join(faults)}"))

    def _faiss_recipe(self, meta: dict) -> None:
        # Compared as recipes, not text: a sidecar from before a field existed
        # (scales) reads with that field's default.
        faiss_recipe = Recipe.from_json(meta["recipe"]) if meta.get("recipe") else None
        if faiss_recipe is not None and faiss_recipe != self.recipe:
            self.faiss_recipe = faiss_recipe
            diff = "; ".join(d.replace("index has ", "FAISS file has ").replace("asked for ", "database ")
                             for d in self.faiss_recipe.differences(self.recipe))
            self.fix.rebuild_faiss.append(self.problem(
                "recipe", f"the database's recipe is not the one its FAISS file was built with ({diff})"))

    def _faiss_contents(self, index: vectors.VectorIndex, rows: dict[int, _Row]) -> list[str]:
        """Its ids against the database's; an exact index's vectors too, and a compressed
        one's recall@10 against exact search on a sample."""
        faults = []
        ids = index.ids()
        have, want = set(ids.tolist()), set(rows)
        if len(have) != len(ids):
            faults.append(f"it holds {len(ids) - len(have)} duplicate ids")
        if have - want:
            faults.append(f"it holds {len(have - want)} ids the database does not (e.g. {min(have - want)})")
        if want - have:
            faults.append(f"it lacks {len(want - have)} of the database's images (e.g. id {min(want - have)})")
        if faults or not len(ids):
            return faults
        if not index.layout.exact:
            self.report.recall = vectors.measure_recall(index)
            if self.report.recall < vectors.TARGET_RECALL:
                faults.append(f"its recall@10 against exact search is {self.report.recall:.3f}, "
                              f"below {vectors.TARGET_RECALL}: it needs training again")
            return faults
        differ = 0
        for db_ids, db_vecs in self.store.embeddings():
            held = index.vectors(db_ids)
            differ += int((~np.isclose(held, index.space(db_vecs), atol=1e-5).all(axis=1)).sum())
        if differ:
            faults.append(f"{differ} of its vectors differ from the database's")
        return faults

    def _recompute(self, rows: dict[int, _Row]) -> None:
        """Recompute a sample of embeddings of unchanged files and compare."""
        skip = self.fix.drop.keys() | self.fix.reembed.keys() | self.unreachable
        candidates = [r for r in rows.values() if r.id not in skip]
        if 0 <= self.sample < len(candidates):
            candidates = random.Random(0).sample(candidates, self.sample)
        if not candidates:
            return
        fresh = self._embed(self.recipe, [r.path for r in candidates])
        if fresh is None:
            return
        self.report.recomputed += len(candidates)
        stored = self.store.vectors_by_id(r.id for r in candidates)
        stored_local = self.store.local_features(stored) if self.recipe.has_local else {}
        differ = []
        for row, result in zip(candidates, fresh):
            if result.vector is None:
                self.fix.add_reembed(row.id, self.problem(
                    "file", f"{display_path(row.path)}: cannot be read now: {result.error}"))
                continue
            cos = float(np.dot(result.vector, stored[row.id]))
            if cos < SAME_COSINE:
                differ.append((row, cos))
            elif row.id in stored_local:
                self._compare_local(row, result.local, stored_local[row.id])
        if not differ:
            return
        if len(differ) == len(candidates) and self.faiss_recipe is not None:
            # Every sample disagrees: perhaps the recipe changed, not the embeddings.
            probe = differ[:4]
            before = self._embed(self.faiss_recipe, [r.path for r, _ in probe])
            if before and all(b.vector is not None and float(np.dot(b.vector, stored[r.id])) >= SAME_COSINE
                              for (r, _), b in zip(probe, before)):
                p = self.problem("recipe", "the stored embeddings were made with the FAISS file's "
                                 "recipe: restore it")
                self.fix.restore_recipe = (self.faiss_recipe, p)
                return
        for row, cos in differ:
            self.fix.add_reembed(row.id, self.problem(
                "row", f"{display_path(row.path)} (id {row.id}): its embedding differs from a fresh computation "
                f"(cosine {cos:.3f})"))
        if len(candidates) < len(rows):
            # Bad embeddings in a sample mean the rest cannot be trusted either.
            self.recompute_all = self.problem(
                "row", f"{len(differ)} of {len(candidates)} sampled embeddings differ from a fresh "
                f"computation; the other {len(rows) - len(candidates)} are suspect too")

    def _compare_local(self, row: _Row, fresh: bytes | None, stored: bytes) -> None:
        try:
            agree = local.agreement(local.decode(fresh), local.decode(stored))
        except local.FeaturesError:
            return  # a damaged stored blob was reported by _rows already
        if agree < SAME_LOCAL:
            self.fix.add_reembed(row.id, self.problem(
                "row", f"{display_path(row.path)} (id {row.id}): its local features differ from a fresh "
                f"extraction ({100 * agree:.0f} % of keypoints agree)"))

    # -- repair -----------------------------------------------------------
    def _repair(self, rows: dict[int, _Row]) -> None:
        fix = self.fix
        if fix.restore_recipe:
            recipe, problem = fix.restore_recipe
            with self.store.session() as s:
                self.store.set_setting(s, "recipe", recipe.to_json())
                s.commit()
            self.recipe = recipe
            problem.fixed = True
        if self.recompute_all:
            log.warning("recomputing all %d embeddings", len(rows))
            for row_id in rows:
                if row_id not in fix.drop and row_id not in self.unreachable:
                    fix.reembed.setdefault(row_id, [self.recompute_all])
        if fix.drop:
            with self.store.session() as s:
                ids = list(fix.drop)
                for start in range(0, len(ids), 500):
                    s.execute(delete(ImageRow).where(ImageRow.id.in_(ids[start:start + 500])))
                self.store.bump_generation(s)
                s.commit()
            for p in fix.drop.values():
                p.fixed = True
        if fix.drop_local:
            with self.store.session() as s:
                ids = list(fix.drop_local)
                for start in range(0, len(ids), 500):
                    s.execute(delete(LocalRow).where(LocalRow.image_id.in_(ids[start:start + 500])))
                s.commit()
            for p in fix.drop_local.values():
                p.fixed = True
        if fix.reembed:
            self._reembed(rows)
        if fix.drop or fix.reembed or fix.rebuild_faiss or fix.restore_recipe:
            index = vectors.rebuild(self.store)
            vectors.save(self.store, index, self.store.generation())  # removes leftover temp files
            for p in fix.rebuild_faiss:
                p.fixed = True
            self.report.faiss_vectors = len(index)
            self.report.rows = self.store.count(OK)
            self.report.failed_rows = self.store.count(FAILED)

    def _reembed(self, rows: dict[int, _Row]) -> None:
        ids = []
        for row_id, problems in self.fix.reembed.items():
            if row_id in self.fix.drop:  # the row is gone with its file: nothing left to mend
                for p in problems:
                    p.fixed = True
            else:
                ids.append(row_id)
        if not ids:
            return
        fresh = self._embed(self.recipe, [rows[i].path for i in ids])
        if fresh is None:
            return
        with self.store.session() as s:
            for row_id, result in zip(ids, fresh):
                vec, error = result.vector, result.error
                row = s.get(ImageRow, row_id)
                try:
                    st = os.stat(row.path)
                    sha = file_sha256(row.path)
                except OSError as exc:
                    vec, error, st, sha = None, f"cannot read: {exc.strerror or exc}", None, None
                if vec is None and sha is not None and sha == row.sha256 and row.embedding:
                    # Same bytes as when it was embedded, but not decodable here (a
                    # plugin missing?): the stored embedding is still the good one.
                    for p in self.fix.reembed[row_id]:
                        p.fixable = False
                        p.message += "; kept, since the file is unchanged"
                    continue
                if vec is None:
                    # The file is there but no longer an image: its old embedding
                    # described other content, so it was not a good one.
                    row.status, row.error, row.embedding = FAILED, error, None
                else:
                    row.status, row.error = OK, None
                    row.embedding = pack_vector(vec)
                # With the row, in its transaction: what the recipe asks for, or nothing.
                self.store.set_local(s, row_id, result.local if vec is not None else None)
                if st is not None:
                    row.size, row.mtime_ns, row.sha256 = st.st_size, st.st_mtime_ns, sha
                row.indexed_at = now()
                self.report.recomputed += 1
                for p in self.fix.reembed[row_id]:
                    p.fixed = True
            self.store.bump_generation(s)
            s.commit()

    def _embed(self, recipe: Recipe, paths: list[str]):
        """A pipeline Result (vector, local features, or the error) per path, or None if the
        model cannot load."""
        from .backbone import BackboneError
        from .pipeline import Result, embed_files
        from .recipe import RecipeMismatch

        encoder = self._encoders.get(recipe)
        if encoder is None:
            from .encoder import Encoder

            try:
                encoder = Encoder(recipe, self.weights, self.device)
            except (BackboneError, RecipeMismatch) as exc:
                self.problem("recipe", f"cannot recompute embeddings: {exc}", fixable=False)
                return None
            self._encoders[recipe] = encoder
        out: list = [Result(i, None, error="not decoded") for i in range(len(paths))]
        for batch in embed_files(paths, encoder, batch_size=16, workers=0):
            for r in batch:
                out[r.index] = r
        return out


def _embedding_fault(blob: bytes | None, dim: int) -> str | None:
    if blob is None:
        return "indexed, but it has no embedding"
    try:
        vec = unpack_vector(blob, dim)
    except ValueError:
        return f"its embedding is {len(blob)} bytes, not {dim} dims (float16 or float32)"
    if not np.isfinite(vec).all():
        return "its embedding is not finite"
    norm = float(np.linalg.norm(vec))
    if abs(norm - 1.0) > 1e-3:
        return f"its embedding is not unit length (norm {norm:.4f})"
    return None
