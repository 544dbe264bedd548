"""Move embeddings between databases: Parquet files of paths and descriptors.

``export`` writes every indexed image (status "ok") as one row: ``path``,
``embedding`` (fixed_size_list<float32>[dim]) and, when known, ``size``,
``mtime_ns``, ``sha256``, ``width`` and ``height``. The file's key-value
metadata carries the recipe (``lookalike.recipe``), the format
(``lookalike.format``) and the collection's whitening setting
(``lookalike.whitening``, when one is stored). ``import_embeddings`` reads such
files into a database of the same recipe, or into a new one, which takes the
first file's recipe and whitening. A bad file or row is reported and skipped,
never the end of a run; rows are committed batch by batch, so a killed import
loses at most the batch in flight and importing again finishes the job.

Imported rows have no local features: verification leaves them at their global
rank, and ``lookalike check --repair`` computes them from the files.
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from .atomic import write_atomically
from .errors import first_line
from .recipe import Recipe, RecipeMismatch
from .store import (OK, ImageRow, Store, StoreError, now, pack_vector, unpack_vectors,
                    writer_lock)

log = logging.getLogger(__name__)

FORMAT = "1"
RECIPE_KEY, FORMAT_KEY, WHITENING_KEY = b"lookalike.recipe", b"lookalike.format", b"lookalike.whitening"
# Optional columns, their Arrow type names and the value a row gets when the file has none.
OPTIONAL = {"size": ("int64", 0), "mtime_ns": ("int64", 0), "sha256": ("string", None),
            "width": ("int32", None), "height": ("int32", None)}
NORM_TOLERANCE = 1e-3
_PART = re.compile(r"^part-(\d{5,})\.parquet$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[int, int], None]


class ExchangeError(ValueError):
    """An export or import cannot start (no such file, nothing to import...); str() says why."""


@dataclass(frozen=True)
class Exported:
    """What ``export`` wrote: the Parquet files, and the rows in all of them."""

    files: list[Path]
    rows: int


@dataclass(frozen=True)
class Imported:
    """What ``import_embeddings`` did. Every row read is counted once in added, updated,
    unchanged or failed; a file refused whole is one entry of ``failed``."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, one-line reason)
    files: int = 0  # files read (not refused whole)

    def line(self) -> str:
        return (f"{self.added} added, {self.updated} updated, {self.unchanged} unchanged, "
                f"{len(self.failed)} failed, from {self.files} file{'s' * (self.files != 1)}")


def export_database(db: str | os.PathLike | None, out: str | os.PathLike, **options) -> Exported:
    """``export`` of the database at ``db`` (None: the default one)."""
    with _opened(db, create=False) as store:
        return export(store, Path(out), **options)


def import_into(db: str | os.PathLike | None, source: str | os.PathLike, **options) -> Imported:
    """``import_embeddings`` into the database at ``db`` (None: the default one), made if new."""
    with _opened(db, create=True) as store:
        return import_embeddings(store, Path(source), **options)


@contextmanager
def _opened(db, create: bool) -> Iterator[Store]:
    store = Store(db, create=create)
    try:
        yield store
    finally:
        store.close()


# -- export -------------------------------------------------------------------

def export(store: Store, out: Path, *, rows_per_file: int = 1_000_000, batch: int = 10_000) -> Exported:
    """Write the indexed images of ``store`` to ``out``: one file when it ends in
    .parquet, else a folder of part-00000.parquet, ... of ``rows_per_file`` rows each.

    Reads in id order, ``batch`` rows at a time, in one read transaction (a
    consistent snapshot, even while an index run commits). Each file is written
    to a temp file, then renamed. Raises ExchangeError, StoreError or OSError.
    """
    if rows_per_file < 1 or batch < 1:
        raise ValueError("rows per file and batch must be at least 1")
    out, single = _target(out)
    with store.session() as s:  # one transaction: the rows, the recipe and the whitening agree
        recipe_text = store.get_setting(s, "recipe")
        if recipe_text is None:
            raise ExchangeError(f"{store.name}: the database holds no index yet; nothing to export")
        dim = Recipe.from_json(recipe_text).dim
        schema = _schema(dim, recipe_text, store.get_setting(s, "whitening"))
        feed = _Feed(_chunks(s, schema, batch))
        files = _write_files(feed, schema, out, None if single else rows_per_file)
    if not single:
        _drop_stale_parts(out, len(files))
    log.info("exported %d rows of %s to %d file(s) at %s", feed.rows, store.name, len(files), out)
    return Exported(files, feed.rows)


