"""The database, the single source of truth, embeddings included: a SQLite file, or a
PostgreSQL server that several machines share."""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import sqlite3
import uuid
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np
from sqlalchemy import (URL, BigInteger, DateTime, ForeignKey, Integer, LargeBinary, String, Text,
                        create_engine, event, make_url, select, func, text)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .errors import first_line
from .recipe import Recipe

log = logging.getLogger(__name__)

OK, FAILED = "ok", "failed"


# Descriptors are stored as float16: half the bytes of float32, for a change in
# cosine of about 1e-4 (bench/SCALE.md). Rows written before are float32; a
# blob's length says which, so both read the same.
VECTOR_DTYPE = np.dtype("<f2")


def pack_vector(vec: np.ndarray) -> bytes:
    """A descriptor as the database stores it."""
    return np.asarray(vec, dtype=np.float32).astype(VECTOR_DTYPE).tobytes()


def unpack_vector(blob: bytes, dim: int) -> np.ndarray:
    """A stored descriptor (float16, or float32 from before) as float32; ValueError if
    its length fits neither."""
    if len(blob) == 2 * dim:
        return np.frombuffer(blob, VECTOR_DTYPE).astype(np.float32)
    if len(blob) == 4 * dim:
        return np.frombuffer(blob, "<f4").copy()
    raise ValueError(f"{len(blob)} bytes is not a {dim}-dim descriptor")


def unpack_vectors(blobs, dim: int) -> np.ndarray:
    """Stored descriptors as an N x dim float32 array, read in one pass when all are float16."""
    blobs = list(blobs)
    if not blobs:
        return np.zeros((0, dim), np.float32)
    if all(len(b) == 2 * dim for b in blobs):
        return np.frombuffer(b"".join(blobs), VECTOR_DTYPE).reshape(len(blobs), dim).astype(np.float32)
    return np.stack([unpack_vector(b, dim) for b in blobs])


@dataclass(frozen=True)
class ImageRecord:
    """An indexed image's row, without its descriptor."""

    id: int
    path: str
    width: int
    height: int
    size: int  # bytes
    mtime_ns: int
    sha256: str | None
    indexed_at: dt.datetime

    @property
    def modified(self) -> str:
        """The file's modification time, ISO 8601 in UTC, to the second."""
        return dt.datetime.fromtimestamp(self.mtime_ns / 1e9, dt.timezone.utc).isoformat(timespec="seconds")


class StoreError(Exception):
    """The database cannot be used; str() says why."""


class Base(DeclarativeBase):
    pass


class ImageRow(Base):
    __tablename__ = "images"
    # Ids are FAISS ids: never hand a deleted image's id to a new one.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Byte order on PostgreSQL too (its default collation may ignore "/"): folder
    # filters are range scans of this column's index.
    path: Mapped[str] = mapped_column(Text().with_variant(Text(collation="C"), "postgresql"),
                                      unique=True, nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    mtime_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    # Indexed: counting the images and listing their ids reads the index, not
    # every row's page (a million rows of descriptors are gigabytes).
    status: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    error: Mapped[str | None] = mapped_column(Text)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    indexed_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False)


class LocalRow(Base):
    """An indexed image's local features (indexer.local's bytes), beside the images table so
    that scans of it do not read them. Written in the transaction that writes the image's
    row; deleted with it (ON DELETE CASCADE)."""

    __tablename__ = "local_features"

    image_id: Mapped[int] = mapped_column(Integer, ForeignKey("images.id", ondelete="CASCADE"),
                                          primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)


class RetunedRow(Base):
    """An image's descriptor under a fine-tuned recipe that is not the database's yet
    (indexer.retune): all of them replace the embeddings in one commit."""

    __tablename__ = "retuned"

    image_id: Mapped[int] = mapped_column(Integer, ForeignKey("images.id", ondelete="CASCADE"),
                                          primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)  # of the content embedded
    embedding: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)


class Setting(Base):
    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


Where = Union[Path, URL]

