"""indexer.scan: finding image files, hidden files, symlinks, roots, extensions, sha256."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import os
import signal
import threading
from pathlib import Path

import pytest
from PIL import features

from conftest import save_photo
from indexer.scan import BASE_EXTENSIONS, FileStat, RootNotFound, file_sha256, image_extensions, scan

needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt",
                                    reason="symlinks not available")


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the block after ``seconds`` (POSIX main thread only)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"scan still running after {seconds} s (a symlink loop?)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def found(roots, limit: int = 1000, **kw) -> list[str]:
    """Paths yielded by scan; bounded in count and time so that a loop cannot hang the test."""
    with time_limit(10):
        out = list(itertools.islice(scan([os.fspath(r) for r in roots], **kw), limit))
    assert len(out) < limit, "scan yielded far too many files (a loop?)"
    return [f.path for f in out]


def names(paths, base: Path) -> set[str]:
    return {Path(p).relative_to(base).as_posix() for p in paths}


def test_recursive_with_stat(tmp_path: Path):
    a = save_photo(tmp_path / "a.jpg", seed=1)
    b = save_photo(tmp_path / "x" / "y" / "z" / "b.png", seed=2)
    touch(tmp_path / "x" / "notes.txt")
    stats = list(scan([tmp_path]))
    assert all(isinstance(s, FileStat) for s in stats)
    assert {s.path for s in stats} == {str(a), str(b)}
    for s in stats:
        st = os.stat(s.path)
        assert os.path.isabs(s.path)
        assert (s.size, s.mtime_ns) == (st.st_size, st.st_mtime_ns)
        assert s.size == Path(s.path).stat().st_size > 0


def test_photos_fixture(photos: Path):
    assert names(found([photos]), photos) == {"p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg", "p4.jpg", "sub/p5.png"}


def test_mtime_ns_follows_file(tmp_path: Path):
    p = touch(tmp_path / "a.jpg")
    os.utime(p, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    (s,) = scan([tmp_path])
    assert s.mtime_ns == os.stat(p).st_mtime_ns
    assert abs(s.mtime_ns - 1_600_000_000_123_456_789) < 1_000_000  # filesystem granularity


def test_hidden_skipped_by_default_and_included_on_request(tmp_path: Path):
    touch(tmp_path / "visible.jpg")
    touch(tmp_path / ".hidden.jpg")
    touch(tmp_path / ".cache" / "inside.jpg")
    touch(tmp_path / "sub" / ".thumbs" / "deep.png")
    touch(tmp_path / "sub" / "ok.png")
    assert names(found([tmp_path]), tmp_path) == {"visible.jpg", "sub/ok.png"}
    assert names(found([tmp_path], include_hidden=True), tmp_path) == {
        "visible.jpg", ".hidden.jpg", ".cache/inside.jpg", "sub/.thumbs/deep.png", "sub/ok.png"}


def test_hidden_root_given_explicitly_is_scanned(tmp_path: Path):
    root = tmp_path / ".photos"
    touch(root / "a.jpg")
    hidden_file = touch(tmp_path / ".b.jpg")
    assert names(found([root]), root) == {"a.jpg"}
    assert found([hidden_file]) == [str(hidden_file)]


def test_only_image_extensions_case_insensitive(tmp_path: Path):
    for name in ["a.JPG", "b.Jpeg", "c.PNG", "d.tiff", "e.TIF", "f.webp", "g.bmp", "h.GIF", "i.jpe", "j.jfif"]:
        touch(tmp_path / name)
    for name in ["k.txt", "l.jpg.bak", "m", "n.json", "o.JPG~", "p.svg", "jpg", "q.mp4"]:
        touch(tmp_path / name)
    assert names(found([tmp_path]), tmp_path) == {
        "a.JPG", "b.Jpeg", "c.PNG", "d.tiff", "e.TIF", "f.webp", "g.bmp", "h.GIF", "i.jpe", "j.jfif"}


def test_extensions_argument(tmp_path: Path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.PNG")
    touch(tmp_path / "c.data")
    assert names(found([tmp_path], extensions=frozenset({".png"})), tmp_path) == {"b.PNG"}
    assert names(found([tmp_path], extensions=frozenset({".data"})), tmp_path) == {"c.data"}


def test_image_extensions_match_plugins():
    exts = image_extensions()
    assert BASE_EXTENSIONS <= exts
    assert all(e.startswith(".") and e == e.lower() for e in exts)
    has_heif = importlib.util.find_spec("pillow_heif") is not None
    assert (".heic" in exts) == has_heif and (".heif" in exts) == has_heif
    has_avif = features.check("avif") or importlib.util.find_spec("pillow_avif") is not None
    assert (".avif" in exts) == has_avif


def test_heic_avif_found_only_with_plugin(tmp_path: Path):
    touch(tmp_path / "a.HEIC")
    touch(tmp_path / "b.avif")
    expected = {n for n, e in [("a.HEIC", ".heic"), ("b.avif", ".avif")] if e in image_extensions()}
    assert names(found([tmp_path]), tmp_path) == expected


def test_root_that_is_a_file(tmp_path: Path):
    p = save_photo(tmp_path / "one.jpg", seed=3)
    touch(tmp_path / "other.jpg")
    (s,) = scan([p])
    assert s == FileStat(str(p), p.stat().st_size, p.stat().st_mtime_ns)
    notes = touch(tmp_path / "notes.txt")
    assert found([notes]) == []  # a single file root is still filtered by extension


def test_relative_root_gives_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    touch(tmp_path / "d" / "a.jpg")
    monkeypatch.chdir(tmp_path)
    assert found(["d"]) == [str(tmp_path / "d" / "a.jpg")]


@pytest.mark.parametrize("many", [False, True])
def test_missing_root(tmp_path: Path, many: bool):
    touch(tmp_path / "a.jpg")
    missing = tmp_path / "no" / "such"
    roots = [tmp_path, missing] if many else [missing]
    with pytest.raises(RootNotFound) as exc:
        list(scan(roots))
    text = str(exc.value)
    assert "\n" not in text and str(missing) in text
    assert "no such" in text.lower()


def test_overlapping_and_repeated_roots_yield_once(tmp_path: Path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "sub" / "b.jpg")
    for roots in ([tmp_path, tmp_path / "sub"], [tmp_path / "sub", tmp_path], [tmp_path, tmp_path]):
        paths = found(roots)
        assert len(paths) == 2 and {Path(p).name for p in paths} == {"a.jpg", "b.jpg"}


@needs_symlinks
def test_symlinked_folder_is_followed(tmp_path: Path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    touch(root / "a.jpg")
    touch(outside / "deep" / "b.png")
    os.symlink(outside, root / "linked")
    assert names(found([root]), root) == {"a.jpg", "linked/deep/b.png"}


@needs_symlinks
def test_symlink_loop_terminates_without_duplicates(tmp_path: Path):
    root = tmp_path / "root"
    touch(root / "a.jpg")
    touch(root / "sub" / "b.jpg")
    os.symlink(root, root / "sub" / "up")  # link to an ancestor
    os.symlink(root / "sub", root / "sub" / "self")  # link to itself
    paths = found([root])
    assert names(paths, root) == {"a.jpg", "sub/b.jpg"}


@needs_symlinks
def test_mutual_symlink_loop(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    touch(a / "1.jpg")
    touch(b / "2.jpg")
    os.symlink(b, a / "to_b")
    os.symlink(a, b / "to_a")
    paths = found([a, b])
    assert len(paths) == 2
    assert {os.path.realpath(p) for p in paths} == {str((a / "1.jpg").resolve()), str((b / "2.jpg").resolve())}


@needs_symlinks
def test_file_reachable_twice_is_yielded_once(tmp_path: Path):
    root = tmp_path / "root"
    real = touch(root / "real" / "a.jpg")
    os.symlink(real, root / "alias.jpg")  # file link
    os.symlink(root / "real", root / "zz_dirlink")  # folder link reaching the same file
    os.link(real, root / "hard.jpg")  # hard link: the same physical file
    paths = found([root])
    assert len(paths) == 1
    assert os.path.samefile(paths[0], real)


@needs_symlinks
def test_broken_symlink_is_skipped(tmp_path: Path):
    touch(tmp_path / "a.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    os.symlink(tmp_path / "gone", tmp_path / "dangling_dir")
    assert names(found([tmp_path]), tmp_path) == {"a.jpg"}


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="needs POSIX permissions, not root")
def test_unreadable_folder_is_skipped(tmp_path: Path):
    touch(tmp_path / "a.jpg")
    locked = tmp_path / "locked"
    touch(locked / "b.jpg")
    locked.chmod(0)
    try:
        assert names(found([tmp_path]), tmp_path) == {"a.jpg"}
    finally:
        locked.chmod(0o755)


def test_file_sha256(tmp_path: Path):
    data = os.urandom(3 * (1 << 20) + 12345)  # several read chunks
    big = touch(tmp_path / "big.bin", data)
    assert file_sha256(big) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(big)) == hashlib.sha256(data).hexdigest()
    empty = touch(tmp_path / "empty.bin", b"")
    assert file_sha256(empty) == hashlib.sha256(b"").hexdigest()
    small = touch(tmp_path / "small.bin", b"abc")
    assert file_sha256(small) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
