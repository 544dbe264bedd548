"""Crash safety under fault injection, CI-sized (bench/reliability.py runs the same at scale).

``lookalike index`` runs as a subprocess on a folder that changes before every trial; it is
SIGKILLed at a chosen moment (an event counted inside the process: a SQLite COMMIT, a
pipeline batch, the FAISS write, a rename, ...; or a random time), or made to fail with a
real I/O error (RLIMIT_FSIZE: EFBIG; RLIMIT_NOFILE: EMFILE). After the faulty run the
committed state must be intact; after a clean rerun every good image on disk must be in the
database and in the FAISS file exactly once, with the descriptor of a fresh computation,
and every bad file recorded as failed. See tests/fault_harness.py.

The trials of ``lookalike index`` run on a SQLite file and on a PostgreSQL database
($LOOKALIKE_TEST_POSTGRES; skipped without it), but for those about SQLite's own files or
about what is not the database (SQLITE_ONLY); the other commands' tests run on SQLite.

Run with -v to see the table of trials.
"""
from __future__ import annotations

import numpy as np
import pytest
from fault_harness import EVENTS, TABLE_HEAD, Harness, Outcome, kill, limit, timed

from conftest import index_agrees_with_db

SEED = 3
EFBIG = "File too large"
EMFILE = "Too many open files"

# (name, fault class, faults, options for Harness.trial, what the failed run must say)
TRIALS = [
    ("after scan", "kill", [kill("scanned")], {}),
    ("after hashing", "kill", [kill("hashed")], {}),
    ("before COMMIT of the scan's changes", "kill", [kill("commit", 1)], {}),
    ("after commit of the scan's changes", "kill", [kill("committed", 1)], {}),
    ("first batch embedded, not stored", "kill", [kill("batch", 1)], {}),
    ("first local features, row written, not committed", "kill", [kill("local", 1)], {}),
    ("mid-batch, between two images' local features", "kill", [kill("local", 3)], {}),
    ("before COMMIT of the first batch", "kill", [kill("commit", 2)], {}),
    ("after commit of the first batch", "kill", [kill("committed", 2)], {}),
    ("second batch embedded, not stored", "kill", [kill("batch", 2)], {}),
    ("after commit of the second batch", "kill", [kill("committed", 3)], {}),
    ("all committed, FAISS not written", "kill", [kill("save")], {}),
    ("FAISS temp file half written", "kill", [kill("faiss-write", how="midway")], {}),
    ("FAISS temp file written, not renamed", "kill", [kill("faiss-written")], {}),
    ("before the FAISS rename", "kill", [kill("replace:faiss")], {}),
    ("FAISS renamed, sidecar not written", "kill", [kill("replaced:faiss")], {}),
    ("sidecar temp written, not renamed", "kill", [kill("replace:meta")], {}),
    ("sidecar renamed, before exit", "kill", [kill("replaced:meta")], {}),
    ("at database close (WAL checkpoint)", "kill", [kill("close")], {}),
    ("in the rebuild of a stale FAISS file", "kill",
     [kill("save"), kill("faiss-write", how="midway")], {}),
    ("in the run recovering from a kill", "kill", [kill("committed", 2), kill("batch", 1)], {}),
    ("new db: after the migration commit", "kill", [kill("committed", 1)], {"fresh_db": True}),
    ("new db: after the recipe commit", "kill", [kill("committed", 2)], {"fresh_db": True}),
    ("new db: mid first run", "kill", [kill("batch", 3)], {"fresh_db": True}),
    ("new db: first local features", "kill", [kill("local", 1)], {"fresh_db": True}),
    ("new db: mid-migration (tables made, no version)", "kill", [kill("ddl", 3)], {"fresh_db": True}),
    ("ONNX export: graph half written", "kill", [kill("onnx-exported", how="midway")],
     {"cache": "empty"}),
    ("ONNX export: graph written, before its rename", "kill", [kill("replace:onnx")],
     {"cache": "empty"}),
    ("random time 1", "timed kill", [timed()], {}),
    ("random time 2", "timed kill", [timed()], {}),
    ("random time 3", "timed kill", [timed()], {}),
    ("EFBIG writing the FAISS file", "I/O", [limit("fsize", "save", value=4096)], {}, EFBIG),
    ("EFBIG writing the sidecar", "I/O", [limit("fsize", "replaced:faiss")], {}, EFBIG),
    ("EFBIG in the WAL mid-run", "I/O",
     [limit("fsize", "committed", 2, relative=True)], {}, "disk I/O error"),
    ("new db: EFBIG from the start", "I/O",
     [limit("fsize", "main", value=160_000)], {"fresh_db": True}, "disk I/O error"),
    ("EMFILE creating the FAISS temp file", "I/O", [limit("nofile", "save")], {}, EMFILE),
    ("EMFILE while hashing", "I/O",
     [dict(limit("nofile", "scanned"), spec={**limit("nofile", "scanned")["spec"],
                                             "preload": ["faiss"]})], {}, EMFILE),
]