# What --db and $LOOKALIKE_DB take, for errors that refuse anything else.
SUPPORTED = "a file path, sqlite:///PATH or postgresql://USER@HOST/NAME"
_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_POSTGRES = ("postgresql", "postgres")
# PostgreSQL advisory lock keys ("lkal" and after): index runs share WRITERS, every other
# writer holds it alone; a write transaction of an index run holds COMMITS until it ends;
# MIGRATIONS orders two first opens of an empty database.
WRITERS_KEY, COMMITS_KEY, MIGRATIONS_KEY = 0x6C6B616C, 0x6C6B616D, 0x6C6B616E


def default_db_path() -> Path:
    """lookalike.db in the user's data directory."""
    import platformdirs

    return Path(platformdirs.user_data_dir("lookalike")) / "lookalike.db"


def resolve_db(db: str | os.PathLike | URL | None = None) -> Where:
    """The database ``db`` names: a file's path, or a PostgreSQL URL (``postgresql://``,
    ``postgres://`` or ``postgresql+DRIVER://``; psycopg when no driver is named);
    ``sqlite:///PATH`` is a file. None: $LOOKALIKE_DB, else the user's default file.
    Any other URL is refused: it must never become a folder named after its scheme."""
    if isinstance(db, URL):
        return db
    if db is None or str(db) == "":
        db = os.environ.get("LOOKALIKE_DB") or default_db_path()
    name = os.fspath(db)
    if not _URL_LIKE.match(name):
        return Path(name).expanduser()
    scheme = name.split("://", 1)[0].lower()
    try:
        url = make_url(name)
    except Exception:  # noqa: BLE001 - sqlalchemy's ArgumentError and ValueErrors of ports
        raise StoreError(f"{_redacted(name)}: not a valid database URL; use {SUPPORTED}") from None
    backend = scheme.split("+", 1)[0]
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise StoreError(f"{name}: a sqlite URL needs a file: sqlite:///PATH")
        return Path(url.database).expanduser()
    if backend in _POSTGRES:
        if not url.database:
            raise StoreError(f"{_redacted(name)}: the URL names no database: postgresql://USER@HOST/NAME")
        driver = scheme.split("+", 1)[1] if "+" in scheme else "psycopg"
        return url.set(drivername=f"postgresql+{driver}")
    raise StoreError(f"{_redacted(name)}: unsupported database URL scheme {scheme!r}; use {SUPPORTED}")


def _redacted(name: str) -> str:
    """A URL as it may be printed: without its password."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", name)


def describe(where: Where) -> str:
    """``where`` as messages name it (a URL without its password)."""
    if not isinstance(where, URL):
        return str(where)
    if where.drivername == "postgresql+psycopg":  # the default driver goes unsaid
        where = where.set(drivername="postgresql")
    return where.render_as_string(hide_password=True)


@contextmanager
def writer_lock(db: Where, wait: bool = True, shared: bool = False) -> Iterator[bool]:
    """Hold the writers' lock of ``db``; yields whether it was acquired.

    Index runs wait for each other (``wait``): two runs interleaving their
    commits would each save a FAISS index missing the other's changes, under a
    generation that looks current. A reader asks without waiting, to know
    whether it may write the FAISS file.

    A file's lock is a lock file beside it, whose holder writes its process id
    and start time in it, so a waiting run can say whom it waits for; without
    fcntl (not POSIX) there is no lock and the caller is trusted. A server's
    is an advisory lock in the database, which index runs (``shared``) hold
    together, every other writer alone; a reader needs none (its FAISS file
    is its own, in its cache).
    """
    if isinstance(db, URL):
        if not wait:
            yield True
            return
        with _server_lock(db, shared) as held:
            yield held
        return
    with _file_lock(db, wait) as held:
        yield held


@contextmanager
def _file_lock(db: Path, wait: bool, what: str | None = None) -> Iterator[bool]:
    try:
        import fcntl
    except ImportError:
        yield True
        return
    lock_path = db.with_name(db.name + ".lock")
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+")
    except OSError as exc:
        if not wait:
            yield False
            return
        what = what or ("write to this folder" if db.exists() else "create the database here")
        raise StoreError(f"{db}: cannot {what}: {exc.strerror or exc}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            log.warning("waiting for %s on %s to finish", lock_holder(db) or "another lookalike process", db)
            fcntl.flock(handle, fcntl.LOCK_EX)
        if wait:  # the holder is an index run, not a reader checking in passing
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()} {socket.gethostname()} {now().isoformat(timespec='seconds')}\n")
            handle.flush()
        try:
            yield True
        finally:
            if wait:
                handle.seek(0)
                handle.truncate()
                handle.flush()


@contextmanager
def _server_lock(url: URL, shared: bool) -> Iterator[bool]:
    """The writers' advisory lock, on a connection of its own: the server lets it go
    when the connection ends, so a killed writer never leaves it held."""
    engine = _server_engine(url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            suffix = "_shared" if shared else ""
            if not conn.execute(text(f"SELECT pg_try_advisory_lock{suffix}({WRITERS_KEY})")).scalar():
                log.warning("waiting for %s on %s to finish",
                            lock_holder(url) or "another lookalike writer", describe(url))
                conn.execute(text(f"SELECT pg_advisory_lock{suffix}({WRITERS_KEY})"))
            try:
                yield True
            except BaseException:
                # The writer's own error is the one to report: drop the connection (the server
                # lets the lock go with it) rather than unlock on it, which may fail too (the
                # failure may be the connection's) and would replace that error.
                conn.invalidate()
                raise
            conn.execute(text(f"SELECT pg_advisory_unlock{suffix}({WRITERS_KEY})"))
    except DBAPIError as exc:  # connection failures, of any driver
        raise StoreError(f"{describe(url)}: {first_line(exc)}") from None
    finally:
        engine.dispose()


def lock_holder(db: Where) -> str | None:
    """'index run pid N on HOST since TIME (UTC)' for the run holding ``db``'s lock, if it says."""
    if isinstance(db, URL):
        return _server_holder(db)
    try:
        pid, host, since = db.with_name(db.name + ".lock").read_text().split()[:3]
    except (OSError, ValueError):
        return None
    return f"index run pid {pid} on {host} since {since.replace('T', ' ')} UTC"


