"""Embedding on Ray (indexer.cluster), in local mode: the same database as a local run, a
worker killed mid-run costs nothing, an unreachable cluster or unreadable root fails in one
line before anything is written, and `lookalike index --ray` works."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import save_photo
from indexer import Indexer, cluster
from indexer.store import Store

if os.environ.get("LOOKALIKE_REQUIRE_RAY") == "1":
    import ray  # CI requires the Ray tests: a missing ray fails them
    import ray.data  # noqa: F401
else:
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'lookalike[ray]'")
    pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'lookalike[ray]'")

REPO = Path(__file__).resolve().parents[1]
# Ray Data copies its context, deprecated fields and all: its warnings, not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


def test_import_needs_no_ray():
    code = "import sys, indexer.cluster; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_missing_ray_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(cluster.ClusterError) as err:
        cluster.start("auto")
    assert str(err.value) == "the Ray engine needs the ray extra: pip install 'lookalike[ray]'"


def test_unreachable_cluster_is_one_line():
    if ray.is_initialized():
        pytest.skip("Ray is already running in this process; start() would not connect")
    with pytest.raises(cluster.ClusterError) as err:
        cluster.start("127.0.0.1:1")
    assert str(err.value) == "cannot connect to the Ray cluster at 127.0.0.1:1: Connection refused"


@pytest.mark.parametrize("cpus, gpus, files, want", [
    (2, 0, 100, (1, 1, 1)),  # CI's local mode: one actor, one decode task beside it
    (1, 0, 100, (1, 0, 1)),  # the actor holds no CPU: the decode task must find one
    (16, 0, 1000, (5, 1, 11)),  # a third of the CPUs embeds, the rest decodes
    (32, 4, 1000, (4, 1, 28)),  # one actor per GPU, with a CPU each
    (16, 0, 2, (2, 1, 14)),  # a small run: no more actors than files
])
def test_plan_leaves_cpus_to_decode(cpus, gpus, files, want):
    plan = cluster._plan(cpus, gpus, files, batch_size=32)
    assert (plan.actors, plan.actor_cpus, plan.decoders) == want
    assert plan.actors * plan.actor_cpus < cpus  # never every CPU: decoding would wait for ever
    assert plan.gpus == bool(gpus) and 1 <= plan.embed_batch <= 32


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module (its start takes seconds). Workers inherit this
    process's environment, and with it the tests' model cache."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Photos of three shapes and formats, one in a subfolder, and a file that is no image."""
    root = tmp_path_factory.mktemp("ray") / "photos"
    for i in range(7):
        save_photo(root / f"p{i}.jpg", seed=i, size=(96, 64) if i % 3 else (64, 96), quality=92)
    save_photo(root / "sub" / "wide.png", seed=20, size=(160, 48))
    save_photo(root / "sub" / "p7.jpg", seed=7, quality=92)
    (root / "bad.jpg").write_bytes(b"not an image")
    return root


def snapshot(db: Path) -> dict:
    """What a run left in ``db``: per path, its descriptor, size, checksum and local features,
    or its failure reason."""
    store = Store(db, create=False)
    try:
        vectors = {int(i): v for ids, vecs in store.embeddings() for i, v in zip(ids, vecs)}
        records = store.records(vectors)
        local = store.local_features(vectors)
        ok = {r.path: (vectors[i], r.width, r.height, r.sha256, local.get(i)) for i, r in records.items()}
        return {"ok": ok, "failed": dict(store.failures())}
    finally:
        store.close()


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got["ok"]) == sorted(want["ok"])
    assert got["failed"] == want["failed"]
    for path, (vec, *facts, local) in want["ok"].items():
        g_vec, *g_facts, g_local = got["ok"][path]
        np.testing.assert_allclose(g_vec, vec, atol=1e-5, err_msg=path)
        assert g_facts == facts, path
        assert local is not None and g_local == local, path  # the same decode: the same SIFT


def counts(s) -> tuple:
    return s.added, s.updated, s.moved, s.removed, s.unchanged, s.failed, s.embedded, sorted(s.failures)


@pytest.fixture(scope="module")
def local_run(folder, tmp_path_factory):
    """The reference: the folder indexed in this process, with local features."""
    db = tmp_path_factory.mktemp("local") / "index.db"
    summary = Indexer(db, workers=0, local_features="sift").index([folder])
    assert summary.failed == 1 and summary.embedded == 9
    return counts(summary), snapshot(db)


def test_ray_run_matches_local_run(ray_local, folder, local_run, tmp_path):
    db = tmp_path / "index.db"
    summary = Indexer(db, ray="auto", workers=0, local_features="sift", batch_size=4).index([folder])
    assert counts(summary) == local_run[0]
    assert_same(snapshot(db), local_run[1])
    # A second run finds nothing to embed, as after a local run.
    again = Indexer(db, ray="auto", workers=0).index([folder])
    assert (again.unchanged, again.failed, again.embedded) == (9, 1, 0)