# Trials whose point is SQLite's own files, or not the database at all: run on SQLite only.
SQLITE_ONLY = {
    "at database close (WAL checkpoint)": "a server has no WAL file to checkpoint",
    "EFBIG in the WAL mid-run": "a server's writes are the server's, not this process's",
    "new db: EFBIG from the start": "a server's writes are the server's, not this process's",
    "ONNX export: graph half written": "about the ONNX cache, not the database (and the FAISS file "
                                       "of a server database lives in that cache)",
    "ONNX export: graph written, before its rename": "about the ONNX cache, not the database",
    # RLIMIT_NOFILE at 0 keeps the files already open usable, but not a connection to a
    # server: poll() refuses any descriptor past the limit (EINVAL), so psycopg cannot wait
    # on its socket; hashing begins with a query, which fails so, not with EMFILE.
    "EMFILE while hashing": "at RLIMIT_NOFILE 0 psycopg cannot poll its socket",
}
SERVER_TRIALS = [t for t in TRIALS if t[0] not in SQLITE_ONLY]


def _points(faults) -> list[str]:
    return [f"{f['spec']['kill']['at']}#{f['spec']['kill']['n']}" + (
        "/midway" if f["spec"]["kill"]["how"] == "midway" else "")
            for f in faults if "kill" in f.get("spec", {})]


def test_the_trials_cover_enough_moments():
    points = {(p, bool(t[3].get("fresh_db"))) for t in TRIALS for p in _points(t[2])}
    assert len(points) >= 23
    assert {p.split("#")[0] for p, _ in points} >= {
        "commit", "committed", "faiss-write", "batch", "replace:faiss", "replaced:faiss", "scanned",
        "ddl", "onnx-exported", "local"}
    assert sum(t[1] == "I/O" for t in TRIALS) >= 2
    assert all(e in EVENTS for e in {p.split("#")[0] for p, _ in points})
    assert set(SQLITE_ONLY) <= {t[0] for t in TRIALS}
    # On a server too: kills before and after its commits, in a new database and an old one.
    server = {(p, bool(t[3].get("fresh_db"))) for t in SERVER_TRIALS for p in _points(t[2])}
    assert {p.split("#")[0] for p, _ in server} >= {"commit", "committed", "ddl", "local", "batch",
                                                   "faiss-write", "replace:faiss"}
    assert {fresh for p, fresh in server if p.startswith("committed")} == {False, True}


OUTCOMES: dict[str, list[Outcome]] = {}  # by backend, for the table -v prints


def _harness(tmp_path_factory, request, backend: str, server: str | None = None):
    """A Harness on ``backend`` with its baseline run; its table printed at the end with -v."""
    h = Harness(tmp_path_factory.mktemp(f"faults-{backend}"), seed=SEED, server=server)
    outcomes = OUTCOMES.setdefault(backend, [])
    try:
        base = h.baseline()
        assert base.survived, base.row()
        outcomes.append(base)
        yield h
    finally:
        h.close()
    if request.config.option.verbose > 0:
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"\n{backend}:\n" + TABLE_HEAD)
            for out in outcomes:
                print(out.row())


@pytest.fixture(scope="module")
def harness(tmp_path_factory, request):
    """The trials' Harness on a SQLite file."""
    yield from _harness(tmp_path_factory, request, "sqlite")


@pytest.fixture(scope="module")
def pg_harness(tmp_path_factory, request, pg_server):
    """The trials' Harness on new databases of the PostgreSQL server (dropped at the end)."""
    yield from _harness(tmp_path_factory, request, "postgresql", pg_server)


def _check(out: Outcome, faults, message: str | None, backend: str = "sqlite") -> None:
    OUTCOMES.setdefault(backend, []).append(out)
    assert out.survived, out.row()
    if any(f.get("expect_kill") for f in faults):
        assert out.killed, out.row()
    if message:
        assert out.hit and message in out.error, out.row()
        assert out.lost == 0