def _target(out: Path) -> tuple[Path, bool]:
    """(``out`` made absolute, whether it names one file rather than a folder of parts),
    once it is known not to be the other kind, with the folder it needs made."""
    out = Path(out).expanduser().absolute()
    single = out.suffix.lower() == ".parquet"
    if single and out.is_dir():
        raise ExchangeError(f"{out}: is a folder; name a .parquet file or a folder without the suffix")
    if not single and out.exists() and not out.is_dir():
        raise ExchangeError(f"{out}: is a file; name a new folder, or a file ending in .parquet")
    (out.parent if single else out).mkdir(parents=True, exist_ok=True)
    return out, single


def _write_files(feed: _Feed, schema, out: Path, limit: int | None) -> list[Path]:
    """Write the rows of ``feed`` to ``out`` (``limit`` None) or to its part files of
    ``limit`` rows each; the files written, in order."""
    import pyarrow.parquet as pq

    def write(tmp: str) -> None:
        with pq.ParquetWriter(tmp, schema, use_dictionary=False) as writer:  # closed on error too
            for table in feed.take(limit):
                writer.write_table(table)

    files: list[Path] = []
    # Nothing indexed still gives one file: one that says so, with its recipe.
    while not files or feed.more():
        files.append(out if limit is None else out / f"part-{len(files):05d}.parquet")
        write_atomically(files[-1], write)  # a reader never sees half a file
    return files


class _Feed:
    """Arrow tables cut to size: ``take(n)`` streams the next ``n`` rows, whichever
    tables they are in, so a part file holds exactly ``n`` in bounded memory."""

    def __init__(self, tables: Iterator) -> None:
        self._tables, self._head, self.rows = tables, None, 0  # rows: taken so far

    def more(self) -> bool:
        """Whether any row is left (reading ahead past empty tables)."""
        while self._head is None or not self._head.num_rows:
            self._head = next(self._tables, None)
            if self._head is None:
                return False
        return True

    def take(self, limit: int | None) -> Iterator:
        """The next ``limit`` rows (all that are left when None), as table slices."""
        taken = 0
        # Check the limit first: a full file must not wait on reading the next batch.
        while (limit is None or taken < limit) and self.more():
            n = self._head.num_rows if limit is None else min(self._head.num_rows, limit - taken)
            piece = self._head.slice(0, n)
            self._head, taken, self.rows = self._head.slice(n), taken + n, self.rows + n
            yield piece


def _schema(dim: int, recipe_text: str, whitening: str | None):
    import pyarrow as pa

    meta = {RECIPE_KEY: recipe_text.encode(), FORMAT_KEY: FORMAT.encode()}
    if whitening is not None:
        meta[WHITENING_KEY] = whitening.encode()
    return pa.schema([pa.field("path", pa.string(), nullable=False),
                      pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False)]
                     + [pa.field(name, getattr(pa, kind)()) for name, (kind, _) in OPTIONAL.items()],
                     metadata=meta)


