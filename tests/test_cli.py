"""End to end through the command line, with the real default model."""
from __future__ import annotations

import json
import shutil

from click.testing import CliRunner
from PIL import Image

from cli import main
from conftest import png_header, save_photo


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def test_index_then_query_finds_the_photo_itself_first(photos, db):
    result = run("index", photos, "--db", db, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "6 added, 0 updated, 0 moved, 0 removed, 0 unchanged, 0 failed" in result.output

    query = photos / "p2.jpg"
    result = run("query", query, "--db", db, "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 1
    assert lines[0]["query"] == str(query)
    top = lines[0]["results"]
    assert len(top) == 3
    assert top[0]["path"] == str(query.resolve())
    assert top[0]["score"] > 0.999
    assert top[0]["width"] == 96 and top[0]["height"] == 64
    assert isinstance(top[0]["id"], int)
    assert top[0]["score"] >= top[1]["score"] >= top[2]["score"]


def test_a_recompressed_and_resized_copy_is_the_nearest_other_image(photos, db, tmp_path):
    # A real similarity check: the copy must beat five other images.
    Image.open(photos / "p3.jpg").resize((150, 100)).save(photos / "copy.jpg", quality=60)
    assert run("index", photos, "--db", db, "--workers", "0").exit_code == 0
    result = run("query", photos / "copy.jpg", "--db", db, "-k", "2", "--json")
    results = json.loads(result.stdout)["results"]
    assert results[0]["path"].endswith("copy.jpg")
    assert results[1]["path"].endswith("p3.jpg")
    assert results[1]["score"] > 0.9


def test_query_many_images_from_folder_and_stdin(photos, db):
    assert run("index", photos, "--db", db, "--workers", "0").exit_code == 0
    result = run("query", photos / "sub", "-", "--db", db, "-k", "1", "--json",
                 input=f"{photos / 'p0.jpg'}\n{photos / 'p1.jpg'}\n")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["query"] for line in lines] == [str(photos / "sub" / "p5.png"),
                                                   str(photos / "p0.jpg"), str(photos / "p1.jpg")]
    for line in lines:
        assert line["results"][0]["path"] == str((photos / line["query"]).resolve())


def test_table_output_is_readable(photos, db):
    assert run("index", photos, "--db", db, "--workers", "0").exit_code == 0
    result = run("query", photos / "p0.jpg", "--db", db, "-k", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == str(photos / "p0.jpg")
    assert lines[1].split() == ["1", "1.0000", str((photos / "p0.jpg").resolve())]


def test_bad_query_file_is_reported_and_others_still_answered(photos, db, tmp_path):
    assert run("index", photos, "--db", db, "--workers", "0").exit_code == 0
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    result = run("query", bad, photos / "p1.jpg", "--db", db, "--json")
    assert result.exit_code == 1
    assert f"{bad}: not an image" in result.stderr
    assert json.loads(result.stdout)["query"] == str(photos / "p1.jpg")


def test_info_lists_recipe_counts_failures_and_sizes(photos, db):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert run("index", photos, "--db", db, "--workers", "0").exit_code == 0
    result = run("info", "--db", db)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "efficientnet_lite0" in out and "gem" in out and "1280" in out
    assert "6 indexed, 1 failed" in out
    assert f"{photos / 'broken.png'}:" in out
    assert "faiss" in out
    data = json.loads(run("info", "--db", db, "--json").stdout)
    assert data["counts"] == {"ok": 6, "failed": 1}
    assert data["recipe"]["image_size"] == 448


def test_user_errors_are_one_line_and_non_zero(photos, db, tmp_path):
    result = run("index", tmp_path / "nowhere", "--db", db)
    assert result.exit_code != 0
    assert "nowhere: no such file or directory" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not db.exists()

    result = run("query", photos / "p0.jpg", "--db", tmp_path / "none.db")
    assert result.exit_code != 0
    assert "no such database" in result.output

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    result = run("query", photos / "p0.jpg", "--db", junk)
    assert result.exit_code != 0
    assert "not a usable lookalike database" in result.output
    assert len(result.output.strip().splitlines()) == 1

    result = run("index", photos, "--db", db, "--pooling", "median")
    assert result.exit_code == 2 and "median" in result.output

    import torch

    if not torch.cuda.is_available():
        result = run("index", photos, "--db", db, "--device", "cuda")
        assert result.exit_code == 1
        assert result.output.strip() == "Error: device 'cuda' asked for, but torch sees no CUDA GPU"
        assert not db.exists()


def test_recipe_mismatch_is_refused_naming_the_difference(photos, db):
    assert run("index", photos, "--db", db, "--workers", "0", "--image-size", "160").exit_code == 0
    result = run("index", photos, "--db", db, "--pooling", "mac")
    assert result.exit_code != 0
    assert "pooling: index has gem, asked for mac" in result.output
    result = run("index", photos, "--db", db, "--image-size", "224", "--layer", "block7")
    assert "image_size: index has 160, asked for 224" in result.output
    assert "layer: index has head, asked for block7" in result.output
    # Options left out take the stored recipe.
    result = run("index", photos, "--db", db)
    assert result.exit_code == 0, result.output
    assert "6 unchanged" in result.output


def test_default_database_location_follows_env(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert run("index", photos, "--workers", "0", "--image-size", "96").exit_code == 0
    assert (tmp_path / "xdg" / "lookalike" / "lookalike.db").exists()
    monkeypatch.setenv("LOOKALIKE_DB", str(tmp_path / "env.db"))
    assert run("index", photos, "--workers", "0", "--image-size", "96").exit_code == 0
    assert (tmp_path / "env.db").exists()


def test_bad_files_never_stop_a_run(photos, db, tmp_path):
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "text.png").write_text("hello")
    data = (photos / "p0.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(data[: len(data) // 2])
    save_photo(photos / "ok.webp", seed=40)
    result = run("index", photos, "--db", db, "--workers", "2", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert "7 added" in result.output and "3 failed" in result.output
    assert f"failed: {photos / 'empty.jpg'}: empty file" in result.stderr
    assert f"failed: {photos / 'text.png'}: not an image" in result.stderr
    assert f"failed: {photos / 'truncated.jpg'}: truncated" in result.stderr
    # They are not retried while unchanged, and they stay listed.
    result = run("index", photos, "--db", db, "--workers", "0")
    assert "7 unchanged, 3 failed" in result.output
    shutil.rmtree(photos / "sub")
    result = run("index", photos, "--db", db, "--workers", "0")
    assert "1 removed, 6 unchanged, 3 failed" in result.output


def test_a_folder_of_awkward_files_indexes_to_completion(tmp_path, db):
    import numpy as np

    from conftest import make_photo

    root = tmp_path / "awkward"
    root.mkdir()
    photo = make_photo(11, (120, 80))
    photo.save(root / "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 8
    photo.transpose(Image.Transpose.ROTATE_270).save(root / "rotated.jpg", quality=95, exif=exif)
    photo.convert("CMYK").save(root / "cmyk.jpg", quality=95)
    grey16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(grey16).save(root / "grey16.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png", transparency=0)
    photo.convert("RGBA").save(root / "alpha.png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "fake.jpg").write_text("<html>not a picture</html>")
    data = (root / "upright.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "bomb.png").write_bytes(png_header(40000, 40000))

    result = run("index", root, "--db", db, "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "6 added" in result.output and "4 failed" in result.output
    for name, reason in (("empty.jpg", "empty file"), ("fake.jpg", "not an image"),
                         ("truncated.jpg", "truncated"), ("bomb.png", "decompression bomb")):
        assert f"failed: {root / name}: {reason}" in result.stderr
    info = json.loads(run("info", "--db", db, "--json").stdout)
    assert info["counts"] == {"ok": 6, "failed": 4}
    out = run("query", root / "upright.jpg", "--db", db, "--json", "-k", "6").stdout
    scores = {r["path"]: r["score"] for r in json.loads(out)["results"]}
    assert scores[str(root / "rotated.jpg")] > 0.95
    assert scores[str(root / "cmyk.jpg")] > 0.8


def test_query_edge_cases(photos, db, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("index", empty, "--db", db)
    assert result.exit_code == 0 and "no image files under" in result.stderr
    result = run("query", photos / "p0.jpg", "--db", db)
    assert result.exit_code == 0 and "holds no indexed image yet" in result.stderr

    assert run("index", photos, "--db", db, "--workers", "0").exit_code == 0
    result = run("query", "-", "--db", db, "-k", "1", "--json",
                 input=f"{photos / 'p0.jpg'}\r\n\r\n{photos / 'sub'}\r\n")
    assert result.exit_code == 0, result.output
    queries = [json.loads(line)["query"] for line in result.stdout.splitlines()]
    assert queries == [str(photos / "p0.jpg"), str(photos / "sub" / "p5.png")]


def test_info_refuses_a_file_that_is_not_a_database(tmp_path):
    blank = tmp_path / "blank.db"
    blank.touch()
    result = run("info", "--db", blank)
    assert result.exit_code == 1 and "not a lookalike database" in result.output
    assert blank.stat().st_size == 0


def test_misuse_is_one_line_on_stderr_and_a_non_zero_exit(photos, db, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cases = {
        ("index", str(photos), "--frobnicate"): "Error: No such option '--frobnicate' (see 'lookalike index --help')",
        ("query", "x.jpg", "-k", "0"): "Error: Invalid value for '-k' / '--k': 0 is not in the range x>=1 "
                                       "(see 'lookalike query --help')",
        ("query", "x.jpg", "-k", "-3"): "Error: Invalid value for '-k' / '--k': -3 is not in the range x>=1 "
                                        "(see 'lookalike query --help')",
        ("frob",): "Error: No such command 'frob' (see 'lookalike --help')",
        ("query",): "Error: Missing argument 'IMAGES...' (see 'lookalike query --help')",
        ("query", "x.jpg", "--db", str(tmp_path / "none.db")):
            f"Error: {tmp_path / 'none.db'}: no such database; run 'lookalike index' first",
        ("check", "--db", str(tmp_path / "none.db")):
            f"Error: {tmp_path / 'none.db'}: no such database; run 'lookalike index' first",
        ("index", str(photos), "--batch-size", "0"):
            "Error: Invalid value for '--batch-size': 0 is not in the range x>=1 (see 'lookalike index --help')",
    }
    for args, line in cases.items():
        # A real process: what a user sees, exit status included.
        proc = subprocess.run([sys.executable, "-c", "import cli; cli.main()", *args], cwd=repo,
                              capture_output=True, text=True)
        assert proc.returncode in (1, 2), (args, proc.stderr)
        assert proc.stderr.strip() == line, args
        assert proc.stdout == ""
    assert not db.exists()