def _trial(h: Harness, trial, tmp_path, backend: str) -> None:
    name, fault, faults, options, *message = trial
    if options.get("cache") == "empty":  # the child exports the model into it
        options = dict(options, cache=tmp_path / "cache")
    out = h.trial(name, fault, faults, **options)
    _check(out, faults, message[0] if message else None, backend)


@pytest.mark.parametrize("trial", TRIALS, ids=[t[0] for t in TRIALS])
def test_fault(harness, trial, tmp_path):
    _trial(harness, trial, tmp_path, "sqlite")


@pytest.mark.parametrize("trial", SERVER_TRIALS, ids=[t[0] for t in SERVER_TRIALS])
def test_fault_on_postgresql(pg_harness, trial, tmp_path):
    """The same trials on a server: its commits are psycopg's, its FAISS file in the cache."""
    _trial(pg_harness, trial, tmp_path, "postgresql")


def test_a_first_run_on_a_server_killed_at_each_of_its_commits(pg_server, tmp_path):
    """Into a new PostgreSQL database (migration, database id, recipe, the scan's changes,
    each batch), ``lookalike index`` is killed before and after each of its commits: the
    committed state is intact, and the run after it finishes with every image exactly once,
    in the database and in a FAISS file that agrees with it."""
    h = Harness(tmp_path, seed=SEED + 14, images=8, server=pg_server)
    try:
        probe = h.run()
        assert probe.rc == 0, probe.stderr
        commits = probe.events["commit"]
        assert commits >= 5 and probe.events["committed"] == commits, probe.events
        h.refs.encoder()
        same = {"add": 0, "modify": 0, "delete": 0, "rename": 0}  # the folder as it is
        for event in ("commit", "committed"):
            for n in range(1, commits + 1):
                out = h.trial(f"{event}#{n}", "kill", [kill(event, n)], mutate=same, fresh_db=True)
                _check(out, [kill(event, n)], None, "postgresql")
                assert out.in_db == out.expected == out.in_faiss, out.row()
                assert len(index_agrees_with_db(h.db)) == out.expected
    finally:
        h.close()


def test_emfile_while_decoding(tmp_path):
    """Too many open files while decoding is the process's failure, not the files': the run
    stops with the reason and the next run embeds them."""
    h = Harness(tmp_path, seed=SEED + 2, images=8)
    assert h.baseline().survived
    out = h.trial("EMFILE while decoding", "I/O", [limit("nofile", "batch", 1)],
                  mutate={"add": 6, "modify": 0, "delete": 0, "rename": 0})
    _check(out, [], EMFILE)


def test_repair_of_local_features_killed_midway(tmp_path):
    """check --repair rewrites missing and damaged local features with their rows, in one
    transaction: killed while writing them, it changes nothing, and the next repair mends all."""
    import sqlite3

    h = Harness(tmp_path, seed=SEED + 4, images=10)
    assert h.baseline().survived
    with sqlite3.connect(h.db) as con:
        ids = [r[0] for r in con.execute("select image_id from local_features order by image_id")]
        con.execute("delete from local_features where image_id in (?, ?)", ids[:2])
        con.execute("update local_features set data = substr(data, 1, 40) where image_id = ?", (ids[2],))
    damaged, *_ = h.read_db()
    killed = h.run({"kill": {"at": "local", "n": 2, "how": "now"}}, verb="repair")
    assert killed.killed, killed.stderr
    rows, _, _, problems = h.read_db()
    assert not problems
    assert {i: (r["embedding"], r["local"]) for i, r in rows.items()} == {
        i: (r["embedding"], r["local"]) for i, r in damaged.items()}
    fixed = h.run(verb="repair")
    assert fixed.rc == 0, fixed.stderr
    assert "3 problems, all fixed" in fixed.stdout, fixed.stdout
    out = Outcome("after the repair", "none")
    h.check_complete(out, h.run())
    assert out.survived, out.row()


def _whitening(db) -> str | None:
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        row = con.execute("select value from settings where key = 'whitening'").fetchone()
    return row[0] if row else None