def _chunks(s, schema, batch: int) -> Iterator:
    """Arrow tables of the indexed rows in id order, ``batch`` at a time (bounded memory)."""
    import pyarrow as pa

    dim, last = schema.field("embedding").type.list_size, 0
    while True:
        rows = s.execute(select(ImageRow.id, ImageRow.path, ImageRow.embedding, ImageRow.size,
                                ImageRow.mtime_ns, ImageRow.sha256, ImageRow.width, ImageRow.height)
                         .where(ImageRow.status == OK, ImageRow.id > last)
                         .order_by(ImageRow.id).limit(batch)).all()
        if not rows:
            return
        last = rows[-1].id
        good = []
        for r in rows:
            if r.embedding is not None and len(r.embedding) in (2 * dim, 4 * dim):
                good.append(r)
            else:  # a damaged row must not stop the export; check says more
                log.warning("%s (id %d): its stored embedding is damaged; not exported "
                            "(run 'lookalike check')", r.path, r.id)
        vecs = unpack_vectors([r.embedding for r in good], dim)
        columns = {"path": pa.array([r.path for r in good], pa.string()),
                   "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel(), pa.float32()), dim)}
        for name, (kind, _) in OPTIONAL.items():
            columns[name] = pa.array([getattr(r, name) for r in good], getattr(pa, kind)())
        yield pa.table(columns, schema=schema)


def _drop_stale_parts(folder: Path, count: int) -> None:
    """Remove part files beyond ``count`` left by an earlier, larger export: an import of
    the folder would read them too."""
    for p in folder.iterdir():
        m = _PART.match(p.name)
        if m and int(m.group(1)) >= count:
            log.info("%s: removing a part of an earlier export", p)
            p.unlink()


# -- import -------------------------------------------------------------------

@dataclass
class _Source:
    """A Parquet file that passed the checks that need no row: its metadata and columns."""

    path: Path
    recipe: Recipe
    whitening: str | None
    rows: int
    optional: list[str]
    width: int | None  # the embedding's fixed width; None for variable lists


@dataclass
class _Row:
    path: str
    blob: bytes
    values: dict  # the optional columns the file has, by name


def import_embeddings(store: Store, source: Path, *, batch: int = 1000,
                      progress: Progress | None = None) -> Imported:
    """Import one Parquet file, or a folder's *.parquet files (sorted), into ``store``.

    Every file's recipe must be the database's (a new database takes the first
    file's, and its whitening): else RecipeMismatch, before any row is written.
    Rows are committed ``batch`` at a time under the writer's lock; a path
    already indexed is updated (unchanged when nothing differs). ``progress``
    gets (rows done, rows in all files). Raises ExchangeError, RecipeMismatch
    or StoreError; bad files and rows are in the result's ``failed``.
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    paths = _parquet_files(Path(source).expanduser().absolute())
    if store.read_only:
        raise StoreError(f"{store.name}: cannot write to the database: its folder is read-only")
    failed: list[tuple[str, str]] = []
    with writer_lock(store.where):
        sources = [src for src in (_open(p, failed) for p in paths) if src is not None]
        recipe = _bind(store, sources)
        sources = [src for src in sources if _fits(src, recipe.dim, failed)]
        counts = _load(store, sources, recipe, batch, progress, failed)
    result = Imported(counts["added"], counts["updated"], counts["unchanged"], failed, len(sources))
    log.info("%s: imported %s", store.name, result.line())
    return result


def _load(store: Store, sources: list[_Source], recipe: Recipe | None, batch: int,
          progress: Progress | None, failed: list) -> Counter:
    """Commit the good rows of ``sources`` batch by batch, then bring the vector index in
    line; counts of added, updated and unchanged. The caller holds the writer's lock."""
    counts: Counter = Counter()
    total, done = sum(src.rows for src in sources), 0
    if progress:
        progress(0, total)
    try:
        for src in sources:
            for rows, read in _read(src, recipe.dim, batch, failed):
                if rows:
                    counts.update(_commit(store, rows))
                done += read
                if progress:
                    progress(done, total)
        if recipe is not None:  # None: an empty new database, no vectors to index
            from . import vectors

            vectors.update(store)  # the vector index, rebuilt (or retrained) for the new rows
    except OperationalError as exc:  # a failed write (disk full, I/O error)
        raise StoreError(f"{store.name}: {first_line(exc)}; the rows committed so far are kept, "
                         "import again to finish") from None
    return counts


def _parquet_files(source: Path) -> list[Path]:
    if source.is_dir():
        files = sorted(p for p in source.glob("*.parquet") if not p.name.startswith(".") and p.is_file())
        if not files:
            raise ExchangeError(f"{source}: no .parquet files in this folder")
        return files
    if not source.exists():
        raise ExchangeError(f"{source}: no such file or folder")
    return [source]


class _Refused(Exception):
    """A file refused whole; str() says why."""


def _open(path: Path, failed: list) -> _Source | None:
    """The file's metadata and columns, or None with the reason added to ``failed``."""
    try:
        return _source(path)
    except _Refused as exc:
        _refuse(path, str(exc), failed)
        return None


def _refuse(path: Path, reason: str, failed: list) -> None:
    """Report a file (or the rest of one) as not imported: added to ``failed``, which the
    caller reports (as an index run's failures: logged at info only, not twice)."""
    log.info("%s: %s", path, reason)
    failed.append((str(path), reason))


def _source(path: Path) -> _Source:
    """Read the file's footer and check what it says; raises _Refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as pf:
            meta, schema, rows = pf.metadata.metadata or {}, pf.schema_arrow, pf.metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise _Refused(f"not a readable Parquet file ({first_line(exc)})") from None
    recipe = _recipe_of(meta)
    _check_columns(schema)
    kind = schema.field("embedding").type
    whitening = meta[WHITENING_KEY].decode() if WHITENING_KEY in meta else None
    width = kind.list_size if pa.types.is_fixed_size_list(kind) else None
    return _Source(path, recipe, whitening, rows, [n for n in OPTIONAL if n in schema.names], width)


def _recipe_of(meta: dict) -> Recipe:
    """The recipe in a file's key-value metadata, of this format; raises _Refused."""
    fmt = meta.get(FORMAT_KEY, b"").decode(errors="replace")
    if RECIPE_KEY not in meta:
        raise _Refused("no lookalike.recipe in its metadata: not a lookalike export")
    if fmt != FORMAT:
        raise _Refused(f"lookalike.format {fmt or 'missing'} is not {FORMAT}: "
                       "written by another version of lookalike")
    try:
        return Recipe.from_json(meta[RECIPE_KEY].decode())
    except (ValueError, TypeError, KeyError) as exc:
        raise _Refused(f"its lookalike.recipe is not a recipe ({first_line(exc)})") from None


def _check_columns(schema) -> None:
    """Raise _Refused unless the file has path and embedding columns, and every column
    it has is of a type an import can read."""
    import pyarrow as pa

    names = set(schema.names)
    for name in ("path", "embedding"):
        if name not in names:
            raise _Refused(f"it has no {name} column")
    kind = schema.field("embedding").type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
            or not pa.types.is_floating(kind.value_type):
        raise _Refused(f"its embedding column is {kind}, not a list of floats")
    if not (pa.types.is_string(schema.field("path").type) or pa.types.is_large_string(schema.field("path").type)):
        raise _Refused(f"its path column is {schema.field('path').type}, not text")
    for n in (n for n in OPTIONAL if n in names):
        t = schema.field(n).type
        text = pa.types.is_string(t) or pa.types.is_large_string(t)
        if (n == "sha256") != text or not (text or pa.types.is_integer(t)):
            raise _Refused(f"its {n} column is {t}, not {'text' if n == 'sha256' else 'integers'}")


def _fits(src: _Source, dim: int, failed: list) -> bool:
    """Whether a fixed-width embedding column has the recipe's width (else reported)."""
    if src.width is None or src.width == dim:
        return True
    _refuse(src.path, f"its embeddings have {src.width} values, its recipe {dim}", failed)
    return False


def _bind(store: Store, sources: list[_Source]) -> Recipe | None:
    """The database's recipe, whose descriptors every file must have; a new database takes
    the first file's recipe and whitening, once all files are known to agree. Files carry
    no local features, so only the global part of the recipes is compared, and a new
    database has none (no verification)."""
    with store.session() as s:
        text = store.get_setting(s, "recipe")
        recipe = Recipe.from_json(text) if text else (sources[0].recipe.global_only() if sources else None)
        owner = store.name if text else sources[0].path if sources else None
        for src in sources:
            diff = recipe.global_only().differences(src.recipe.global_only())
            if diff:
                raise RecipeMismatch(f"{src.path}: its embeddings were made with another recipe than "
                                     f"{owner}'s ({'; '.join(diff)}); import it into a new database")
        if text is None and recipe is not None:
            store.set_setting(s, "recipe", recipe.to_json())
            whitening = sources[0].whitening
            if whitening is not None and store.get_setting(s, "whitening") is None \
                    and _usable_whitening(whitening, recipe.dim, sources[0].path):
                store.set_setting(s, "whitening", whitening)
                store.bump_generation(s)
            s.commit()
            log.info("%s: a new database with the recipe of %s", store.name, sources[0].path)
    return recipe


def _usable_whitening(text: str, dim: int, path: Path) -> bool:
    """Whether a file's whitening setting can serve a database of ``dim`` dims."""
    from .whitening import Whitening

    if text == "none":
        return True
    try:
        ok = Whitening.from_json(text).mean.shape == (dim,)
    except Exception as exc:  # noqa: BLE001 - any damage: learn it again rather than fail
        log.warning("%s: its whitening cannot be read (%s); not taken", path, first_line(exc))
        return False
    if not ok:
        log.warning("%s: its whitening is not of %d dims; not taken", path, dim)
    return ok


def _read(src: _Source, dim: int, batch: int, failed: list) -> Iterator[tuple[list[_Row], int]]:
    """The file's good rows ``batch`` at a time, each with the number of rows read; bad rows,
    and a read error that ends the file, go to ``failed``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = 0
    try:
        with pq.ParquetFile(src.path) as pf:
            for rb in pf.iter_batches(batch_size=batch, columns=["path", "embedding", *src.optional]):
                yield _rows(src, rb, dim, first, failed), rb.num_rows
                first += rb.num_rows
    except (pa.ArrowException, OSError, ValueError) as exc:
        _refuse(src.path, f"cannot read past row {first} ({first_line(exc)}); "
                "the rows before are imported", failed)


def _rows(src: _Source, rb, dim: int, first: int, failed: list) -> list[_Row]:
    """The rows of record batch ``rb`` that pass, their embeddings re-normalised and packed."""
    paths = rb.column("path").to_pylist()
    vecs, why = _vectors(rb.column("embedding"), dim)
    values = {n: rb.column(n).to_pylist() for n in src.optional}
    out = []
    for i, path in enumerate(paths):
        reason = why[i]
        if path is None or not os.path.isabs(path):
            reason = f"its path {path!r} is not absolute"
        # A null takes the column's default: size and mtime_ns may not be NULL in the database.
        row = {n: OPTIONAL[n][1] if values[n][i] is None else values[n][i] for n in src.optional}
        sha = row.get("sha256")
        if reason is None and any(isinstance(v, int) and not -2**63 <= v < 2**63 for v in row.values()):
            reason = "a number in it is out of range"
        if reason is None and sha is not None:
            row["sha256"] = sha = sha.lower()
            if not _SHA256.match(sha):
                reason = f"its sha256 {sha[:80]!r} is not 64 hex digits"
        if reason is not None:
            failed.append((str(src.path), f"row {first + i} ({path}): {reason}"))
            continue
        out.append(_Row(path, pack_vector(vecs[i]), row))
    return out


def _vectors(col, dim: int) -> tuple[np.ndarray, list[str | None]]:
    """(N x dim float32 unit vectors, a reason per row or None) from a list column."""
    import pyarrow.compute as pc

    n = len(col)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)  # NaN for a null row
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)  # null lists left out
    if col.null_count == 0 and (lengths == dim).all():
        vecs = flat.reshape(n, dim)
    else:  # the rare path: rows of other widths, or none at all
        vecs = np.full((n, dim), np.nan, np.float32)
        start = np.concatenate([[0], np.cumsum(np.nan_to_num(lengths).astype(np.int64))])
        for i in np.flatnonzero(lengths == dim):
            vecs[i] = flat[start[i]:start[i] + dim]
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.linalg.norm(vecs.astype(np.float64), axis=1)
    why: list[str | None] = []
    for i in range(n):
        if np.isnan(lengths[i]):
            why.append("it has no embedding")
        elif lengths[i] != dim:
            why.append(f"its embedding has {int(lengths[i])} values, the recipe {dim}")
        elif not np.isfinite(vecs[i]).all():
            why.append("its embedding has NaN or infinite values")
        elif abs(norms[i] - 1) > NORM_TOLERANCE:
            why.append(f"its embedding is not of unit length (norm {norms[i]:.4g})")
        else:
            why.append(None)
    ok = np.array([w is None for w in why], bool)
    vecs[ok] /= norms[ok, None].astype(np.float32)  # within the tolerance: exactly unit again
    return vecs, why


def _commit(store: Store, rows: list[_Row]) -> Counter:
    """Write ``rows`` in one transaction; counts of added, updated and unchanged."""
    counts: Counter = Counter()
    with store.session() as s:
        existing = _existing(s, sorted({r.path for r in rows}))
        for r in rows:
            db_row = existing.get(r.path)
            if db_row is None:
                db_row = existing[r.path] = ImageRow(path=r.path)
                s.add(db_row)
                counts["added"] += 1
            elif (db_row.status == OK and db_row.embedding == r.blob
                  and all(getattr(db_row, n) == v for n, v in r.values.items())):
                counts["unchanged"] += 1
                continue
            else:
                # Local features belong to the content: kept only when the hash says it is the same.
                same = r.values.get("sha256") is not None and r.values["sha256"] == db_row.sha256
                if db_row.id is not None and not same:
                    store.set_local(s, db_row.id, None)
                counts["updated"] += 1
            for n, (_, default) in OPTIONAL.items():
                setattr(db_row, n, r.values.get(n, default))
            db_row.status, db_row.error, db_row.embedding, db_row.indexed_at = OK, None, r.blob, now()
        if counts["added"] or counts["updated"]:
            store.bump_generation(s)
        s.commit()
    return counts


def _existing(s, paths: list[str]) -> dict[str, ImageRow]:
    """The database's rows of ``paths``, by path."""
    existing: dict[str, ImageRow] = {}
    for start in range(0, len(paths), 900):  # under SQLite's variable limit
        for db_row in s.execute(select(ImageRow).where(ImageRow.path.in_(paths[start:start + 900]))).scalars():
            existing[db_row.path] = db_row
    return existing
