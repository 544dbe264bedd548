#!/usr/bin/env python
"""Fault injection for ``lookalike index``: kill it with SIGKILL at chosen moments, make its
writes fail with real OS errors, and check after every rerun that nothing was lost or corrupted.

Used by tests/test_faults.py (CI-sized) and bench/reliability.py (at scale). Two halves:

The child, ``python tests/fault_harness.py child SPEC_JSON -- index ROOT --db DB ...``,
installs fault points by patching lookalike from the outside (production code has no test
hooks), then runs ``cli.main``. It counts events (EVENTS below) and appends each one to a
trace file; at the Nth occurrence of the chosen event it SIGKILLs itself, or applies a
resource limit so that later writes fail for real:

* ``RLIMIT_FSIZE`` with SIGXFSZ ignored: a write past the limit fails with EFBIG ("File too
  large"), in SQLite (its database file or WAL), in FAISS's writer, anywhere;
* ``RLIMIT_NOFILE`` at 0: files already open stay usable, the next open fails with EMFILE.

The database may be a file or a PostgreSQL server (``--db postgresql://...``): on a server
the database moments (``commit``, ``committed``, ``ddl``, ``local``, ``close``) are counted at
psycopg's connections and cursors instead of sqlite3's, and the FAISS file lives in the user
cache ($LOOKALIKE_CACHE), where ``Harness`` reads it and looks for temp files.

A SPEC is JSON: ``{"kill": {"at": EVENT, "n": N, "how": "now"|"midway"},
"limit": {"kind": "fsize"|"nofile", "at": EVENT, "n": N, "value": N, "relative": bool},
"trace": PATH, "preload": [MODULE, ...]}``. ``midway`` exists for ``faiss-write`` (the
first half of the serialised index is written to the temp file, then the kill) and
``onnx-exported`` (the exported temp graph is cut to half, then the kill). ``relative``
adds the size of the WAL (of the database when there is no WAL) at that moment to
``value``. ``preload`` imports modules first, as a long-lived process would have them.

The parent, ``Harness``: an image folder that is mutated between trials (added, deleted,
modified, renamed, copied and corrupt files), a database, the child runs (plus kills from
outside at random times), and the checks: ``check_partial`` after a faulty run (what is
committed is intact and uncorrupted, a FAISS file that claims to be current is), and
``check_complete`` after the clean rerun (every good image on disk is in the database and the
FAISS file exactly once with a descriptor equal to a fresh computation, every bad one is
recorded as failed, nothing else is there, no temp file is left). Reference descriptors
are computed once per content in the parent with indexer.encoder.Encoder and
indexer.pipeline.embed_files on the recipe the command uses.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]

# Event name -> the moment it marks (in the order a run meets them).
EVENTS = {
    "main": "the harness is installed; cli.main is about to run",
    "ddl": "before a CREATE statement (the migration of a new database)",
    "commit": "before a SQLite COMMIT statement runs (on a server: a psycopg commit of a transaction)",
    "local": "before a row's local features are written (mid-transaction, after the image's row)",
    "committed": "right after a SQLite (or psycopg) commit returned",
    "scanned": "the scan of the roots is complete",
    "hashed": "new and changed files are hashed",
    "onnx-exported": "torch.onnx.export wrote the temp graph (not yet checked nor renamed)",
    "replace:onnx": "before the exported graph is renamed into the cache",
    "replaced:onnx": "after the exported graph is renamed into the cache",
    "batch": "the pipeline gave a batch of descriptors (not yet stored)",
    "save": "vectors.save is called (the FAISS index is about to be written)",
    "trained": "a compressed vector index was trained, before its vectors are added",
    "faiss-write": "faiss.write_index is about to write the temp file",
    "faiss-written": "the temp FAISS file is complete, not yet renamed",
    "replace:faiss": "before the temp FAISS file is renamed into place",
    "replaced:faiss": "after the FAISS file is renamed into place, before its sidecar",
    "replace:meta": "before the .faiss.json sidecar is renamed into place",
    "replaced:meta": "after the .faiss.json sidecar is renamed into place",
    "replace:html": "before a contact sheet (--html) is renamed into place",
    "replaced:html": "after a contact sheet (--html) is renamed into place",
    "close": "before a SQLite connection closes (the last one checkpoints the WAL), or a psycopg one",
}

def is_server_url(db) -> bool:
    """Whether ``db`` (a --db value) names a PostgreSQL server rather than a file."""
    from indexer.store import resolve_db  # late: the child patches lookalike before it loads
    from sqlalchemy.engine import URL

    return db is not None and isinstance(resolve_db(db), URL)


IMAGE_COLUMNS = ("id", "path", "size", "mtime_ns", "sha256", "status", "error", "embedding",
                 "width", "height")


def _read_tables(query, tables: set[str], problems: list[str]):
    """read_db's answer from a database with ``tables``, ``query`` running one SQL statement
    (sqlite3's or SQLAlchemy's: blobs come as bytes, or as memoryviews from psycopg)."""
    if "images" not in tables or "settings" not in tables:
        return {}, 0, None, problems
    rows = {}
    for r in query(f"select {', '.join(IMAGE_COLUMNS)} from images"):
        row = dict(zip(IMAGE_COLUMNS, r), local=None)
        if row["embedding"] is not None:
            row["embedding"] = bytes(row["embedding"])
        rows[row["id"]] = row
    if "local_features" in tables:
        for image_id, data in query("select image_id, data from local_features"):
            if image_id in rows:
                rows[image_id]["local"] = bytes(data)
            else:
                problems.append(f"local features of id {image_id}, which has no row")
    settings = {key: value for key, value in query("select key, value from settings")}
    return rows, int(settings.get("generation", 0)), settings.get("recipe"), problems


SUMMARY_RE = re.compile(
    r"(\d+) added, (\d+) updated, (\d+) moved, (\d+) removed, (\d+) unchanged, (\d+) failed "
    r"\((\d+) embedded in ([\d.]+)s\)")


# ---------------------------------------------------------------------------------------
# The child: fault points installed from the outside, then the real command line.
# ---------------------------------------------------------------------------------------
class _Faults:
    def __init__(self, spec: dict, args: list[str]):
        self.spec = spec
        self.kill = spec.get("kill") or {}
        self.limit = spec.get("limit") or {}
        self.counts: Counter[str] = Counter()
        # Line-buffered and left open: the process may be killed at any moment.
        self.trace = (open(spec["trace"], "a", buffering=1)  # noqa: SIM115
                      if spec.get("trace") else None)
        db = args[args.index("--db") + 1] if "--db" in args else None
        self.server = bool(db) and is_server_url(db)
        self.db = Path(db).absolute() if db and not self.server else None

    def due(self, name: str, what: dict) -> bool:
        return bool(what) and what.get("at") == name and self.counts[name] == what.get("n", 1)

    def event(self, name: str) -> None:
        """Count ``name``; kill the process or apply a limit if this is the chosen occurrence."""
        self.mark(name)
        if self.due(name, self.limit):
            self.apply_limit()
        if self.due(name, self.kill) and self.kill.get("how", "now") == "now":
            self.die()

    def mark(self, name: str) -> None:
        """Count and trace ``name`` without acting on it."""
        self.counts[name] += 1
        self.note(f"{name} {self.counts[name]} {time.monotonic():.4f}")

    def note(self, line: str) -> None:
        # CLOCK_MONOTONIC is system-wide: the parent reads these times on its own clock.
        if self.trace:
            try:
                self.trace.write(line + "\n")
            except OSError:  # past an injected RLIMIT_FSIZE
                pass

    def midway(self, name: str) -> bool:
        """Whether the next occurrence of ``name`` is the one to cut midway."""
        return (self.kill.get("at") == name and self.kill.get("how") == "midway"
                and self.counts[name] + 1 == self.kill.get("n", 1))

    def die(self) -> None:
        self.note("SIGKILL")
        os.kill(os.getpid(), signal.SIGKILL)

    def apply_limit(self) -> None:
        import resource

        value = int(self.limit.get("value", 0))
        if self.limit["kind"] == "fsize":
            if self.limit.get("relative") and self.db is not None:
                # The WAL is the file a run makes grow (the database itself, if there is none).
                grows = next((p for p in (Path(f"{self.db}-wal"), self.db) if p.exists()), None)
                value += grows.stat().st_size if grows else 0
            resource.setrlimit(resource.RLIMIT_FSIZE, (value, resource.RLIM_INFINITY))
        elif self.limit["kind"] == "nofile":
            # Descriptors already open stay usable; a new one must be below ``value`` (and a
            # lower one closed since may be reused: 0 makes every open fail).
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (value, hard))
        else:
            raise ValueError(f"unknown limit {self.limit}")
        self.note(f"LIMIT {self.limit['kind']} {value}")

    # -- the patches ---------------------------------------------------------------------
    def install(self) -> None:
        self._sqlite()
        if self.server:
            self._psycopg()
        self._os_replace()
        self._indexer()

    def _sqlite(self) -> None:
        faults = self
        real_connect = sqlite3.connect

        def on_statement(sql: str) -> None:
            head = sql.lstrip()[:8].upper()
            if head.startswith("COMMIT"):
                faults.event("commit")
            elif head.startswith("CREATE"):
                faults.event("ddl")
            elif head.startswith(("INSERT", "UPDATE")) and "local_features" in sql[:40]:
                faults.event("local")

        class Connection(sqlite3.Connection):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.set_trace_callback(on_statement)

            def commit(self):
                real = self.in_transaction  # outside a transaction commit() does nothing
                super().commit()
                if real:
                    faults.event("committed")

            def close(self):
                faults.event("close")
                super().close()

        def connect(*a, **k):
            k.setdefault("factory", Connection)
            return real_connect(*a, **k)

        sqlite3.connect = connect
        sqlite3.dbapi2.connect = connect

    def _psycopg(self) -> None:
        """The database moments on a PostgreSQL server: at psycopg's commit, close and the
        statements its cursors run (SQLAlchemy's psycopg dialect goes through these)."""
        import psycopg
        from psycopg import pq

        faults = self
        real_commit, real_close = psycopg.Connection.commit, psycopg.Connection.close
        real_execute, real_executemany = psycopg.Cursor.execute, psycopg.Cursor.executemany

        def on_statement(query, rows: int = 1) -> None:
            sql = (query.decode(errors="replace") if isinstance(query, (bytes, bytearray))
                   else query if isinstance(query, str) else "")
            head = sql.lstrip()[:8].upper()
            if head.startswith("CREATE"):
                faults.event("ddl")
            elif head.startswith(("INSERT", "UPDATE")) and "local_features" in sql[:40]:
                for _ in range(rows):  # one a row, as sqlite3 traces each row of executemany
                    faults.event("local")

        def execute(self, query, *a, **k):
            on_statement(query)
            return real_execute(self, query, *a, **k)

        def executemany(self, query, params_seq, *a, **k):
            params_seq = list(params_seq)
            on_statement(query, len(params_seq))
            return real_executemany(self, query, params_seq, *a, **k)

        def commit(self):
            real = self.info.transaction_status != pq.TransactionStatus.IDLE  # else a no-op
            if real:
                faults.event("commit")
            real_commit(self)
            if real:
                faults.event("committed")

        def close(self):
            if not self.closed:
                faults.event("close")
            real_close(self)

        psycopg.Connection.commit, psycopg.Connection.close = commit, close
        psycopg.Cursor.execute, psycopg.Cursor.executemany = execute, executemany

    def _os_replace(self) -> None:
        faults = self
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            name = os.fspath(dst)
            kind = ("faiss" if name.endswith(".faiss") else "meta" if name.endswith(".faiss.json")
                    else "onnx" if name.endswith(".onnx") else "html" if name.endswith(".html")
                    else "other")
            faults.event(f"replace:{kind}")
            real_replace(src, dst, *a, **k)
            faults.event(f"replaced:{kind}")

        os.replace = replace

    def _indexer(self) -> None:
        faults = self
        from indexer import encoder, pipeline, sync, vectors

        real_scan, real_hash = sync.scan, sync.Indexer._hash
        real_embed_files, real_save, real_export = pipeline.embed_files, vectors.save, encoder._export
        real_train = vectors._train

        def _train(*a, **k):
            real_train(*a, **k)
            faults.event("trained")

        def scan(*a, **k):
            yield from real_scan(*a, **k)
            faults.event("scanned")

        def _hash(self, files):
            out = real_hash(self, files)
            faults.event("hashed")
            return out

        def embed_files(*a, **k):
            for batch in real_embed_files(*a, **k):
                faults.event("batch")
                yield batch

        def save(*a, **k):
            faults._patch_faiss()
            faults.event("save")
            return real_save(*a, **k)

        def _export(recipe, weights_file, path):
            faults._patch_torch_onnx()
            return real_export(recipe, weights_file, path)

        sync.scan, sync.Indexer._hash = scan, _hash
        pipeline.embed_files, vectors.save, encoder._export = embed_files, save, _export
        vectors._train = _train

    def _patch_faiss(self) -> None:
        import faiss

        if getattr(faiss.write_index, "_fault", False):
            return
        faults, real_write = self, faiss.write_index

        def write_index(index, path, *a):
            if faults.midway("faiss-write"):
                writer = faiss.VectorIOWriter()
                real_write(index, writer)
                data = faiss.vector_to_array(writer.data).tobytes()
                with open(path, "wb") as f:
                    f.write(data[:len(data) // 2])
                faults.mark("faiss-write")
                faults.die()
            faults.event("faiss-write")
            real_write(index, path, *a)
            faults.event("faiss-written")

        write_index._fault = True
        faiss.write_index = write_index

    def _patch_torch_onnx(self) -> None:
        import torch.onnx

        faults, real = self, torch.onnx.export

        def export(model, args, f, *a, **k):
            out = real(model, args, f, *a, **k)
            if faults.midway("onnx-exported"):
                size = os.path.getsize(f)
                os.truncate(f, size // 2)
                faults.mark("onnx-exported")
                faults.die()
            faults.event("onnx-exported")
            return out

        torch.onnx.export = export


def child_main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] != "--":
        sys.exit("usage: fault_harness.py child SPEC_JSON -- index ROOT --db DB ...")
    spec, args = json.loads(argv[0]), argv[2:]
    # A write past RLIMIT_FSIZE then fails with EFBIG instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    faults = _Faults(spec, args)
    for module in spec.get("preload", ()):  # as in a long-lived process that uses them already
        __import__(module)
    faults.install()
    faults.event("main")
    import cli

    cli.main(args, prog_name="lookalike")


# ---------------------------------------------------------------------------------------
# The parent: an image folder, a database, runs, checks.
# ---------------------------------------------------------------------------------------
def _descriptor(blob: bytes | None):
    """A stored descriptor as float32 (float16 in the database; float32 before)."""
    import numpy as np

    blob = blob or b""
    return np.frombuffer(blob, "<f2" if len(blob) == 2 * 1280 else "<f4").astype(np.float32)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Library:
    """An image folder that changes between trials; every content ever written is kept by
    hash, so a descriptor in the database can be checked against a fresh computation."""

    def __init__(self, root: Path, seed: int):
        self.root = Path(root)
        self.rng = random.Random(seed)
        self._next = 1_000_000 + seed * 10_000
        self.blobs: dict[str, tuple[bytes, str]] = {}

    def _seed(self) -> int:
        self._next += 1
        return self._next

    def photo(self, fmt: str | None = None, portrait: bool | None = None) -> bytes:
        from conftest import make_photo

        fmt = fmt or self.rng.choice(["JPEG", "JPEG", "JPEG", "PNG"])
        if portrait is None:
            portrait = self.rng.random() < 0.15
        img = make_photo(self._seed(), (64, 96) if portrait else (96, 64))
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        return buf.getvalue()

    def corrupt(self) -> bytes:
        kind = self.rng.choice(["truncated", "text", "empty", "header"])
        if kind == "truncated":
            data = self.photo("JPEG", False)
            return data[:len(data) // 3]
        if kind == "text":
            return f"not an image {self._seed()}\n".encode()
        if kind == "header":
            from conftest import png_header

            return png_header(96 + self._seed() % 7, 64)
        return b""

    def write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.blobs[sha256(data)] = (data, path.suffix)

    def files(self) -> dict[str, str]:
        """{absolute path: sha256} of every file under the root."""
        out = {}
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                p = os.path.join(dirpath, name)
                with open(p, "rb") as f:
                    out[p] = sha256(f.read())
        return out

    def _name(self, fmt_data: bytes | None = None, suffix: str | None = None) -> Path:
        folder = self.rng.choice(["", "a", "a/b", "c"])
        if suffix is None:
            suffix = ".png" if fmt_data and fmt_data[:4] == b"\x89PNG" else ".jpg"
        return self.root / folder / f"f{self._seed()}{suffix}"

    def add(self, n: int = 1, corrupt: bool = False) -> None:
        for _ in range(n):
            data = self.corrupt() if corrupt else self.photo()
            suffix = self.rng.choice([".jpg", ".png"]) if corrupt else None
            self.write(self._name(data, suffix), data)

    def mutate(self, add: int = 3, modify: int = 2, delete: int = 1, rename: int = 1,
               copy: int = 0, corrupt: int = 0, fix: int = 0) -> str:
        """Change the folder; returns what was done, for the trial's record."""
        files = sorted(self.files())
        good = [p for p in files if self._is_photo(p)]
        current = set(files)
        bad = [p for p in files if p not in good]
        done = Counter()
        for p in self.rng.sample(bad, min(fix, len(bad))):
            self.write(Path(p), self.photo(fmt="PNG" if p.endswith(".png") else "JPEG"))
            done["fixed"] += 1
        for p in self.rng.sample(good, min(modify, len(good))):
            self.write(Path(p), self.photo(fmt="PNG" if p.endswith(".png") else "JPEG"))
            done["modified"] += 1
        for p in self.rng.sample(good, min(delete, max(0, len(good) - 4))):
            os.remove(p)
            current.discard(p)
            done["deleted"] += 1
        rest = [p for p in good if p in current]
        for p in self.rng.sample(rest, min(rename, len(rest))):
            dst = self._name(suffix=Path(p).suffix)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(p, dst)
            current.discard(p)
            current.add(str(dst))
            done["renamed"] += 1
        rest = sorted(p for p in current if self._is_photo(p))
        for p in self.rng.sample(rest, min(copy, len(rest))):
            shutil.copyfile(p, self._name(suffix=Path(p).suffix))
            done["copied"] += 1
        self.add(add)
        done["added"] += add
        self.add(corrupt, corrupt=True)
        done["corrupt"] += corrupt
        return ", ".join(f"{v} {k}" for k, v in done.items() if v)

    def _is_photo(self, path: str) -> bool:
        with open(path, "rb") as f:
            head = f.read(8)
        return head[:3] == b"\xff\xd8\xff" or (
            head[:4] == b"\x89PNG" and os.path.getsize(path) > 200)  # png_header() stubs are tiny


class References:
    """Descriptors computed afresh, once per content, with the real encoder."""

    def __init__(self, library: Library, image_size: int, scratch: Path):
        self.library, self.image_size, self.scratch = library, image_size, scratch
        self.known: dict[str, tuple] = {}  # sha -> (vector or None, error or None, local features)
        self._encoder = None
        self.recipe_json = None

    def encoder(self):
        if self._encoder is None:
            from indexer.backbone import DEFAULT_MODEL, resolve_weights
            from indexer.encoder import Encoder
            from indexer.recipe import make_recipe

            recipe = make_recipe(DEFAULT_MODEL, image_size=self.image_size,
                                 weights_sha256=resolve_weights(DEFAULT_MODEL, None)[1])
            self.recipe_json = recipe.to_json()
            self._encoder = Encoder(recipe, None, "cpu")
        return self._encoder

    def get(self, shas) -> dict[str, tuple]:
        todo = sorted({s for s in shas if s not in self.known and s in self.library.blobs})
        if todo:
            from indexer.pipeline import embed_files

            self.scratch.mkdir(parents=True, exist_ok=True)
            paths = []
            for sha in todo:
                data, suffix = self.library.blobs[sha]
                p = self.scratch / f"{sha}{suffix}"
                p.write_bytes(data)
                paths.append(str(p))
            for batch in embed_files(paths, self.encoder(), batch_size=8, workers=0):
                for r in batch:
                    self.known[todo[r.index]] = (r.vector, r.error, r.local)
            for p in paths:
                os.remove(p)
        return {s: self.known.get(s, (None, "unknown content", None)) for s in shas}


@dataclass
class Run:
    """One child run."""

    rc: int
    stdout: str
    stderr: str
    events: Counter
    killed: bool
    limited: bool
    seconds: float  # from the child's 'main' event to its exit
    last_event: str = ""

    @property
    def summary(self):
        m = SUMMARY_RE.search(self.stderr)
        return tuple(int(x) for x in m.groups()[:7]) if m else None


@dataclass
class Outcome:
    """One trial: a faulty run (or several), the clean rerun, and what the checks found."""

    name: str
    fault: str
    killed: bool = False
    hit: bool = False        # killed, or the injected I/O failure made the run fail
    where: str = ""          # the event where it died, or the error line (shortened)
    error: str = ""          # the error line of a run that failed on its own
    fault_rc: int | None = None
    rerun_rc: int | None = None
    expected: int = 0        # good images on disk
    failed_files: int = 0    # bad files on disk
    in_db: int = 0
    in_faiss: int = 0
    lost: int = 0
    issues: list[str] = field(default_factory=list)
    mutation: str = ""
    seconds: float = 0.0

    @property
    def survived(self) -> bool:
        return not self.issues and not self.lost

    def row(self) -> str:
        return (f"| {self.name} | {'yes' if self.killed else 'no'} | {self.where} | {self.rerun_rc} | "
                f"{self.expected}/{self.in_db}/{self.in_faiss} | {self.lost} | "
                f"{'; '.join(self.issues) or '-'} |")


TABLE_HEAD = ("| trial | killed | where | rerun exit | images expected/in db/in faiss | lost | "
              "inconsistencies |\n|---|---|---|---|---|---|---|")


class Harness:
    """A library, a database and the runs of ``lookalike index`` on them.

    With ``server`` (a PostgreSQL URL whose role may create databases), each database is a
    new one on that server (``db`` is its URL), dropped by ``close``; otherwise a file."""

    def __init__(self, work: Path, *, seed: int = 0, images: int = 24, image_size: int = 128,
                 batch_size: int = 4, workers: int = 0, cache: str | None = None,
                 server: str | None = None):
        self.work = Path(work)
        self.server = server
        self._made: list[str] = []  # databases made on the server, dropped by close()
        self._stems: dict[str, Path] = {}  # server database -> its files' stem in the cache
        self.work.mkdir(parents=True, exist_ok=True)
        self.library = Library(self.work / "photos", seed)
        self.rng = random.Random(seed + 7)
        self.image_size, self.batch_size, self.workers = image_size, batch_size, workers
        self.cache = cache or os.environ.get("LOOKALIKE_CACHE")
        self.refs = References(self.library, image_size, self.work / "scratch")
        self.images = images
        self.labelled: Path | None = None  # the labelled set of "tune" runs
        self.parquet: Path | None = None  # the file of "import" runs
        self.sheet = self.work / "groups.html"  # the contact sheet of "duplicates" runs
        self._dbs = 0
        self.db = self.fresh_db()
        self._runs = 0
        self.work_seconds = 2.0  # how long a run with work takes, from 'main' to exit
        self._recent: deque = deque(maxlen=6)  # events of the last runs that were not killed
        self.verified: dict[str, tuple[int, str, str]] = {}  # path -> (id, sha, status) last checked
        self.library.add(images - 2)
        self.library.add(2, corrupt=True)

    def fresh_db(self) -> Path | str:
        self._dbs += 1
        if self.server:
            from conftest import new_pg_database

            name, self.db = new_pg_database(self.server)
            self._made.append(name)
        else:
            self.db = self.work / f"db{self._dbs}" / "index.db"
        self.verified = {}
        return self.db

    def close(self) -> None:
        """Drop the databases made on the server (files are left to the work folder)."""
        while self._made:
            from conftest import drop_pg_database

            drop_pg_database(self.server, self._made.pop())

    @property
    def event_max(self) -> Counter:
        """The most of each event one of the last few runs met (to draw a kill point from)."""
        out: Counter = Counter()
        for events in self._recent:
            out |= events
        return out

    # -- runs --------------------------------------------------------------------------
    def command(self, spec: dict, extra: list[str] = (), verb: str = "index") -> list[str]:
        if verb == "tune":  # self.labelled: a folder with groundtruth.csv
            return [sys.executable, str(HERE), "child", json.dumps(spec), "--", "tune",
                    str(self.labelled), "--db", str(self.db), "--workers", str(self.workers), *extra]
        if verb == "import":  # self.parquet: a file 'lookalike export' wrote
            return [sys.executable, str(HERE), "child", json.dumps(spec), "--", "import",
                    str(self.parquet), "--db", str(self.db), *extra]
        if verb == "duplicates":  # a contact sheet of the groups, to self.sheet
            return [sys.executable, str(HERE), "child", json.dumps(spec), "--", "duplicates",
                    "--db", str(self.db), "--html", str(self.sheet), *extra]
        if verb == "repair":
            return [sys.executable, str(HERE), "child", json.dumps(spec), "--", "check",
                    "--db", str(self.db), "--repair", *extra]
        return [sys.executable, str(HERE), "child", json.dumps(spec), "--", "index",
                str(self.library.root), "--db", str(self.db), "--workers", str(self.workers),
                "--batch-size", str(self.batch_size), "--image-size", str(self.image_size),
                *extra]

    def run(self, spec: dict | None = None, kill_after: float | None = None,
            cache: str | None = None, timeout: float = 300, verb: str = "index",
            extra: list[str] = ()) -> Run:
        """Run the child once (``verb`` "index", "repair": ``check --repair``, "tune":
        ``tune self.labelled``, "import", or "duplicates": ``duplicates --html self.sheet``); ``kill_after``
        seconds after its 'main' event, SIGKILL it."""
        self._runs += 1
        trace = self.work / "traces" / f"run{self._runs}.txt"
        trace.parent.mkdir(exist_ok=True)
        spec = dict(spec or {}, trace=str(trace))
        env = dict(os.environ)
        if cache or self.cache:
            env["LOOKALIKE_CACHE"] = cache or self.cache
        # Pipes, not files: RLIMIT_FSIZE must not silence the child's stderr.
        proc = subprocess.Popen(self.command(spec, extra, verb=verb), cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started = time.monotonic()
        if kill_after is not None:
            while proc.poll() is None and not (trace.exists() and trace.stat().st_size):
                time.sleep(0.002)
                if time.monotonic() - started > timeout:
                    break
            t_main = time.monotonic()
            while proc.poll() is None and time.monotonic() - t_main < kill_after:
                time.sleep(min(0.002, max(0.0, kill_after - (time.monotonic() - t_main))))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        rc = proc.returncode
        ended = time.monotonic()
        events: Counter = Counter()
        last, t_main, limited = "", None, False
        for line in trace.read_text().splitlines() if trace.exists() else []:
            parts = line.split()
            if parts[0] == "LIMIT":
                limited = True
                continue
            if parts[0] == "SIGKILL":
                continue
            events[parts[0]] = int(parts[1])
            last = f"{parts[0]}#{parts[1]}"
            if parts[0] == "main":
                t_main = float(parts[2])
        trace.with_suffix(".err").write_bytes(stderr)
        run = Run(rc=rc, stdout=stdout.decode(errors="replace"), stderr=stderr.decode(errors="replace"),
                  events=events, killed=rc == -signal.SIGKILL, limited=limited,
                  seconds=ended - (t_main if t_main is not None else started), last_event=last)
        if not run.killed:
            self._recent.append(events)
        s = run.summary
        if rc == 0 and s and s[6] > 0:  # a run with work: keep the timed kills spread over one
            self.work_seconds = 0.7 * self.work_seconds + 0.3 * run.seconds
        return run

    # -- state on disk -----------------------------------------------------------------
    def read_db(self):
        """(rows {id: dict}, generation, recipe json, problems) without disturbing the WAL."""
        if is_server_url(self.db):
            return self._read_server_db()
        problems = []
        if not self.db.exists():
            return {}, 0, None, problems
        try:
            con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        except sqlite3.Error as exc:
            return {}, 0, None, [f"database cannot be opened: {exc}"]
        try:
            check = con.execute("pragma integrity_check").fetchall()
            if check != [("ok",)]:
                problems.append(f"integrity_check: {check[:3]}")
            tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
            return _read_tables(con.execute, tables, problems)
        except sqlite3.Error as exc:
            return {}, 0, None, problems + [f"database cannot be read: {exc}"]
        finally:
            con.close()

    def _read_server_db(self):
        """read_db of a server database, in one snapshot (its pages are the server's to keep
        whole: there is no integrity check to run)."""
        from sqlalchemy import create_engine, inspect, text
        from sqlalchemy.exc import DBAPIError

        from indexer.store import resolve_db

        problems: list[str] = []
        engine = create_engine(resolve_db(self.db))
        try:
            with engine.connect().execution_options(isolation_level="REPEATABLE READ") as con:
                tables = set(inspect(con).get_table_names())
                return _read_tables(lambda query: con.execute(text(query)), tables, problems)
        except DBAPIError as exc:
            return {}, 0, None, problems + [f"database cannot be read: {exc}".splitlines()[0]]
        finally:
            engine.dispose()

    def files_stem(self) -> Path | None:
        """The path beside which the database's FAISS file, its sidecar and their temp files
        lie: the database file itself, or for a server its name in the user cache (None while
        the server database has none: no run has got that far)."""
        if not is_server_url(self.db):
            return self.db
        if self.db not in self._stems:
            from conftest import sql

            try:
                known = sql(self.db, "select value from settings where key = 'database_id'")
            except Exception:  # noqa: BLE001 - no settings table yet: a new database
                return None
            if not known:  # no run got past the migration; opening it now would give it one
                return None
            from indexer.store import Store

            store = Store(self.db, create=False)
            try:
                self._stems[self.db] = store.path
            finally:
                store.close()
        return self._stems[self.db]

    def read_faiss(self):
        """(ids, vectors, meta, problem) of the vector index on disk, read through
        indexer.vectors; ids None when there is no FAISS file, vectors None when the
        index is compressed (its vectors are codes). ``self.space`` then maps stored
        descriptors to what the index should hold."""
        from indexer import vectors
        from indexer.store import Store, StoreError

        stem = self.files_stem()
        if stem is None:
            return None, None, None, None
        path = stem.with_name(stem.name + ".faiss")
        meta_path = stem.with_name(stem.name + ".faiss.json")
        meta = None
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError as exc:
                return None, None, None, f"torn FAISS sidecar: {exc}"
        if not path.exists():
            return None, None, meta, None
        try:
            store = Store(self.db, create=False)
        except StoreError as exc:
            return None, None, meta, f"database cannot be opened: {exc}"
        try:
            index, _, why = vectors.read(store)
            if index is None:
                return None, None, meta, f"torn FAISS file: {why}"
            ids = index.ids()
            self.space = index.space
            return ids, index.vectors(ids) if index.layout.exact else None, meta, None
        finally:
            store.close()

    def temp_files(self) -> list[str]:
        stem = self.files_stem()
        return [] if stem is None else sorted(p.name for p in stem.parent.glob(f".{stem.name}*.tmp"))

    # -- checks ------------------------------------------------------------------------
    def _common(self, rows, generation) -> list[str]:
        """Checks that hold at every moment: committed rows are uncorrupted, a FAISS file is
        never torn, and one that claims to be current is current."""
        import numpy as np

        issues = []
        paths = Counter(r["path"] for r in rows.values())
        dups = [p for p, n in paths.items() if n > 1]
        if dups:
            issues.append(f"duplicate paths in db: {dups[:3]}")
        refs = self.refs.get([r["sha256"] for r in rows.values() if r["sha256"]])
        for r in rows.values():
            if r["status"] == "ok":
                vec, err, local = refs.get(r["sha256"], (None, "no sha256", None))
                got = _descriptor(r["embedding"])
                if vec is None:
                    issues.append(f"id {r['id']} ok but its content does not decode ({err})")
                elif got.shape != vec.shape or not np.allclose(got, vec, atol=1e-4):
                    issues.append(f"id {r['id']} {os.path.basename(r['path'])}: stored descriptor "
                                  "differs from a fresh computation")
                elif r["local"] != local:  # written with the row, in its transaction
                    issues.append(f"id {r['id']} {os.path.basename(r['path'])}: local features "
                                  + ("missing" if r["local"] is None else "differ from a fresh extraction"))
            elif r["status"] == "failed":
                if not r["error"]:
                    issues.append(f"id {r['id']} failed without a reason")
                if r["local"] is not None:
                    issues.append(f"id {r['id']} failed but keeps local features")
                if r["sha256"] and refs.get(r["sha256"], (None, None))[0] is not None:
                    issues.append(f"id {r['id']} {os.path.basename(r['path'])} recorded as failed "
                                  "but decodes")
            else:
                issues.append(f"id {r['id']} has status {r['status']!r}")
        ids, vecs, meta, problem = self.read_faiss()
        if problem:
            issues.append(problem)
        ok = {i: r for i, r in rows.items() if r["status"] == "ok"}
        if ids is not None:
            if len(set(ids.tolist())) != len(ids):
                issues.append("duplicate ids in FAISS")
            claims_current = bool(meta) and meta.get("generation") == generation and meta.get(
                "count") == len(ok)
            if claims_current:
                issues += [f"FAISS claims generation {generation} but {x}"
                           for x in self._faiss_vs_db(ids, vecs, ok)]
        return issues

    def _faiss_vs_db(self, ids, vecs, ok) -> list[str]:
        out = []
        got = set(ids.tolist())
        if got != set(ok):
            out.append(f"FAISS ids differ from db ids ({len(got - set(ok))} extra, "
                       f"{len(set(ok) - got)} missing)")
        for i, rid in enumerate(ids.tolist()):
            if vecs is not None and rid in ok and not self._holds(vecs[i], ok[rid]["embedding"]):
                out.append(f"FAISS vector of id {rid} differs from the db's")
                break
        return out

    def _holds(self, held, blob) -> bool:
        """Whether ``held`` (a vector of the index) is the stored descriptor ``blob`` as the
        index should hold it (whitened; in a batch the BLAS may round differently)."""
        import numpy as np

        want = self.space(_descriptor(blob))[0]
        return held.shape == want.shape and np.allclose(held, want, atol=1e-6)

    def check_partial(self, before: dict, files_now: dict[str, str]) -> list[str]:
        """After a faulty run: the committed state is intact (no row of a file left untouched
        since the last check is lost or changed) and nothing committed is corrupt."""
        rows, generation, _, issues = self.read_db()
        issues += self._common(rows, generation)
        by_path = {r["path"]: r for r in rows.values()}
        for path, (rid, sha, status) in before.items():
            if files_now.get(path) != sha:
                continue  # changed or gone on disk: the run may rightly change the row
            r = by_path.get(path)
            if r is None:
                issues.append(f"row of untouched {os.path.basename(path)} lost")
            elif (r["id"], r["sha256"], r["status"]) != (rid, sha, status):
                issues.append(f"row of untouched {os.path.basename(path)} changed")
        return issues

    def check_complete(self, out: Outcome, rerun: Run) -> None:
        """After a clean rerun: the database and the FAISS file hold exactly the folder."""
        import numpy as np

        issues = out.issues
        files = self.library.files()
        rows, generation, recipe, problems = self.read_db()
        issues += problems
        issues += self._common(rows, generation)
        refs = self.refs.get(files.values())
        if recipe and self.refs.recipe_json and json.loads(recipe) != json.loads(self.refs.recipe_json):
            issues.append("recipe in the db differs from the reference recipe")
        by_path = {r["path"]: r for r in rows.values()}
        under = {p: r for p, r in by_path.items() if p.startswith(str(self.library.root) + os.sep)}
        good = {p for p, sha in files.items() if refs[sha][0] is not None}
        out.expected, out.failed_files = len(good), len(files) - len(good)
        ids, vecs, meta, _ = self.read_faiss()
        faiss_vec = {} if ids is None else {int(i): None if vecs is None else vecs[k] for k, i in enumerate(ids)}
        out.in_db = sum(1 for r in under.values() if r["status"] == "ok")
        out.in_faiss = 0 if ids is None else len(ids)
        lost = 0
        for p, sha in files.items():
            r = under.get(p)
            vec, err, _ = refs[sha]
            name = os.path.relpath(p, self.library.root)
            st = os.stat(p)
            if r is None:
                issues.append(f"{name} not in db")
                lost += vec is not None
                continue
            if r["sha256"] != sha or r["size"] != st.st_size or r["mtime_ns"] != st.st_mtime_ns:
                issues.append(f"{name}: db row is stale (hash, size or mtime differ from the file)")
            if vec is None:
                if r["status"] != "failed":
                    issues.append(f"{name} does not decode ({err}) but is {r['status']}")
                continue
            stored = _descriptor(r["embedding"])
            in_faiss = r["id"] in faiss_vec and (faiss_vec[r["id"]] is None
                                                 or self._holds(faiss_vec[r["id"]], r["embedding"]))
            if r["status"] != "ok" or stored.shape != vec.shape or not np.allclose(stored, vec, atol=1e-4):
                issues.append(f"{name}: {r['status']}, descriptor wrong or missing")
                lost += 1
            elif not in_faiss:
                issues.append(f"{name}: id {r['id']} missing from FAISS or its vector differs")
                lost += 1
        ghosts = sorted(set(under) - set(files))
        if ghosts:
            issues.append(f"{len(ghosts)} db rows for files that are gone: {ghosts[:2]}")
        if ids is None:
            if out.in_db:
                issues.append("no FAISS file after a complete run")
        else:
            issues += self._faiss_vs_db(ids, vecs, {i: r for i, r in rows.items() if r["status"] == "ok"})
            if not meta or meta.get("generation") != generation or meta.get("count") != len(ids):
                issues.append(f"FAISS sidecar {meta} does not match the db generation {generation}")
        leftovers = self.temp_files()
        if leftovers:
            issues.append(f"temp files left next to the db: {leftovers}")
        s = rerun.summary
        if s is None:
            issues.append("rerun printed no summary line")
        else:
            if sum(s[i] for i in (0, 1, 2, 4, 5)) != len(files):
                issues.append(f"summary counts {s[:6]} do not add up to {len(files)} files")
            if s[5] != out.failed_files:
                issues.append(f"summary says {s[5]} failed, {out.failed_files} files are bad")
        out.lost += lost
        self.verified = {r["path"]: (r["id"], r["sha256"], r["status"]) for r in under.values()}

    @staticmethod
    def check_error_output(run: Run) -> list[str]:
        """A run that failed on its own must say why in one line, without a traceback."""
        issues = []
        if "Traceback" in run.stderr:
            issues.append(f"traceback on stderr: {exception_line(run.stderr)}")
        if "a bug in lookalike" in run.stderr:
            issues.append(f"an I/O failure reported as a bug: {exception_line(run.stderr)}")
        errors = [line for line in run.stderr.splitlines() if line.startswith("Error: ")]
        if len(errors) != 1 and "Traceback" not in run.stderr:
            issues.append(f"expected one 'Error: ' line on stderr, got {len(errors)}: {run.stderr[-300:]!r}")
        return issues

    # -- a trial -----------------------------------------------------------------------
    def trial(self, name: str, fault: str, faults: list[dict], *, mutate: dict | None = None,
              fresh_db: bool = False, cache: str | os.PathLike | None = None) -> Outcome:
        """Mutate the folder, run each of ``faults`` in turn (dicts made by ``kill``, ``limit``
        or ``timed``), check after each, then rerun cleanly and check everything.

        ``mutate`` is passed to Library.mutate (default: ``default_mutation()``, some real
        work; ``{}`` for no change). ``fresh_db`` starts a new database first. ``cache`` is an
        ONNX cache folder for these runs (an empty one makes the child export the model),
        checked for leftovers at the end."""
        t0 = time.monotonic()
        out = Outcome(name, fault)
        if fresh_db:
            self.fresh_db()
        out.mutation = self.library.mutate(**(mutate if mutate is not None else self.default_mutation()))
        cache = os.fspath(cache) if cache else None
        for f in faults:
            before = dict(self.verified)
            kill_after = f.get("kill_after")
            if kill_after == "random":  # anywhere in a run with work, startup excluded
                kill_after = self.rng.uniform(0.0, self.work_seconds)
            run = self.run(f.get("spec"), kill_after=kill_after, cache=cache)
            out.fault_rc = run.rc
            if run.killed:
                out.killed = out.hit = True
                out.where = run.last_event
            elif run.rc != 0:
                out.hit = True
                out.error = exception_line(run.stderr, 1000)
                out.where = f"{out.error[:90]} (after {run.last_event})"
                out.issues += self.check_error_output(run)
            elif "Traceback" in run.stderr:
                out.issues.append(f"traceback on stderr of a run that exited 0: {exception_line(run.stderr)}")
            if run.killed and kill_after is not None:
                out.where += f" ({kill_after:.2f} s)"
            if f.get("expect_kill") and not run.killed:
                out.issues.append(f"expected a kill at {f['spec'].get('kill')}, the run exited {run.rc} "
                                  f"(events {dict(run.events)})")
            if f.get("expect_failure") and (run.killed or run.rc == 0):
                out.issues.append(f"expected the I/O failure to fail the run; exit {run.rc}")
            out.issues += [f"after the fault: {x}" for x in self.check_partial(before, self.library.files())]
        rerun = self.run(cache=cache)
        out.rerun_rc = rerun.rc
        if rerun.rc != 0 or "Traceback" in rerun.stderr:
            out.issues.append(f"rerun exit {rerun.rc}: {exception_line(rerun.stderr)}")
        self.check_complete(out, rerun)
        if cache:
            leftovers = sorted(p.name for p in Path(cache).glob(".*.tmp"))
            if leftovers:
                out.issues.append(f"temp files left in the ONNX cache: {leftovers}")
        out.seconds = time.monotonic() - t0
        return out

    def default_mutation(self, work: int = 6) -> dict:
        """About ``work`` images to embed (two batches or more at batch size 4) among other
        changes, the folder kept near its first size."""
        r = self.rng
        n = len(self.library.files())
        modify = r.randint(1, 2)
        add = max(1, work - modify)
        return {"add": add, "modify": modify, "delete": max(r.randint(1, 2), n + add - self.images),
                "rename": r.randint(0, 2), "copy": int(r.random() < 0.3),
                "corrupt": int(r.random() < 0.25), "fix": int(r.random() < 0.2)}

    def baseline(self) -> Outcome:
        """The first clean index of the folder, checked."""
        out = Outcome("baseline", "none")
        run = self.run()
        out.rerun_rc = run.rc
        if run.rc != 0:
            out.issues.append(f"baseline exit {run.rc}: {run.stderr[-300:]}")
        self.refs.encoder()
        self.check_complete(out, run)
        out.seconds = run.seconds
        return out


def exception_line(stderr: str, width: int = 200) -> str:
    """The line that says what went wrong: 'Error: ...', else a traceback's exception."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    pick = [line for line in lines if line.startswith("Error: ")]
    pick = pick or [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return (pick or lines or [""])[-1][:width]


def kill(at: str, n: int = 1, how: str = "now") -> dict:
    """A fault: SIGKILL at the nth ``at`` event."""
    assert at in EVENTS, at
    return {"spec": {"kill": {"at": at, "n": n, "how": how}}, "expect_kill": True}


def timed(seconds: float | str = "random") -> dict:
    """A fault: SIGKILL from the parent ``seconds`` after the child started its work
    ("random": uniform over the measured length of a run with work)."""
    return {"kill_after": seconds}


def limit(kind: str, at: str, n: int = 1, value: int = 0, relative: bool = False,
          expect_failure: bool = True) -> dict:
    """A fault: an rlimit applied at the nth ``at`` event, so that later writes fail."""
    assert at in EVENTS, at
    return {"spec": {"limit": {"kind": kind, "at": at, "n": n, "value": value, "relative": relative}},
            "expect_failure": expect_failure}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child_main(sys.argv[2:])
    else:
        sys.exit(__doc__)
