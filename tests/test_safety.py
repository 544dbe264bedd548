"""Safe by construction: nothing unpickled, no shell, weights loaded as tensors only."""
from __future__ import annotations

import ast
import pickle
import sqlite3
from pathlib import Path

from click.testing import CliRunner

from cli import main

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for part in ("indexer", "search", "migrations", "bench") for p in (REPO / part).rglob("*.py")]
SOURCES.append(REPO / "cli.py")


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_unpickling_no_shell_no_eval_in_the_product():
    found = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "marshal", "shelve", "dill", "joblib") for n in names):
                    found.append(f"{path}:{node.lineno}: imports a pickle-like module")
        for node, name in _calls(tree):
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name in ("eval", "exec", "os.system", "os.popen", "pickle.load", "pickle.loads"):
                found.append(f"{path}:{node.lineno}: {name}")
            if keywords.get("shell") == "True":
                found.append(f"{path}:{node.lineno}: shell=True")
            if name.endswith("torch.load") and keywords.get("weights_only") != "True":
                found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
    assert not found, found
    assert len(SOURCES) > 10


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_weights_file_that_would_run_code_is_refused_unrun(photos, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    result = CliRunner().invoke(main, ["index", str(photos), "--db", str(tmp_path / "x.db"),
                                       "--model", "resnet50", "--weights", str(evil)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {evil}: not a PyTorch weights file (UnpicklingError)"
    assert not marker.exists()


def test_the_database_stores_paths_and_image_facts_only(photos, tmp_path):
    db = tmp_path / "x.db"
    assert CliRunner().invoke(main, ["index", str(photos), "--db", str(db), "--workers", "0"]).exit_code == 0
    with sqlite3.connect(db) as con:
        columns = {r[1] for r in con.execute("pragma table_info(images)")}
        settings = {r[0] for r in con.execute("select key from settings")}
        tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
        local = {r[1] for r in con.execute("pragma table_info(local_features)")}
    assert columns == {"id", "path", "size", "mtime_ns", "sha256", "width", "height", "status", "error",
                       "embedding", "indexed_at"}
    assert settings == {"recipe", "generation"}
    # Local features are keypoint positions and descriptors, packed (indexer.local), by image id.
    assert local == {"image_id", "data"}
    # retuned holds descriptors only while a fine-tuned recipe is being swapped in (indexer.retune).
    assert tables - {"sqlite_sequence"} == {"images", "settings", "alembic_version", "local_features", "retuned"}