def test_tuning_killed_at_each_of_its_writes_loses_nothing(tmp_path):
    """``lookalike tune`` embeds the labelled images, then stores the learned whitening in one
    commit: killed at any moment, the images are as they were and the whitening is the old one
    or the new one, whole; the next tune finishes, and check and an index run find all in order."""
    from click.testing import CliRunner

    from cli import main
    from conftest import labelled_set
    from indexer.whitening import Whitening

    h = Harness(tmp_path, seed=SEED + 6, images=10)
    assert h.baseline().survived
    h.labelled = labelled_set(tmp_path / "labelled")
    rows, *_ = h.read_db()
    old = _whitening(h.db)
    probe = h.run(verb="tune")  # a clean tune tells which moments it has
    assert probe.rc == 0, probe.stderr
    learned = Whitening.from_json(_whitening(h.db))
    assert learned.kind == "learned" and old != _whitening(h.db)

    def intact(text: str | None) -> bool:
        """The whitening before the run, or the one it learns (each run stamps its own time)."""
        if text == old:
            return True
        w = Whitening.from_json(text)
        return np.array_equal(w.projection, learned.projection) and np.array_equal(w.mean, learned.mean)

    points = [(e, n) for e in ("batch", "commit", "committed", "replace:meta", "replaced:meta", "close")
              for n in range(1, probe.events.get(e, 0) + 1)]
    assert {e for e, _ in points} >= {"batch", "commit", "committed", "replace:meta", "close"}, probe.events
    for event, n in points:
        killed = h.run({"kill": {"at": event, "n": n, "how": "now"}}, verb="tune")
        assert killed.killed, (event, n, killed.stderr)
        now, _, _, problems = h.read_db()
        assert not problems and now == rows, (event, n)
        assert intact(_whitening(h.db)), (event, n)
        finished = h.run(verb="tune")
        assert finished.rc == 0, (event, n, finished.stderr)
        result = CliRunner().invoke(main, ["check", "--db", str(h.db)])
        assert result.exit_code == 0, (event, n, result.output)
    out = Outcome("after tuning killed", "kill")
    h.check_complete(out, h.run())
    assert out.survived, out.row()


def test_finetuning_killed_leaves_the_old_descriptors_or_the_new_ones_whole(tmp_path):
    """``tune --method finetune`` on a database that holds images embeds them all again beside
    the old ones, then swaps in one commit: killed at any moment, the recipe and every
    descriptor are all old or all new, and the next index run finishes the move."""
    import shutil

    from click.testing import CliRunner

    from cli import main
    from conftest import labelled_set

    h = Harness(tmp_path, seed=SEED + 8, images=8)
    assert h.baseline().survived
    h.labelled = labelled_set(tmp_path / "labelled", groups=12)
    pristine = tmp_path / "pristine"
    shutil.copytree(h.db.parent, pristine)
    rows, _, recipe, _ = h.read_db()

    def restore() -> None:
        shutil.rmtree(h.db.parent)
        shutil.copytree(pristine, h.db.parent)

    probe = h.run(verb="tune", extra=["--method", "finetune", "--epochs", "1"])
    assert probe.rc == 0, probe.stderr
    commits = probe.events["commit"]
    points = [("batch", 1), ("batch", probe.events["batch"]), ("commit", 1), ("committed", 1),
              ("commit", commits), ("committed", commits), ("replace:faiss", 1)]
    moved_by_index = 0  # trials killed with the move under way, which the index run finished
    for event, n in points:
        restore()
        killed = h.run({"kill": {"at": event, "n": n, "how": "now"}}, verb="tune",
                       extra=["--method", "finetune", "--epochs", "1"])
        assert killed.killed, (event, n, killed.stderr)
        now, _, recipe_now, problems = h.read_db()
        assert not problems, (event, n, problems)
        if recipe_now == recipe:
            assert now == rows, (event, n)
        else:
            assert all(now[i]["embedding"] != r["embedding"] and now[i]["local"] == r["local"]
                       for i, r in rows.items() if r["status"] == "ok"), (event, n)
        finished = h.run()  # an index run finishes what the killed tune began
        assert finished.rc == 0, (event, n, finished.stderr)
        result = CliRunner().invoke(main, ["check", "--db", str(h.db), "--all"])
        assert result.exit_code == 0, (event, n, result.output)
        moved_by_index += recipe_now == recipe != h.read_db()[2]
    assert moved_by_index >= 2