def _embed_actors(since_ms: float) -> list[dict]:
    """The embedding actors alive now and started since ``since_ms`` (not an earlier run's)."""
    # ray.util.state needs the dashboard, which the fixture leaves off: ask the GCS.
    from ray._private import state

    return [a for a in state.actors().values() if a["State"] == "ALIVE"
            and "_Embedder" in a["ActorClassName"] and a["StartTime"] >= since_ms]


def test_killed_worker_loses_nothing(ray_local, folder, local_run, tmp_path):
    """SIGKILL an embedding actor once the first batch is committed (its queued batches
    with it): Ray Data restarts it and retries them, and every file ends up once."""
    killed = []
    began_ms = time.time() * 1000

    def progress(done: int, total: int) -> None:
        if done and not killed:
            actors = _embed_actors(began_ms)
            assert actors, "no embedding actor alive"
            os.kill(actors[0]["Pid"], signal.SIGKILL)
            killed.append(actors[0]["ActorID"])

    db = tmp_path / "index.db"
    summary = Indexer(db, ray="auto", workers=0, local_features="sift", batch_size=1).index(
        [folder], progress=progress)
    from ray._private import state

    assert killed and state.actors()[killed[0]]["NumRestarts"] >= 1
    assert counts(summary) == local_run[0]
    assert_same(snapshot(db), local_run[1])


def test_root_unreadable_on_a_worker(ray_local, tmp_path):
    missing = tmp_path / "elsewhere"
    with pytest.raises(cluster.ClusterError) as err:
        cluster.check_roots([str(tmp_path), str(missing)])
    assert str(err.value) == (
        f"{missing}: not readable on the Ray worker at {ray.util.get_node_ip_address()}: "
        "No such file or directory; the files must be on a filesystem every worker shares")


def test_unreadable_root_stops_the_run_before_any_write(ray_local, folder, tmp_path, monkeypatch):
    """A root the driver reads but a worker does not: one line, and no database is made."""
    def probe(roots):  # nested, so Ray ships it by value to the worker
        return roots[0], "192.0.2.9", "Permission denied"

    monkeypatch.setattr(cluster, "_probe", probe)
    db = tmp_path / "index.db"
    with pytest.raises(cluster.ClusterError, match="not readable on the Ray worker at 192.0.2.9"):
        Indexer(db, ray="auto").index([folder])
    assert not db.exists()


def test_worker_error_arrives_as_itself(ray_local, folder):
    """Weights a worker cannot find: the worker's BackboneError, in one line, not Ray's trace."""
    from indexer.backbone import BackboneError, resolve_weights
    from indexer.recipe import make_recipe

    recipe = make_recipe("efficientnet_lite0", weights_sha256=resolve_weights("efficientnet_lite0")[1])
    with pytest.raises(BackboneError) as err:
        list(cluster.embed_files([str(folder / "p0.jpg")], recipe, weights="/nowhere/w.pth"))
    assert str(err.value) == "/nowhere/w.pth: weights file not found"


def test_cli_index_with_ray(ray_local, folder, tmp_path):
    from click.testing import CliRunner

    from cli import main

    db = tmp_path / "index.db"
    result = CliRunner().invoke(main, ["index", str(folder), "--db", str(db), "--ray"])
    assert result.exit_code == 0, result.output
    assert "9 added" in result.output and "1 failed" in result.output
    assert len(snapshot(db)["ok"]) == 9


def _slow_png(path: Path, side: int) -> Path:
    """A real PNG of ``side`` x ``side`` grey zeros: a few hundred KB on disk, and about a
    second of Pillow's chunked decoding, which the time limit can stop midway."""
    import struct
    import zlib

    z = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_decode_time_limit_applies_on_ray(ray_local, folder, tmp_path):
    """Decode tasks run in the main thread of their process, where the SIGALRM time limit
    works: a file that decodes too long fails with the reason, the others get descriptors."""
    from indexer.backbone import resolve_weights
    from indexer.recipe import make_recipe

    recipe = make_recipe("efficientnet_lite0", weights_sha256=resolve_weights("efficientnet_lite0")[1],
                         image_size=64)
    slow = _slow_png(tmp_path / "slow.png", 13_000)  # 169 megapixels, under the default guard
    paths = [str(folder / "p0.jpg"), str(slow), str(folder / "p1.jpg"), str(folder / "sub" / "wide.png")]
    start = time.monotonic()
    results = {r.index: r for batch in cluster.embed_files(paths, recipe, batch_size=2, decode_timeout=0.3)
               for r in batch}
    assert sorted(results) == [0, 1, 2, 3]
    assert results[1].vector is None and results[1].error == "decoding took longer than 0.3 s"
    for i in (0, 2, 3):
        assert results[i].error is None and results[i].vector.shape == (recipe.dim,), results[i].error
    assert time.monotonic() - start < 60
