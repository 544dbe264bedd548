"""Awkward paths: every one is indexed or reported on one line naming it, and no run stops.

Spaces, newlines, tabs, quotes, backslashes, leading dashes, names that are not
UTF-8, 255-byte names, paths over PATH_MAX, symbolic link loops, links out of
the root and dangling ones, unreadable files and folders, files that vanish or
turn into folders in the middle of a run, and a root that is a file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import sys
import threading
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from conftest import index_agrees_with_db, make_photo, run_unprivileged, save_photo
from indexer import pipeline, sync
from indexer.scan import display_path

REPO = Path(__file__).resolve().parents[1]
LOOKALIKE = [sys.executable, "-c", "import cli; cli.main()"]
FAST = ("--workers", "0", "--image-size", "128")  # the default model; a smaller input for speed

SUMMARY = re.compile(r"\d+ added, \d+ updated, \d+ moved, \d+ removed, \d+ unchanged, "
                     r"\d+ failed \(\d+ embedded in \d+\.\ds\)")

needs_symlinks = pytest.mark.skipif(os.name == "nt", reason="symlinks not available")


def run(*args, input=None):
    return CliRunner().invoke(main, [os.fspath(a) for a in args], input=input,
                              catch_exceptions=False)


def index(root, db, *more):
    return run("index", *more, "--db", db, *FAST, "--", root)


def rows(db: Path) -> dict[str, tuple[str, str | None]]:
    """path -> (status, error) of every row in the database."""
    with closing(sqlite3.connect(db)) as con:
        return {p: (s, e) for p, s, e in con.execute("select path, status, error from images")}


def ok_paths(db: Path) -> set[str]:
    return {p for p, (status, _) in rows(db).items() if status == "ok"}


def faiss_matches_db(db: Path) -> None:
    index_agrees_with_db(db)


def message_lines(stderr: str) -> list[str]:
    """The lines of stderr, each checked to be a whole message: a log line, a failure or the summary."""
    lines = stderr.splitlines()
    for line in lines:
        assert line.startswith(("lookalike: ", "failed: ", "Error: ")) or SUMMARY.fullmatch(line), (
            f"not a one-line message: {line!r} in\n{stderr}")
    return lines


def naming(lines: list[str], path) -> list[str]:
    shown = display_path(path)
    return [line for line in lines if shown in line]


def counts(stderr: str) -> str:
    (line,) = [x for x in stderr.splitlines() if SUMMARY.fullmatch(x)]
    return line.split(" (")[0]


# -- names with spaces, control characters, quotes, dashes, other bytes ---------

GOOD_NAMES = [
    "with space.jpg",
    "  leading and trailing spaces  .jpg",
    "new\nline.jpg",
    "carriage\rreturn.png",
    "tab\there.jpg",
    "esc\x1b[31mred.jpg",
    "quote's \"both\".jpg",
    "back\\slash\\n.jpg",
    "-dash.jpg",
    "--double-dash.png",
    "été 写真.jpg",
    "sub\nfolder/inside.jpg",
    "L" * 251 + ".jpg",  # a 255-byte name, the longest a file system allows
    "é" * 125 + "x.jpg",  # 255 bytes of UTF-8, 130 characters
]


@pytest.fixture
def awkward(tmp_path: Path) -> Path:
    root = tmp_path / "my photos"
    for seed, name in enumerate(GOOD_NAMES, 100):
        save_photo(root / name, seed=seed)
    assert all(len(os.fsencode(Path(n).name)) <= 255 for n in GOOD_NAMES)
    return root


def good_paths(root: Path) -> set[str]:
    return {str(root / n) for n in GOOD_NAMES}


def test_awkward_names_are_indexed_and_a_name_that_is_not_utf8_is_skipped_on_one_line(awkward, db):
    latin1 = os.fsencode(awkward) + b"/caf\xe9.jpg"  # "café" written by a Latin-1 system
    with open(latin1, "wb") as f:
        f.write((awkward / "-dash.jpg").read_bytes())
    latin1_dir = os.fsencode(awkward) + b"/\xe9t\xe9"
    os.mkdir(latin1_dir)
    for name in (b"/a.jpg", b"/b.jpg"):
        with open(latin1_dir + name, "wb") as f:
            f.write((awkward / "-dash.jpg").read_bytes())
    result = index(awkward, db)
    assert result.exit_code == 0, result.output
    assert counts(result.stderr) == f"{len(GOOD_NAMES)} added, 0 updated, 0 moved, 0 removed, 0 unchanged, 0 failed"
    assert ok_paths(db) == good_paths(awkward) and len(rows(db)) == len(GOOD_NAMES)
    faiss_matches_db(db)
    lines = message_lines(result.stderr)
    # One line, naming the file with its odd byte escaped.
    assert naming(lines, latin1) == [
        f"lookalike: '{awkward}/caf\\xe9.jpg': skipped: the file name is not valid UTF-8"]
    # A folder so named: one line for it, none for each file in it.
    assert naming(lines, latin1_dir) == [
        f"lookalike: '{awkward}/\\xe9t\\xe9': skipped: the folder name is not valid UTF-8"]
    assert len(lines) == 3
    result = index(awkward, db)
    assert counts(result.stderr) == f"0 added, 0 updated, 0 moved, 0 removed, {len(GOOD_NAMES)} unchanged, 0 failed"


def test_query_json_round_trips_every_awkward_path(awkward, db):
    latin1 = os.fsencode(awkward) + b"/caf\xe9.jpg"
    with open(latin1, "wb") as f:
        f.write((awkward / "tab\there.jpg").read_bytes())
    assert index(awkward, db).exit_code == 0
    paths = sorted(good_paths(awkward))
    # As arguments, after -- so that names with a leading dash are not options.
    result = run("query", "--db", db, "-k", "2", "--json", "--", *paths, os.fsdecode(latin1))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(paths) + 1
    answers = [json.loads(line) for line in lines]
    for path, answer in zip(paths, answers):
        assert answer["query"] == path
        assert answer["results"][0]["path"] == path and answer["results"][0]["score"] > 0.999
    # The name that is not UTF-8 comes back as the same bytes (a lone-surrogate escape).
    assert os.fsencode(answers[-1]["query"]) == latin1
    assert answers[-1]["results"][0]["path"] == str(awkward / "tab\there.jpg")
    assert message_lines(result.stderr) == []

    # On stdin, one path a line: every name but those holding a line break.
    one_line = [p for p in paths if "\n" not in p and "\r" not in p]
    result = run("query", "--db", db, "-k", "1", "--json", "-", input="\n".join(one_line) + "\n")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["query"] for line in result.stdout.splitlines()] == one_line

    # A folder: its files, awkward names included; the Latin-1 name skipped on one line.
    result = run("query", "--db", db, "-k", "1", "--json", awkward)
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert {a["query"] for a in answers} == set(paths)
    assert all(a["results"][0]["path"] == a["query"] for a in answers)
    assert message_lines(result.stderr) == [
        f"lookalike: '{awkward}/caf\\xe9.jpg': skipped: the file name is not valid UTF-8"]


def test_leading_dash_roots_and_queries_need_double_dash(tmp_path, db, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_photo(tmp_path / "-photos" / "-a.jpg", seed=1)
    save_photo(tmp_path / "-photos" / "b.jpg", seed=2)
    result = run("index", "--db", db, *FAST, "-photos")
    assert result.exit_code == 2 and "No such option" in result.output  # click's own refusal
    result = run("index", "--db", db, *FAST, "--", "-photos")
    assert result.exit_code == 0, result.output
    assert ok_paths(db) == {str(tmp_path / "-photos" / "-a.jpg"), str(tmp_path / "-photos" / "b.jpg")}
    result = run("query", "--db", db, "-k", "1", "--json", "--", "-photos/-a.jpg")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["query"] == "-photos/-a.jpg"
    assert answer["results"][0]["path"] == str(tmp_path / "-photos" / "-a.jpg")


def test_messages_and_table_naming_a_path_with_a_newline_stay_one_line(awkward, db, tmp_path):
    broken = awkward / "broken\nfile.jpg"
    broken.write_bytes(b"not a picture")
    result = index(awkward, db)
    assert result.exit_code == 0, result.output
    lines = message_lines(result.stderr)
    assert naming(lines, broken) == [f"failed: {display_path(broken)}: not an image Pillow can read"]
    assert rows(db)[str(broken)][0] == "failed"

    info = run("info", "--db", db)
    assert f"failed     {display_path(broken)}: not an image Pillow can read" in info.stdout.splitlines()

    missing = tmp_path / "gone\n.jpg"
    result = run("query", "--db", db, "-k", "1", "--", broken, missing)
    assert result.exit_code == 1
    assert message_lines(result.stderr) == [
        f"Error: {display_path(broken)}: not an image Pillow can read",
        f"Error: {display_path(missing)}: file not found"]

    empty = tmp_path / "empty\nfolder"
    empty.mkdir()
    result = index(empty, db)
    assert result.exit_code == 0, result.output
    assert message_lines(result.stderr)[0] == f"lookalike: no image files under {display_path(empty)}"

    # The table: one query path a line, then its matches, one a line.
    newline = awkward / "new\nline.jpg"
    result = run("query", "--db", db, "-k", "1", "--", newline)
    assert result.exit_code == 0, result.output
    query_line, match_line = result.stdout.splitlines()
    assert query_line == display_path(newline)
    # rank, similarity, inliers (blank when unverified), path
    assert re.fullmatch(r"    1  1\.0000  [ \d]{5}  " + re.escape(display_path(newline)), match_line)


# -- long names and paths over PATH_MAX ---------------------------------------

def write_at(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
    with open(fd, "wb") as out:
        out.write(data)


def test_long_names_and_paths_deeper_than_path_max(tmp_path, db):
    root = tmp_path / "deep"
    long_dir = "D" * 255
    save_photo(root / long_dir / ("F" * 251 + ".jpg"), seed=1)
    data = (root / long_dir / ("F" * 251 + ".jpg")).read_bytes()
    # Build past PATH_MAX (4096) relative to open folders: the kernel refuses longer paths.
    chain = "E" * 255
    fd = os.open(root, os.O_RDONLY)
    depth, too_long_file, too_deep_dir = 0, None, None
    try:
        while True:
            os.mkdir(chain, dir_fd=fd)
            nfd = os.open(chain, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd, depth = nfd, depth + 1
            here = os.fsencode(root) + (b"/" + chain.encode()) * depth
            name = "G" * 251 + ".jpg"
            if too_long_file is None and len(here) + 1 + len(name) >= 4096:
                write_at(fd, name, data)
                too_long_file = os.fsdecode(here) + "/" + name
            elif len(here) >= 4096:
                write_at(fd, "x.jpg", data)
                too_deep_dir = os.fsdecode(here)
                break
    finally:
        os.close(fd)
    assert len(os.fsencode(too_long_file)) > 4096 and len(os.fsencode(too_deep_dir)) > 4096

    result = index(root, db)
    assert result.exit_code == 0, result.output
    assert ok_paths(db) == {str(root / long_dir / ("F" * 251 + ".jpg"))}
    lines = message_lines(result.stderr)
    assert naming(lines, too_long_file) == [f"lookalike: {too_long_file}: cannot stat: File name too long"]
    assert naming(lines, too_deep_dir) == [f"lookalike: {too_deep_dir}: cannot stat folder: File name too long"]
    assert counts(result.stderr) == "1 added, 0 updated, 0 moved, 0 removed, 0 unchanged, 0 failed"
    query = str(root / long_dir / ("F" * 251 + ".jpg"))
    answer = json.loads(run("query", "--db", db, "-k", "1", "--json", query).stdout)
    assert answer["results"][0]["path"] == query
    shutil.rmtree(root)  # fd-based: copes with the deep part


# -- symbolic links ----------------------------------------------------------

@needs_symlinks
def test_symlink_loops_links_out_of_the_root_and_dangling_links(tmp_path, db):
    root, outside, drive = tmp_path / "root", tmp_path / "outside", tmp_path / "drive"
    save_photo(root / "a.jpg", seed=1)
    save_photo(root / "sub" / "b.jpg", seed=2)
    save_photo(outside / "o.jpg", seed=3)
    save_photo(drive / "d.jpg", seed=4)
    os.symlink(root, root / "sub" / "up")  # a loop through an ancestor
    os.symlink("self.jpg", root / "self.jpg")  # a link to itself
    os.symlink(outside / "o.jpg", root / "link to outside.jpg")  # a file outside the root
    os.symlink(tmp_path / "nothing.jpg", root / "dangling.jpg")
    os.symlink(drive, root / "drive")  # a folder outside the root (a drive, say)
    result = index(root, db)
    assert result.exit_code == 0, result.output
    expected = {str(root / "a.jpg"), str(root / "sub" / "b.jpg"),
                str(root / "link to outside.jpg"), str(root / "drive" / "d.jpg")}
    assert ok_paths(db) == expected and len(rows(db)) == 4
    lines = message_lines(result.stderr)
    assert naming(lines, root / "self.jpg") == [
        f"lookalike: {root / 'self.jpg'}: cannot stat: Too many levels of symbolic links"]
    assert naming(lines, root / "dangling.jpg") == [
        f"lookalike: {root / 'dangling.jpg'}: skipped: broken symbolic link to {tmp_path / 'nothing.jpg'}"]
    assert counts(result.stderr) == "4 added, 0 updated, 0 moved, 0 removed, 0 unchanged, 0 failed"
    answer = json.loads(run("query", "--db", db, "-k", "1", "--json", outside / "o.jpg").stdout)
    assert answer["results"][0]["path"] == str(root / "link to outside.jpg")

    # The drive is unplugged: its link dangles, and what was indexed through it is kept.
    drive.rename(tmp_path / "unplugged")
    result = index(root, db)
    assert result.exit_code == 0, result.output
    assert naming(message_lines(result.stderr), root / "drive") == [
        f"lookalike: {root / 'drive'}: skipped: broken symbolic link to {drive}"]
    assert counts(result.stderr) == "0 added, 0 updated, 0 moved, 0 removed, 3 unchanged, 0 failed"
    assert ok_paths(db) == expected
    (tmp_path / "unplugged").rename(drive)
    result = index(root, db)
    assert counts(result.stderr) == "0 added, 0 updated, 0 moved, 0 removed, 4 unchanged, 0 failed"
    # The link removed for good: then its entries go.
    (root / "drive").unlink()
    result = index(root, db)
    assert counts(result.stderr) == "0 added, 0 updated, 0 moved, 1 removed, 3 unchanged, 0 failed"
    faiss_matches_db(db)


# -- permissions --------------------------------------------------------------

@pytest.mark.skipif(os.name == "nt", reason="needs POSIX permissions")
def test_unreadable_files_and_folders(tmp_path, db):
    root = tmp_path / "root"
    for i in range(3):
        save_photo(root / f"ok{i}.jpg", seed=i)
    locked = save_photo(root / "locked file.jpg", seed=10)
    save_photo(root / "locked folder" / "in.jpg", seed=11)
    save_photo(root / "no search" / "in.jpg", seed=12)
    good = {str(root / f"ok{i}.jpg") for i in range(3)}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # Indexed once while everything is readable: the model cache is filled, and the
    # entries behind the folders about to be locked must survive the locked runs.
    seen_db = tmp_path / "seen.db"
    assert index(root, seen_db).exit_code == 0
    assert len(ok_paths(seen_db)) == 6

    locked.chmod(0)
    (root / "locked folder").chmod(0)
    (root / "no search").chmod(0o644)  # listable, but its files cannot be examined
    try:
        result = run_unprivileged(LOOKALIKE + ["index", "--db", str(db), *FAST, str(root)],
                                  cwd=REPO, env=env)
        assert result.returncode == 0, result.stderr
        assert ok_paths(db) == good
        assert rows(db)[str(locked)] == ("failed", "cannot read: Permission denied")
        lines = message_lines(result.stderr)
        assert naming(lines, locked) == [f"failed: {locked}: cannot read: Permission denied"]
        assert naming(lines, root / "locked folder") == [
            f"lookalike: {root / 'locked folder'}: cannot list folder: Permission denied"]
        assert naming(lines, root / "no search" / "in.jpg") == [
            f"lookalike: {root / 'no search' / 'in.jpg'}: cannot stat: Permission denied"]
        assert counts(result.stderr) == "3 added, 0 updated, 0 moved, 0 removed, 0 unchanged, 1 failed"
        faiss_matches_db(db)

        # An index that saw everything keeps the entries it cannot see now.
        result = run_unprivileged(LOOKALIKE + ["index", "--db", str(seen_db), str(root)],
                                  cwd=REPO, env=env)
        assert result.returncode == 0, result.stderr
        assert counts(result.stderr) == "0 added, 0 updated, 0 moved, 0 removed, 4 unchanged, 0 failed"
        assert len(ok_paths(seen_db)) == 6
    finally:
        locked.chmod(0o644)
        (root / "locked folder").chmod(0o755)
        (root / "no search").chmod(0o755)


@pytest.mark.skipif(os.name == "nt", reason="needs POSIX permissions")
def test_an_unreadable_file_is_indexed_once_it_can_be_read(tmp_path, db):
    root = tmp_path / "root"
    save_photo(root / "ok.jpg", seed=1)
    assert index(root, db).exit_code == 0  # also fills the model cache for the unprivileged run
    locked = save_photo(root / "locked.jpg", seed=2)
    locked.chmod(0)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        result = run_unprivileged(LOOKALIKE + ["index", "--db", str(db), *FAST, str(root)],
                                  cwd=REPO, env=env)
        assert result.returncode == 0, result.stderr
        assert f"failed: {locked}: cannot read: Permission denied" in result.stderr.splitlines()
    finally:
        locked.chmod(0o644)  # size and modification time stay as they were
    result = index(root, db)
    assert counts(result.stderr) == "0 added, 1 updated, 0 moved, 0 removed, 1 unchanged, 0 failed"
    assert ok_paths(db) == {str(root / "ok.jpg"), str(locked)}


# -- files that change under a running index -----------------------------------

def test_files_that_vanish_or_become_folders_between_scan_and_hashing(tmp_path, db, monkeypatch):
    root = tmp_path / "root"
    keep = {save_photo(root / f"keep{i}.jpg", seed=i) for i in range(3)}
    gone = save_photo(root / "gone.jpg", seed=10)
    folder = save_photo(root / "becomes a folder.jpg", seed=11)
    real, lock, done = sync.file_sha256, threading.Lock(), []

    def sha_after_changes(path):
        with lock:  # hashing runs in threads: the first of them changes the files, before any reads
            if not done:
                gone.unlink()
                folder.unlink()
                save_photo(folder / "inner.jpg", seed=12)
                done.append(path)
        return real(path)

    monkeypatch.setattr(sync, "file_sha256", sha_after_changes)
    result = index(root, db)
    assert done and result.exit_code == 0, result.output
    assert ok_paths(db) == {str(p) for p in keep}
    lines = message_lines(result.stderr)
    assert naming(lines, gone) == [f"failed: {gone}: cannot read: No such file or directory"]
    assert naming(lines, folder) == [f"failed: {folder}: cannot read: Is a directory"]
    assert counts(result.stderr) == "3 added, 0 updated, 0 moved, 0 removed, 0 unchanged, 2 failed"
    faiss_matches_db(db)

    monkeypatch.undo()
    result = index(root, db)
    assert result.exit_code == 0, result.output
    assert counts(result.stderr) == "1 added, 0 updated, 0 moved, 2 removed, 3 unchanged, 0 failed"
    assert ok_paths(db) == {str(p) for p in keep} | {str(folder / "inner.jpg")}
    assert set(rows(db)) == ok_paths(db)


def test_files_that_vanish_between_hashing_and_decoding(tmp_path, db, monkeypatch):
    root = tmp_path / "root"
    keep = {save_photo(root / f"keep{i}.jpg", seed=i) for i in range(3)}
    gone = save_photo(root / "gone.jpg", seed=10)
    folder = save_photo(root / "becomes a folder.jpg", seed=11)
    real, done = pipeline.open_image, []

    def open_after_changes(path, *args, **kw):
        if not done:
            gone.unlink()
            folder.unlink()
            folder.mkdir()
            done.append(path)
        return real(path, *args, **kw)

    monkeypatch.setattr(pipeline, "open_image", open_after_changes)
    result = index(root, db)  # --workers 0: decoding runs here, patched
    assert done and result.exit_code == 0, result.output
    assert ok_paths(db) == {str(p) for p in keep}
    lines = message_lines(result.stderr)
    assert naming(lines, gone) == [f"failed: {gone}: file not found"]
    assert len(naming(lines, folder)) == 1 and naming(lines, folder)[0].startswith(f"failed: {folder}: ")
    assert counts(result.stderr) == "3 added, 0 updated, 0 moved, 0 removed, 0 unchanged, 2 failed"
    faiss_matches_db(db)

    monkeypatch.undo()
    result = index(root, db)
    assert counts(result.stderr) == "0 added, 0 updated, 0 moved, 2 removed, 3 unchanged, 0 failed"
    assert set(rows(db)) == {str(p) for p in keep}


def test_a_file_moved_between_hashing_and_decoding_is_indexed_at_its_new_place(tmp_path, db, monkeypatch):
    root = tmp_path / "root"
    save_photo(root / "keep.jpg", seed=1)
    moving = save_photo(root / "moving.jpg", seed=2)
    real, done = pipeline.open_image, []

    def open_after_move(path, *args, **kw):
        if not done:
            (root / "later").mkdir()
            moving.rename(root / "later" / "moving.jpg")
            done.append(path)
        return real(path, *args, **kw)

    monkeypatch.setattr(pipeline, "open_image", open_after_move)
    result = index(root, db)
    assert f"failed: {moving}: file not found" in result.stderr.splitlines()
    monkeypatch.undo()
    result = index(root, db)
    assert str(root / "later" / "moving.jpg") in ok_paths(db), result.output


def test_a_file_replaced_by_a_folder_of_the_same_name_between_runs_and_back(tmp_path, db):
    root = tmp_path / "root"
    save_photo(root / "keep.jpg", seed=1)
    twin = save_photo(root / "twin.jpg", seed=2)
    assert index(root, db).exit_code == 0
    twin.unlink()
    save_photo(twin / "inner.jpg", seed=3)
    save_photo(twin / "copy.jpg", seed=1)  # the same bytes as keep.jpg
    result = index(root, db)
    assert result.exit_code == 0, result.output
    assert counts(result.stderr) == "2 added, 0 updated, 0 moved, 1 removed, 1 unchanged, 0 failed"
    assert set(rows(db)) == ok_paths(db) == {str(root / "keep.jpg"), str(twin / "inner.jpg"),
                                              str(twin / "copy.jpg")}
    shutil.rmtree(twin)
    make_photo(2).save(twin)
    result = index(root, db)
    assert counts(result.stderr) == "1 added, 0 updated, 0 moved, 2 removed, 1 unchanged, 0 failed"
    assert set(rows(db)) == ok_paths(db) == {str(root / "keep.jpg"), str(twin)}
    faiss_matches_db(db)


# -- roots ---------------------------------------------------------------------

def test_a_root_that_is_a_file(tmp_path, db):
    photo = save_photo(tmp_path / "a folder" / "one photo.jpg", seed=1)
    save_photo(tmp_path / "a folder" / "other.jpg", seed=2)
    result = index(photo, db)
    assert result.exit_code == 0, result.output
    assert counts(result.stderr) == "1 added, 0 updated, 0 moved, 0 removed, 0 unchanged, 0 failed"
    assert set(rows(db)) == ok_paths(db) == {str(photo)}
    # The folder holding it: the file is known, the other one new.
    result = index(photo.parent, db)
    assert counts(result.stderr) == "1 added, 0 updated, 0 moved, 0 removed, 1 unchanged, 0 failed"
    # Re-indexing only the file leaves the rest of the folder alone.
    photo.unlink()
    result = index(tmp_path / "a folder" / "other.jpg", db)
    assert counts(result.stderr) == "0 added, 0 updated, 0 moved, 0 removed, 1 unchanged, 0 failed"
    assert str(photo) in rows(db)

    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    result = index(notes, db)
    assert result.exit_code == 0, result.output
    assert message_lines(result.stderr)[0] == f"lookalike: no image files under {notes}"

    newline_root = tmp_path / "new\nroot"
    result = index(newline_root, db)
    assert result.exit_code == 1
    assert result.output.splitlines() == [f"Error: {display_path(newline_root)}: no such file or directory"]
    dangling = tmp_path / "dangling root"
    os.symlink(tmp_path / "nowhere", dangling)
    result = index(dangling, db)
    assert result.exit_code == 1
    assert result.output.splitlines() == [f"Error: {dangling}: no such file or directory"]


def test_display_path_keeps_printable_paths_and_escapes_the_rest():
    for plain in ("/photos/a b.jpg", "/photos/été 写真.jpg", "/photos/back\\slash.jpg",
                  "/photos/quote's.jpg", "-dash.jpg"):
        assert display_path(plain) == plain
    assert display_path("/photos/a\nb.jpg") == "'/photos/a\\nb.jpg'"
    assert display_path("/p/tab\there's\\.jpg") == "'/p/tab\\there\\'s\\\\.jpg'"
    assert display_path("/p/esc\x1b[31m\r.jpg") == "'/p/esc\\x1b[31m\\r.jpg'"
    assert display_path(b"/p/caf\xe9.jpg") == display_path(os.fsdecode(b"/p/caf\xe9.jpg")) == "'/p/caf\\xe9.jpg'"
    assert display_path(Path("/p/new\nline")) == "'/p/new\\nline'"
    for odd in ("/a\nb", "/p/tab\there's\\.jpg", os.fsdecode(b"/caf\xe9\n.jpg")):
        assert "\n" not in display_path(odd) and display_path(odd).isprintable()
