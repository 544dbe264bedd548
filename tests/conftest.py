"""Shared fixtures: tiny seeded images made in tmp_path, and a shared ONNX cache."""
from __future__ import annotations

import csv
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

# One ONNX export for the whole session, kept out of the user's cache.
os.environ.setdefault("LOOKALIKE_CACHE", tempfile.mkdtemp(prefix="lookalike-test-cache-"))
os.environ.setdefault("LOOKALIKE_WEIGHTS", tempfile.mkdtemp(prefix="lookalike-test-weights-"))
os.environ.pop("LOOKALIKE_DB", None)


def make_photo(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A seeded picture with structure a CNN responds to: blobs, stripes and a gradient."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    base = rng.uniform(0, 255, 3)
    img += base
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.4) * min(w, h)
        colour = rng.uniform(0, 255, 3)
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
        img[mask] = colour
    freq, angle = rng.uniform(0.05, 0.3), rng.uniform(0, np.pi)
    stripes = np.sin((x * np.cos(angle) + y * np.sin(angle)) * freq)
    img += 40 * stripes[..., None]
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def save_photo(path: Path, seed: int, size=(96, 64), **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_photo(seed, size).save(path, **kw)
    return path


def views(seed: int) -> list[Image.Image]:
    """Three pictures of one thing: as made, cropped and brightened, mirrored and recoloured."""
    img = make_photo(seed, (96, 64))
    crop = ImageEnhance.Brightness(img.crop((8, 6, 90, 60)).resize((96, 64))).enhance(1.3)
    mirrored = ImageEnhance.Color(ImageOps.mirror(img)).enhance(0.5)
    return [img, crop, mirrored]


def labelled_set(root: Path, groups: int = 8, first_seed: int = 700) -> Path:
    """A folder of ``groups`` x 3 views with its groundtruth.csv (``groups`` x 3 matching pairs)."""
    rows = []
    for g in range(groups):
        for v, img in enumerate(views(first_seed + g)):
            rel = f"g{g}/v{v}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(root / rel, quality=92)
            rows.append((rel, f"thing{g}"))
    with open(root / "groundtruth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "group"])
        w.writerows(rows)
    return root


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder of six distinct small JPEG and PNG photos, one in a subfolder."""
    root = tmp_path / "photos"
    for i in range(5):
        save_photo(root / f"p{i}.jpg", seed=i, quality=92)
    save_photo(root / "sub" / "p5.png", seed=5)
    return root


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "index.db"


# The storage tests run on SQLite and on this PostgreSQL server, where they may create
# databases (bash .ci/run starts one and sets it).
POSTGRES_ENV = "LOOKALIKE_TEST_POSTGRES"


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request, tmp_path: Path):
    """A new database on each backend: a file's path, or the URL of a new PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "index.db"
    return request.getfixturevalue("pg_db")


@pytest.fixture
def pg_db(pg_server: str):
    """The URL of a new, empty PostgreSQL database, dropped after the test."""
    name, url = new_pg_database(pg_server)
    yield url
    drop_pg_database(pg_server, name)


@pytest.fixture(scope="session")
def pg_server() -> str:
    """$LOOKALIKE_TEST_POSTGRES, or a skip (a failure where LOOKALIKE_REQUIRE_POSTGRES=1, as in CI)."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        why = (f"no PostgreSQL server: set {POSTGRES_ENV}=postgresql://USER:PASSWORD@HOST/DB "
               "(a role that may create databases), or run bash .ci/run")
        if os.environ.get("LOOKALIKE_REQUIRE_POSTGRES"):
            pytest.fail(why)
        pytest.skip(why)
    return url


def new_pg_database(server: str) -> tuple[str, str]:
    """(name, URL) of a new, empty database on ``server``."""
    import uuid

    from sqlalchemy import make_url

    name = f"lookalike_test_{uuid.uuid4().hex[:12]}"
    _pg_admin(server, f'CREATE DATABASE "{name}"')
    return name, make_url(server).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(server: str, name: str) -> None:
    """Drop the database ``name`` of ``server``. WITH (FORCE) ends what sessions are left, but
    PostgreSQL refuses it while an autovacuum worker is in the database (ending one takes
    pg_signal_backend); a plain DROP has the server cancel autovacuum itself."""
    import psycopg

    try:
        _pg_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except psycopg.errors.InsufficientPrivilege:
        _pg_admin(server, f'DROP DATABASE IF EXISTS "{name}"')


def _pg_admin(url: str, statement: str) -> None:
    import psycopg
    from sqlalchemy import make_url

    u = make_url(url)
    with psycopg.connect(host=u.host or "localhost", port=u.port or 5432, user=u.username,
                         password=u.password, dbname=u.database, autocommit=True) as con:
        con.execute(statement)


def png_header(width: int, height: int, mode_bits: tuple[int, int] = (8, 0)) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (no real pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, mode_bits[0], mode_bits[1], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def _drop_file_privileges() -> None:
    """In a child about to exec: give up root's power to ignore file permissions.

    As root, chmod does not keep a process out; dropping CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH and CAP_FOWNER from the bounding set makes the exec'd
    program obey permission bits like any user, without changing its uid (so
    it can still run a Python installed under /root).
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_unprivileged(args: list[str], **kw):
    """subprocess.run ``args`` so that file permissions apply to it, even when we are root.

    Skips the calling test where that cannot be arranged (root without CAP_SETPCAP, or
    no POSIX permissions at all).
    """
    import subprocess
    import sys

    if os.name == "nt":
        pytest.skip("needs POSIX file permissions")
    if os.geteuid() == 0:
        if not sys.platform.startswith("linux"):
            pytest.skip("as root, needs Linux capabilities to test permissions")
        try:
            subprocess.run(["true"], preexec_fn=_drop_file_privileges, check=True)
        except (OSError, subprocess.SubprocessError):
            pytest.skip("cannot drop root's file privileges here")
        kw["preexec_fn"] = _drop_file_privileges
    return subprocess.run(args, capture_output=True, text=True, **kw)


def make_poster(seed: int, size: tuple[int, int] = (360, 480)) -> Image.Image:
    """A seeded flat picture with the detail of a printed cover: shapes, lines and lettering."""
    from PIL import ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    w, h = size

    def colour():
        return tuple(int(v) for v in rng.integers(0, 256, 3))

    img = Image.new("RGB", size, colour())
    draw = ImageDraw.Draw(img)
    for _ in range(60):
        kind = rng.integers(0, 3)
        x0, y0 = int(rng.integers(-20, w)), int(rng.integers(-20, h))
        x1, y1 = x0 + int(rng.integers(8, w // 3)), y0 + int(rng.integers(8, h // 3))
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour())
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour())
        else:
            draw.line((x0, y0, x1, y1), fill=colour(), width=int(rng.integers(1, 6)))
    font = ImageFont.load_default(size=28)
    for _ in range(6):
        text = "".join(chr(int(c)) for c in rng.integers(65, 91, 8))
        draw.text((int(rng.integers(0, w - 100)), int(rng.integers(0, h - 30))), text,
                  fill=colour(), font=font)
    return img


def homography(src, dst) -> np.ndarray:
    """The 3 x 3 projective map that takes the four points ``src`` to ``dst``."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    h = np.linalg.solve(np.array(rows, np.float64), np.array(rhs, np.float64))
    return np.append(h, 1.0).reshape(3, 3)


def apply_homography(h: np.ndarray, points) -> np.ndarray:
    p = np.c_[np.asarray(points, np.float64), np.ones(len(points))] @ h.T
    return p[:, :2] / p[:, 2:]


def photograph(picture: Image.Image, corners, background: Image.Image,
               blur: float = 0.7) -> Image.Image:
    """``picture`` seen at an angle: warped so that its corners (top-left, top-right,
    bottom-right, bottom-left) land on ``corners`` of ``background``, slightly blurred."""
    from PIL import ImageFilter

    w, h = picture.size
    # Pillow maps each output pixel back into the picture: the inverse homography.
    back = homography(corners, [(0, 0), (w, 0), (w, h), (0, h)])
    coeffs = (back / back[2, 2]).ravel()[:8]
    warped = picture.convert("RGBA").transform(background.size, Image.Transform.PERSPECTIVE, coeffs,
                                               Image.Resampling.BICUBIC)
    scene = background.convert("RGBA")
    scene.alpha_composite(warped)
    return scene.convert("RGB").filter(ImageFilter.GaussianBlur(blur))


def vector_index_of(db: Path):
    """The vector index on disk beside ``db`` as it is (indexer.vectors.VectorIndex), with its
    store, which the caller closes; fails the test when it does not match the database."""
    from indexer import vectors
    from indexer.store import Store

    store = Store(db, create=False)
    index, _, why = vectors.read(store)
    assert index is not None and why is None, why
    return index, store


def index_agrees_with_db(db: Path) -> list[int]:
    """The vector index on disk holds exactly the database's descriptors (whitened as the
    index holds them), under their ids; returns the ids."""
    from sqlalchemy import text

    from indexer.store import unpack_vector

    index, store = vector_index_of(db)
    try:
        ids = index.ids()
        with store.engine.connect() as con:
            rows = con.execute(text("select id, embedding from images where status='ok' order by id")).all()
        assert sorted(ids.tolist()) == [r[0] for r in rows]
        if rows and index.layout.exact:
            held = index.vectors([r[0] for r in rows])
            want = index.space(np.stack([unpack_vector(r[1], index.dim) for r in rows]))
            assert np.array_equal(held, want)
        return sorted(ids.tolist())
    finally:
        store.close()


def faiss_file(db) -> Path:
    """The FAISS file of the database ``db`` (a path or a URL): beside a file, in the cache for a server."""
    from indexer import vectors
    from indexer.store import Store

    store = Store(db, create=False)
    try:
        return vectors.index_path(store.path)
    finally:
        store.close()


def sql(db, statement: str, **params) -> list[tuple]:
    """The rows of ``statement`` run on the database ``db`` (a path or a URL), as tuples;
    without creating or upgrading anything."""
    from sqlalchemy import URL, create_engine, text

    from indexer.store import resolve_db

    where = resolve_db(db)
    url = where if isinstance(where, URL) else URL.create("sqlite", database=str(where))
    engine = create_engine(url)
    try:
        with engine.begin() as con:
            result = con.execute(text(statement), params)
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        engine.dispose()