def _server_holder(url: URL) -> str | None:
    """Who holds the writers' advisory lock, by the application name each writer gives."""
    engine = _server_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT a.application_name, a.backend_start FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
                "AND l.granted AND l.objid = :key"), {"key": WRITERS_KEY}).all()
    except Exception:  # noqa: BLE001 - only a nicer message is lost
        return None
    finally:
        engine.dispose()
    names = sorted({r[0] for r in rows if r[0]})
    return " and ".join(names) or None


def _server_engine(url: URL):
    """An engine for a PostgreSQL URL; each connection names this process (lock_holder)."""
    try:
        return create_engine(url, pool_pre_ping=True, connect_args={
            "application_name": f"lookalike pid {os.getpid()} on {socket.gethostname()}"[:63],
            "connect_timeout": 10})
    except ImportError:
        raise StoreError(f"{describe(url)}: PostgreSQL needs its driver: "
                         "pip install 'lookalike[postgres]'") from None


def _alembic_config(connection):
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["connection"] = connection
    return cfg


def migrate(engine, db: str, create: bool = True, upgrade: bool = True) -> None:
    """Bring the schema to head in-process; refuse a schema newer than this code.

    With ``create`` false, a file holding no lookalike schema is refused
    rather than turned into a database; with ``upgrade`` false (read-only),
    so is an older schema.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # two first opens: one creates, one waits
            conn.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATIONS_KEY})"))
        cfg = _alembic_config(conn)
        script = ScriptDirectory.from_config(cfg)
        current = MigrationContext.configure(conn).get_current_heads()
        known = {rev.revision for rev in script.walk_revisions()}
        unknown = [rev for rev in current if rev not in known]
        if unknown:
            raise StoreError(
                f"{db}: schema revision {unknown[0]} is newer than this lookalike; upgrade lookalike"
            )
        if not current and not create:
            raise StoreError(f"{db}: not a lookalike database; run 'lookalike index' to make one")
        if set(current) != set(script.get_heads()):
            if not upgrade:
                raise StoreError(f"{db}: the database needs upgrading, but it is read-only here; "
                                 "run any lookalike command where it is writable")
            log.info("migrating %s from %s to %s", db, current or "empty", script.get_heads())
            command.upgrade(cfg, "head")


class Store:
    """Open (creating or upgrading) a lookalike database: a file, or a PostgreSQL server.

    With ``create`` false (a reader), a database in a folder this process may
    not write to is opened read-only: SQLite's WAL mode would otherwise need
    to create its shared-memory file beside it.

    ``path`` is where the files that go with the database live: the database
    file itself, or for a server a name in the user's cache, unique to that
    database, beside which each machine keeps its own FAISS file. ``name`` is
    how messages name the database.
    """

    def __init__(self, db: str | os.PathLike | URL | None = None, *, create: bool = True):
        self.where = resolve_db(db)
        self.name = describe(self.where)
        self.is_server = isinstance(self.where, URL)
        if self.is_server:
            self.read_only = False
            self.engine = _server_engine(self.where)
        else:
            self.path = self.where.absolute()
            self.name = str(self.path)
            self._open_file(create)
        try:
            migrate(self.engine, self.name, create, upgrade=not self.read_only)
            if self.is_server:
                self.path = self._cache_path()
        except StoreError:
            self.engine.dispose()
            raise
        except Exception as exc:  # noqa: BLE001 - sqlite3.DatabaseError, a server's errors
            self.engine.dispose()
            if self.is_server and isinstance(exc, DBAPIError):
                raise StoreError(f"{self.name}: {first_line(exc)}") from None
            raise StoreError(f"{self.name}: not a usable lookalike database ({first_line(exc)})") from None

    def _open_file(self, create: bool) -> None:
        try:
            self._check_path(create)
        except OSError as exc:
            raise StoreError(f"{self.path}: {exc.strerror or exc}") from None
        self.read_only = not _writable(self.path)
        if self.read_only and create:
            what = "file" if os.access(self.path.parent, os.W_OK | os.X_OK) else "folder"
            raise StoreError(f"{self.path}: cannot write to the database: its {what} is read-only")
        if self.read_only:
            log.info("%s: the folder is not writable; opening the database read-only", self.path)
            self.engine = _read_only_engine(self.path)
        else:
            self.engine = create_engine(URL.create("sqlite", database=str(self.path)))
            event.listen(self.engine, "connect", _sqlite_pragmas)
        _explicit_transactions(self.engine)

    def _check_path(self, create: bool) -> None:
        if not self.path.exists():
            if not create:
                raise StoreError(f"{self.path}: no such database; run 'lookalike index' first")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{self.path}: cannot create folder: {exc.strerror}") from None
        elif self.path.is_dir():
            raise StoreError(f"{self.path}: is a folder, not a database file")
        elif not create and self.path.stat().st_size == 0:
            raise StoreError(f"{self.path}: not a lookalike database (an empty file)")

    def _cache_path(self) -> Path:
        """This server database's name in the user's cache: its host, name and an id kept in
        it (a database dropped and made again under the same name is another one)."""
        from .encoder import cache_dir

        with self.engine.begin() as conn:
            conn.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATIONS_KEY})"))
            ident = conn.execute(select(Setting.value).where(Setting.key == "database_id")).scalar()
            if ident is None:
                ident = uuid.uuid4().hex
                conn.execute(Setting.__table__.insert().values(key="database_id", value=ident))
        url = self.where
        label = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{url.database}@{url.host or 'local'}-{url.port or 5432}")
        folder = cache_dir() / "databases"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as exc:
            # A cache that cannot be written must not stop a query (nor a run): as for the
            # model cache, this process keeps the FAISS file in a temporary folder of its own.
            log.warning("cannot write the cache in %s (%s); keeping the vector index of %s in a "
                        "temporary folder", folder, exc.strerror or exc, self.name)
            folder = _temporary_cache()
        return folder / f"{label}-{ident[:12]}"

    def close(self) -> None:
        self.engine.dispose()

    def bytes(self) -> int:
        """The database's size on disk: its file's, or what the server says it takes."""
        if not self.is_server:
            return self.path.stat().st_size
        with self.engine.connect() as conn:
            return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar())

    def session(self, write: bool = False) -> Session:
        """A session; with ``write``, on a server each of its transactions first waits for
        the other writers' to end, so that commits of runs at once never interleave
        (SQLite's writers are one at a time already)."""
        s = Session(self.engine, expire_on_commit=False)
        if write and self.is_server:
            event.listen(s, "after_begin", _take_commits_lock)
        return s

    def local_files_lock(self):
        """Held while writing the files beside the database: for a server, by the processes
        of this machine, which may write them at once (a file's writers hold writer_lock)."""
        if not self.is_server:
            from contextlib import nullcontext

            return nullcontext(True)
        return _file_lock(self.path, wait=True, what=f"write its FAISS file in {self.path.parent}")

    # -- settings ---------------------------------------------------------
    def get_setting(self, session: Session, key: str) -> str | None:
        row = session.get(Setting, key)
        return row.value if row else None

    def set_setting(self, session: Session, key: str, value: str) -> None:
        row = session.get(Setting, key)
        if row:
            row.value = value
        else:
            session.add(Setting(key=key, value=value))

    def recipe(self, key: str = "recipe") -> Recipe | None:
        """The database's recipe, or another one kept under setting ``key`` (indexer.retune's)."""
        with self.session() as s:
            text = self.get_setting(s, key)
        return Recipe.from_json(text) if text else None

    def whitening(self):
        """The whitening learned from this collection, or None."""
        from .whitening import Whitening

        text = self.whitening_setting()
        return Whitening.from_json(text) if text and text != "none" else None

    def whitening_setting(self) -> str | None:
        """The stored whitening as text: None (never set), "none" (turned off) or its JSON."""
        with self.session() as s:
            return self.get_setting(s, "whitening")

    def set_whitening(self, session: Session, whitening) -> None:
        """Store ``whitening`` (None: turned off, and it stays off); searches reload."""
        self.set_setting(session, "whitening", "none" if whitening is None else whitening.to_json())
        self.bump_generation(session)

    def forget_whitening(self, session: Session) -> None:
        """Back to no whitening ever set: "auto" learns centring again; searches reload."""
        row = session.get(Setting, "whitening")
        if row:
            session.delete(row)
        self.bump_generation(session)

    def generation(self, session: Session | None = None) -> int:
        """A counter bumped by every commit that changes the embeddings."""
        if session is None:
            with self.session() as s:
                return self.generation(s)
        return int(self.get_setting(session, "generation") or 0)

    def bump_generation(self, session: Session) -> int:
        """Move the generation on in ``session``'s transaction; the new value (the one a
        commit makes: on a server, writers' transactions hold the commits lock)."""
        # ``row`` stays referenced, so set_setting's get finds it in the session without a
        # second query (the session keeps no unreferenced row).
        row = session.get(Setting, "generation")
        value = (int(row.value) if row else 0) + 1
        self.set_setting(session, "generation", str(value))
        return value

    # -- reading ----------------------------------------------------------
    def embeddings(self, batch: int = 65536):
        """Yield (ids int64 array, vectors float32 N x dim) for every indexed image, in id
        order, ``batch`` rows at a time (memory bounded by the batch)."""
        dim = self._dim()
        with self.session() as s:
            last = 0
            while True:
                rows = s.execute(
                    select(ImageRow.id, ImageRow.embedding)
                    .where(ImageRow.status == OK, ImageRow.id > last)
                    .order_by(ImageRow.id).limit(batch)
                ).all()
                if not rows:
                    return
                ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                vecs = unpack_vectors((r[1] for r in rows), dim)
                last = int(ids[-1])
                yield ids, vecs

    def _dim(self) -> int:
        recipe = self.recipe()
        if recipe is None:
            raise StoreError(f"{self.name}: the database holds no index yet")
        return recipe.dim

    def vectors_by_id(self, ids) -> dict[int, np.ndarray]:
        """Descriptors (float32) of the indexed images among ``ids``, by id, in chunks that
        stay under SQLite's variable limit."""
        ids = sorted({int(i) for i in ids})
        dim = self._dim() if ids else 0
        out: dict[int, np.ndarray] = {}
        with self.session() as s:
            for start in range(0, len(ids), 900):
                rows = s.execute(select(ImageRow.id, ImageRow.embedding).where(
                    ImageRow.id.in_(ids[start:start + 900]), ImageRow.status == OK)).all()
                out.update(zip((r[0] for r in rows), unpack_vectors((r[1] for r in rows), dim)))
        return out

    def ok_ids(self) -> np.ndarray:
        """Ids of every indexed image, sorted."""
        with self.session() as s:
            rows = s.execute(select(ImageRow.id).where(ImageRow.status == OK).order_by(ImageRow.id))
            return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def ids_under(self, folders) -> np.ndarray:
        """Ids of the images (indexed, or failed: they hold no vector) whose paths lie under
        any of ``folders`` (absolute), sorted; a range scan of the path index per folder,
        which never reads the rows themselves."""
        out: set[int] = set()
        with self.session() as s:
            for folder in folders:
                base = folder.rstrip(os.sep) or os.sep
                prefix = base if base.endswith(os.sep) else base + os.sep
                # Every path that starts with prefix sorts between it and prefix + U+10FFFF.
                q = select(ImageRow.id).where((ImageRow.path == base) | (
                    (ImageRow.path >= prefix) & (ImageRow.path < prefix + "\U0010ffff")))
                out.update(r[0] for r in s.execute(q))
        return np.array(sorted(out), dtype=np.int64)

    def count(self, status: str | None = None) -> int:
        with self.session() as s:
            q = select(func.count(ImageRow.id))
            if status:
                q = q.where(ImageRow.status == status)
            return int(s.execute(q).scalar_one())

    def describe_ids(self, ids) -> dict[int, tuple[str, int, int]]:
        """(path, width, height) by id, of the indexed images among ``ids``."""
        return {i: (r.path, r.width, r.height) for i, r in self.records(ids).items()}

    def records(self, ids) -> dict[int, "ImageRecord"]:
        """The metadata (no descriptor) of the indexed images among ``ids``, by id."""
        ids = sorted({int(i) for i in ids})
        cols = (ImageRow.id, ImageRow.path, ImageRow.width, ImageRow.height, ImageRow.size,
                ImageRow.mtime_ns, ImageRow.sha256, ImageRow.indexed_at)
        out: dict[int, ImageRecord] = {}
        with self.session() as s:
            for start in range(0, len(ids), 900):
                for r in s.execute(select(*cols).where(ImageRow.id.in_(ids[start:start + 900]),
                                                       ImageRow.status == OK)):
                    out[r.id] = ImageRecord(r.id, r.path, r.width or 0, r.height or 0, r.size,
                                            r.mtime_ns, r.sha256, r.indexed_at)
        return out

    def same_bytes(self, ids=None) -> list[list[int]]:
        """Sets of indexed images with identical bytes (same SHA-256), each sorted by id,
        among ``ids`` (None: the whole collection)."""
        keep = None if ids is None else {int(i) for i in ids}
        shared = (select(ImageRow.sha256).where(ImageRow.status == OK, ImageRow.sha256.is_not(None))
                  .group_by(ImageRow.sha256).having(func.count(ImageRow.id) > 1))
        groups: dict[str, list[int]] = {}
        with self.session() as s:
            for r in s.execute(select(ImageRow.id, ImageRow.sha256)
                               .where(ImageRow.status == OK, ImageRow.sha256.in_(shared))
                               .order_by(ImageRow.id)):
                if keep is None or r.id in keep:
                    groups.setdefault(r.sha256, []).append(r.id)
        return [g for g in groups.values() if len(g) > 1]

    def embeddings_at(self, paths) -> dict[str, np.ndarray]:
        """Raw descriptors of the indexed images among ``paths``, by path, in chunks that stay
        under SQLite's variable limit (the rest of the collection is not read)."""
        paths = sorted(set(paths))
        dim = self._dim() if paths else 0
        out: dict[str, np.ndarray] = {}
        with self.session() as s:
            for start in range(0, len(paths), 900):
                for r in s.execute(select(ImageRow.path, ImageRow.embedding)
                                   .where(ImageRow.path.in_(paths[start:start + 900]), ImageRow.status == OK)):
                    out[r.path] = unpack_vector(r.embedding, dim)
        return out

    def id_of(self, path: str) -> int | None:
        """The id of the indexed image at ``path``, or None."""
        with self.session() as s:
            return s.execute(select(ImageRow.id).where(ImageRow.path == path, ImageRow.status == OK)).scalar()

    # -- local features ---------------------------------------------------
    def local_features(self, ids) -> dict[int, bytes]:
        """The stored local features of ``ids`` (those that have them), read in few queries."""
        ids = sorted({int(i) for i in ids})
        out: dict[int, bytes] = {}
        with self.session() as s:
            for start in range(0, len(ids), 900):
                chunk = ids[start:start + 900]
                out.update((r.image_id, r.data) for r in s.execute(
                    select(LocalRow.image_id, LocalRow.data).where(LocalRow.image_id.in_(chunk))))
        return out

    @staticmethod
    def set_local(session: Session, image_id: int, data: bytes | None, new: bool = False) -> None:
        """Store (or with None, drop) the local features of ``image_id`` in ``session``'s
        transaction; ``new``: the image's row was just added (nothing to look up)."""
        if new and data is not None:
            session.add(LocalRow(image_id=image_id, data=data))
            return
        row = session.get(LocalRow, image_id)
        if data is None:
            if row is not None:
                session.delete(row)
        elif row is None:
            session.add(LocalRow(image_id=image_id, data=data))
        else:
            row.data = data

    def local_stats(self) -> tuple[int, int]:
        """(images with local features, their bytes in all)."""
        with self.session() as s:
            n, total = s.execute(select(func.count(LocalRow.image_id),
                                        func.coalesce(func.sum(func.length(LocalRow.data)), 0))).one()
        return int(n), int(total)

    def failures(self) -> list[tuple[str, str]]:
        with self.session() as s:
            return [tuple(r) for r in s.execute(
                select(ImageRow.path, ImageRow.error).where(ImageRow.status == FAILED)
                .order_by(ImageRow.path)).all()]


_TEMPORARY_CACHE: Path | None = None


def _temporary_cache() -> Path:
    """A folder of this process's own for the files of server databases, removed at exit."""
    global _TEMPORARY_CACHE
    if _TEMPORARY_CACHE is None:
        import atexit
        import shutil
        import tempfile

        _TEMPORARY_CACHE = Path(tempfile.mkdtemp(prefix="lookalike-databases-"))
        atexit.register(shutil.rmtree, _TEMPORARY_CACHE, True)
    return _TEMPORARY_CACHE


def _take_commits_lock(_session, _transaction, connection) -> None:
    connection.execute(text(f"SELECT pg_advisory_xact_lock({COMMITS_KEY})"))


def _writable(path: Path) -> bool:
    """Whether SQLite can write ``path`` and create its -wal and -shm files beside it."""
    return os.access(path.parent, os.W_OK | os.X_OK) and (
        not path.exists() or os.access(path, os.W_OK))


def _read_only_engine(path: Path):
    """An engine that never writes: mode=ro when the WAL's -shm file can be used, else
    immutable=1 (SQLite then ignores any -wal file, whose changes would be missing)."""
    from urllib.parse import quote

    uri = "file:" + quote(str(path))
    shm = path.with_name(path.name + "-shm")
    wal = path.with_name(path.name + "-wal")
    try:
        with closing(sqlite3.connect(uri + "?mode=ro", uri=True)) as probe:
            probe.execute("select count(*) from sqlite_master").fetchall()
        mode = "mode=ro"
    except sqlite3.Error:
        mode = "mode=ro&immutable=1"
        if wal.exists() and wal.stat().st_size:
            log.warning("%s: its -wal file holds changes that a read-only open cannot see "
                        "(%s is missing); run 'lookalike index' where the folder is writable",
                        path, shm.name)

    def connect():
        con = sqlite3.connect(f"{uri}?{mode}", uri=True, check_same_thread=False)
        con.execute("PRAGMA busy_timeout=30000")
        return con

    return create_engine("sqlite://", creator=connect)


def _explicit_transactions(engine) -> None:
    """Let SQLAlchemy, not the sqlite3 module, say where transactions begin.

    sqlite3 only opens a transaction before INSERT, UPDATE or DELETE: a
    migration's CREATE TABLE would commit on its own (a kill between two of
    them leaves a database that cannot be opened again), and successive
    SELECTs would each see a different commit of a concurrent index run.
    """
    @event.listens_for(engine, "connect")
    def _no_implicit(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        conn.exec_driver_sql("BEGIN")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # For a new database only (an existing one keeps its pages): three rows of a
    # 2.5 KB float16 descriptor fill an 8 KB page, where a 4 KB page holds one.
    cur.execute("PRAGMA page_size=8192")
    # WAL: readers (queries) never block the indexer, and a killed writer
    # loses only its uncommitted transaction.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    # Local features go with their image's row (ON DELETE CASCADE).
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