def test_a_new_vector_index_killed_at_each_of_its_moments_leaves_a_whole_one(tmp_path):
    """Turning the exact index into a compressed one (train on a sample, add every vector,
    tune nprobe, write the file and its sidecar) killed at any moment: the database is as
    it was, the file on disk is the old one or the new one, whole, and the next run
    finishes the change; check and a complete run find all in order."""
    from click.testing import CliRunner

    from cli import main

    h = Harness(tmp_path, seed=SEED + 10, images=20)
    assert h.baseline().survived
    rows, *_ = h.read_db()
    ivf = ["--index", "PCAR8,IVF2,PQ2x4"]
    probe = h.run(extra=ivf)
    assert probe.rc == 0, probe.stderr
    points = [(e, n) for e in ("trained", "save", "faiss-write", "replace:faiss", "replaced:faiss",
                                "replace:meta") for n in range(1, probe.events.get(e, 0) + 1)]
    assert {e for e, _ in points} >= {"trained", "replace:faiss", "replace:meta"}, probe.events
    for event, n in points:
        assert h.run(extra=["--index", "exact"]).rc == 0
        killed = h.run({"kill": {"at": event, "n": n, "how": "now"}}, extra=ivf)
        assert killed.killed, (event, n, killed.stderr)
        now, _, _, problems = h.read_db()
        assert not problems and now == rows, (event, n)
        _, _, _, torn = h.read_faiss()
        assert torn is None, (event, n, torn)
        finished = h.run(extra=ivf)
        assert finished.rc == 0, (event, n, finished.stderr)
        result = CliRunner().invoke(main, ["check", "--db", str(h.db)])
        assert result.exit_code == 0, (event, n, result.output)
        assert "PCAR8,IVF2,PQ2x4" in result.output, (event, n, result.output)
    out = Outcome("new vector index killed", "kill")
    h.check_complete(out, h.run())
    assert out.survived, out.row()


def test_an_import_killed_at_each_commit_keeps_whole_batches_and_the_next_finishes(tmp_path):
    """``lookalike import`` commits rows in batches: killed at any commit, the rows committed
    are whole, and importing again finishes with every row exactly once."""
    from click.testing import CliRunner

    from cli import main

    h = Harness(tmp_path, seed=SEED + 12, images=12)
    assert h.baseline().survived
    h.parquet = tmp_path / "rows.parquet"
    assert CliRunner().invoke(main, ["export", "--db", str(h.db), str(h.parquet)]).exit_code == 0
    source, *_ = h.read_db()
    want = {r["path"]: r["embedding"] for r in source.values() if r["status"] == "ok"}
    h.db = tmp_path / "imported.db"
    probe = h.run(verb="import")
    assert probe.rc == 0, probe.stderr
    points = [(e, n) for e in ("commit", "committed", "save", "replace:faiss", "replace:meta")
              for n in range(1, probe.events.get(e, 0) + 1)]
    for event, n in points:
        for p in h.db.parent.glob(h.db.name + "*"):
            p.unlink()
        killed = h.run({"kill": {"at": event, "n": n, "how": "now"}}, verb="import")
        assert killed.killed, (event, n, killed.stderr)
        finished = h.run(verb="import")
        assert finished.rc == 0, (event, n, finished.stderr)
        rows, _, _, problems = h.read_db()
        assert not problems, (event, n, problems)
        assert {r["path"]: r["embedding"] for r in rows.values()} == want, (event, n)
        result = CliRunner().invoke(main, ["check", "--db", str(h.db), "--sample", "0"])
        assert result.exit_code == 0, (event, n, result.output)


def test_a_contact_sheet_killed_or_short_of_disk_is_the_old_one_or_the_new_one_whole(tmp_path):
    """``duplicates --html`` writes only its sheet, atomically: killed before or after the
    rename, the sheet is the previous one or the new one, whole; with the disk full it
    fails in one line and leaves the previous one; the database is never touched."""
    h = Harness(tmp_path, seed=SEED + 11, images=6)
    assert h.baseline().survived
    rows = h.read_db()[0]
    first = h.run(verb="duplicates")
    assert first.rc == 0 and first.events["replaced:html"] == 1, first.stderr
    old = h.sheet.read_bytes()
    assert old.rstrip().endswith(b"</html>")
    before = h.run({"kill": {"at": "replace:html", "n": 1, "how": "now"}}, verb="duplicates")
    assert before.killed and h.sheet.read_bytes() == old
    after = h.run({"kill": {"at": "replaced:html", "n": 1, "how": "now"}}, verb="duplicates")
    assert after.killed
    new = h.sheet.read_bytes()
    assert new.rstrip().endswith(b"</html>")
    temps = set(h.sheet.parent.glob(".groups.html.*.tmp"))  # the killed runs' own
    # From the last connection's close on (the sheet is written after the search is done).
    full = h.run({"limit": {"kind": "fsize", "at": "close", "n": first.events["close"], "value": 1000}},
                 verb="duplicates")
    assert full.rc == 1 and h.sheet.read_bytes() == new, full.stderr
    assert len(full.stderr.strip().splitlines()) == 1 and "groups.html" in full.stderr, full.stderr
    assert set(h.sheet.parent.glob(".groups.html.*.tmp")) == temps  # the failed one removed its own
    assert h.read_db()[0] == rows
