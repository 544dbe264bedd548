"""Embed files on a Ray cluster with Ray Data: one model per actor, results streamed to the driver.

The driver (sync.Indexer) keeps the database: it connects (``start``), checks that
every node can read the roots (``check_roots``), then commits the Results that
``embed_files`` yields batch by batch, as it does for a local run. The run has
two stages, Ray Data's shape for batch inference: CPU tasks decode the files
(indexer.pipeline.decode_one, what a local run's decoding worker does), spread
over every CPU of the cluster; a pool of actors, one model each (a GPU each where
the cluster has them), embeds the decoded images with indexer.pipeline.embed_decoded,
the code of a local run, so a descriptor does not depend on where it was made.

Ray is imported inside the functions: ``import indexer.cluster`` works without it.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .decode import DEFAULT_DECODE_TIMEOUT, DEFAULT_MAX_PIXELS, PROCESS_ERRNOS
from .errors import first_line
from .pipeline import Result, local_spec
from .scan import display_path

log = logging.getLogger(__name__)

RAY_EXTRA = "the Ray engine needs the ray extra: pip install 'lookalike[ray]'"
# CPUs of an embedding actor, its ONNX Runtime threads. One: more models, each with one
# thread, use the CPUs better than a few models with several threads on small batches.
CPUS_PER_ACTOR = 1
# On a cluster without GPUs, 1/EMBED_CPU_SHARE of its CPUs embeds and the decode tasks
# get the rest (see _plan): a photo's decode and SIFT features cost about twice the
# model's time on one CPU (bench/raybench.py, 1600 x 1200 JPEGs: 79 ms and 38 ms a file),
# and a camera's larger JPEGs only decode longer.
EMBED_CPU_SHARE = 3
# Tasks given to an actor at once. One: a batch is decoded already, fetched in a moment,
# while a second one queued on the first actor ready would leave another idle in a small
# run; and a killed actor has only its own batch to redo.
TASKS_PER_ACTOR = 1
# Tries of a batch whose actor or decode task dies under it, after the first (Ray Data's
# default for actors is no end): a file that kills its process every time (memory, a
# decoder's crash) must stop the run, as it does a local one, rather than restart for ever.
TASK_RETRIES = 3
# Putting a block in the object store costs the driver about a millisecond and a
# half, so a large run gets fewer, larger blocks (1M files: 2000 blocks, 10 s).
MAX_BLOCKS = 2000
# How long the cluster's address may take to accept a connection.
CONNECT_TIMEOUT_S = 10.0
# How long a node may take to answer check_roots.
PROBE_TIMEOUT_S = 120.0


class ClusterError(Exception):
    """The Ray cluster cannot do the run (unreachable, cannot read a root, failed); str() is one line."""


def _ray():
    """The ray module, with Ray Data; ClusterError when it is not installed."""
    try:
        import ray
        import ray.data  # noqa: F401 - the engine needs it, so fail now rather than mid-run
    except ImportError:
        raise ClusterError(RAY_EXTRA) from None
    return ray


def _unreachable(address: str) -> str | None:
    """Why nothing answers at ``address`` (host:port, or ray://host:port), or None; other
    forms of address are left to ray.init."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return exc.strerror or first_line(exc)
    return None


def start(address: str) -> None:
    """Connect to the Ray cluster at ``address`` ("auto": $RAY_ADDRESS, else a new local
    instance), unless this process already is; ClusterError when that fails."""
    ray = _ray()
    if ray.is_initialized():
        return
    auto = address == "auto"
    where = os.environ.get("RAY_ADDRESS") if auto else address
    # ray.init retries an address where nothing listens for minutes: ask first.
    reason = _unreachable(where) if where else None
    began = time.perf_counter()
    try:
        if reason is None:
            # Worker output stays in the session's log files: the driver reports what matters.
            ray.init(address=None if auto else address, include_dashboard=False,
                     log_to_driver=False,
                     logging_level=logging.WARNING if log.isEnabledFor(logging.INFO) else logging.ERROR)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the cluster's
        reason = first_line(exc)
    if reason is not None:
        what = f"connect to the Ray cluster at {where}" if where else "start a local Ray instance"
        raise ClusterError(f"cannot {what}: {reason}")
    log.info("Ray %s in %.1f s", f"connected to {where}" if where else "started locally",
             time.perf_counter() - began)


def _probe(roots: Sequence[str]) -> tuple[str, str, str] | None:
    """On a node: (root, this node's address, reason) for the first root it cannot read."""
    import ray

    for root in roots:
        try:
            if os.path.isdir(root):
                os.listdir(root)
                if not os.access(root, os.R_OK | os.X_OK):
                    raise PermissionError(13, "Permission denied")
            else:
                with open(root, "rb"):
                    pass
        except OSError as exc:
            return root, ray.util.get_node_ip_address(), exc.strerror or first_line(exc)
    return None


def check_roots(roots: list[str]) -> None:
    """ClusterError, in one line, when a node of the cluster cannot read one of ``roots``:
    a small task on every alive node lists each root."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # The nodes that can hold an actor: a head node kept free of work needs no access.
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    # No CPU asked for: the check must run even on a cluster busy with other work.
    probe = ray.remote(num_cpus=0, max_retries=1)(_probe)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(list(roots)) for n in nodes]
    try:
        answers = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(f"a Ray node did not answer within {PROBE_TIMEOUT_S:g} s whether it "
                           "can read the folders to index") from None
    except ray.exceptions.RayError as exc:
        raise ClusterError(f"cannot check the folders on the Ray workers: {first_line(exc)}") from None
    failed = [a for a in answers if a is not None]
    if failed:
        root, node, reason = failed[0]
        more = f" (and {len(failed) - 1} more nodes)" if len(failed) > 1 else ""
        raise ClusterError(f"{display_path(root)}: not readable on the Ray worker at {node}: {reason}{more}; "
                           "the files must be on a filesystem every worker shares")
    log.debug("%d Ray nodes can read %d roots", len(nodes), len(roots))


class _ProcessError(Exception):
    """An OSError of a worker's process (EMFILE, ...), on its way to the driver: ``info`` is
    (errno, strerror, filename), kept in an attribute since Ray Data appends its own text
    to the arguments of an exception raised in a map function."""

    info: tuple[int, str, str | None] = (0, "", None)

    @classmethod
    def of(cls, errno: int, strerror: str, filename: str | None) -> "_ProcessError":
        new = cls(strerror)
        new.info = (errno, strerror, filename)
        return new


def _decode(batch: dict[str, np.ndarray], longest: int, max_pixels: int,
            timeout: float | None, local: tuple[int, int] | None) -> dict[str, np.ndarray]:
    """A Ray Data task: decode a batch of paths as a local run's decoding worker does.

    A task runs its function in the main thread of its worker process, so the decode
    time limit (SIGALRM) applies here, unlike in an actor's threads. Pixels travel as
    bytes with their shape, not as a tensor column: images of several shapes, and failed
    files without any, would give blocks of different Arrow types (see _columns).
    """
    from .pipeline import _ProcessError as ProcessErrno, decode_one

    began, rows = time.perf_counter(), []
    for path in batch["path"]:
        px, w, h, err, blob = decode_one(str(path), longest, max_pixels, timeout, local)
        if isinstance(err, ProcessErrno):  # the process's, not a file's: it stops the run
            raise _ProcessError.of(err.errno, err.strerror, err.path)
        rows.append((px, w, h, err, blob))
    shapes = [(0, 0, 3) if px is None else px.shape for px, *_ in rows]
    return {
        "index": np.asarray(batch["index"], dtype=np.int64),
        "pixels": _objects(b"" if px is None else px.tobytes() for px, *_ in rows),
        "shape": np.array(shapes, dtype=np.int64).reshape(-1, 3),
        "width": np.array([w for _, w, *_ in rows], dtype=np.int64),
        "height": np.array([h for _, _, h, *_ in rows], dtype=np.int64),
        "error": _objects(err or "" for *_, err, _ in rows),
        "local": _objects(blob or b"" for *_, blob in rows),
        "decode_s": _first_only(time.perf_counter() - began, len(rows)),
    }


def _first_only(seconds: float, n: int) -> np.ndarray:
    """A batch's time on its first row, 0 on the others: the driver sums the column."""
    out = np.zeros(n, dtype=np.float64)
    out[:1] = seconds
    return out


def _decoded(batch: dict[str, np.ndarray]) -> Iterator[tuple]:
    """The rows of a _decode batch as pipeline.embed_decoded takes them (uint8 pixels,
    as open_image gives them)."""
    for i, px, shape, w, h, err, blob in zip(batch["index"], batch["pixels"], batch["shape"],
                                             batch["width"], batch["height"], batch["error"],
                                             batch["local"]):
        pixels = np.frombuffer(px, dtype=np.uint8).reshape(shape) if not err else None
        yield int(i), pixels, int(w), int(h), str(err) or None, bytes(blob) or None


class _Embedder:
    """A Ray Data actor: builds the model once, then embeds batches of decoded images as a
    local run does.

    A failure to build the model is raised by the first call, not by the constructor:
    a constructor's error reaches the driver only as text, a call's as the exception.
    """

    def __init__(self, recipe_json: str, weights: str | None, batch_size: int, threads: int):
        began = time.perf_counter()  # with the imports: torch and ONNX Runtime take seconds
        import ray

        from .encoder import Encoder
        from .pipeline import _keep_freed_memory
        from .recipe import Recipe

        _keep_freed_memory()
        self.batch_size = batch_size
        self.encoder, self.failure = None, None
        # Ray hides the other GPUs from the actor: "cuda" is the one it was given.
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        try:
            self.encoder = Encoder(Recipe.from_json(recipe_json), weights, device, threads=threads)
        except Exception as exc:  # noqa: BLE001 - raised again by __call__
            self.failure = exc
        self.load_s = time.perf_counter() - began
        self.ready_at = time.time()  # wall clock: the driver compares it with its own

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .pipeline import embed_decoded

        if self.failure is not None:
            raise self.failure
        began = time.perf_counter()
        try:
            results = [r for rs in embed_decoded(_decoded(batch), self.encoder, self.batch_size)
                       for r in rs]
        except OSError as exc:
            if exc.errno in PROCESS_ERRNOS:  # the process's, not a file's: it stops the run
                raise _ProcessError.of(exc.errno, exc.strerror, exc.filename) from None
            raise
        ready = (self.load_s, self.ready_at)
        self.load_s, self.ready_at = 0.0, 0.0  # reported once per actor
        times = (float(batch["decode_s"].sum()), time.perf_counter() - began)
        return _columns(results, *ready, *times)


def _objects(values) -> np.ndarray:
    """A column of Python objects (bytes, str): NumPy would make fixed-width strings."""
    values = list(values)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _columns(results: list[Result], load_s: float, ready_at: float, decode_s: float,
             embed_s: float) -> dict[str, np.ndarray]:
    """Results as columns without nulls (b"" and "" stand for None): a column of nulls
    alone in a block would get another Arrow type than the same column elsewhere."""
    return {
        "index": np.array([r.index for r in results], dtype=np.int64),
        "vector": _objects(b"" if r.vector is None else np.asarray(r.vector, np.float32).tobytes()
                           for r in results),
        "width": np.array([r.width for r in results], dtype=np.int64),
        "height": np.array([r.height for r in results], dtype=np.int64),
        "error": _objects(r.error or "" for r in results),
        "local": _objects(r.local or b"" for r in results),
        "load_s": np.full(len(results), load_s, dtype=np.float64),
        "ready_at": np.full(len(results), ready_at, dtype=np.float64),
        # Time spent on the batch by its decode tasks and by this actor.
        "decode_s": _first_only(decode_s, len(results)),
        "embed_s": _first_only(embed_s, len(results)),
    }


def _results(batch: dict[str, np.ndarray]) -> list[Result]:
    """The driver's Results for a batch of columns (see _columns)."""
    out = []
    for i, vec, w, h, err, local in zip(batch["index"], batch["vector"], batch["width"],
                                         batch["height"], batch["error"], batch["local"]):
        vector = np.frombuffer(vec, dtype=np.float32).copy() if len(vec) else None
        out.append(Result(int(i), vector, int(w), int(h), str(err) or None, bytes(local) or None))
    return out


def _quiet_ray_data() -> None:
    """Ray Data's own console lines only at -v (warnings) and -vv (all): the caller shows
    progress and errors; the session's ray-data.log keeps everything."""
    level = (logging.INFO if log.isEnabledFor(logging.DEBUG)
             else logging.WARNING if log.isEnabledFor(logging.INFO) else logging.CRITICAL)
    # Only Ray's own console handlers: the application's (and a test runner's) may be on
    # that logger too, and are not Ray's to quiet.
    theirs = set(logging.getLogger().handlers)
    for handler in logging.getLogger("ray.data").handlers:
        if (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
                and handler not in theirs):
            handler.setLevel(level)
    from ray.util.debug import log_once

    # Ray Data warns once that its progress bars are off; they are off on purpose.
    log_once("ray_data_progress_manager_disabled")


@dataclass(frozen=True)
class _Plan:
    """How a run uses the cluster: the embedding actors and the decode tasks beside them."""

    actors: int
    actor_cpus: int  # CPUs each actor holds (its ONNX Runtime threads on a CPU cluster)
    gpus: bool  # one GPU per actor
    decoders: int  # decode tasks at once
    blocks: int  # blocks of paths, one decode task each
    embed_batch: int  # decoded rows an actor gets at once


def _plan(cpus: int, gpus: int, files: int, batch_size: int) -> _Plan:
    """One actor per GPU; without GPUs a third of the CPUs (EMBED_CPU_SHARE) embeds. The
    decode tasks get the other CPUs: the actors never hold them all, since an actor
    waiting for decoded images that no task can make would wait for ever (2 CPUs: one
    actor, one decode task; 1 CPU: the actor holds none and shares it)."""
    actors = min(gpus or max(1, cpus // EMBED_CPU_SHARE), files)
    actor_cpus = CPUS_PER_ACTOR if actors * CPUS_PER_ACTOR < cpus else 0
    decoders = max(1, cpus - actors * actor_cpus)
    # A batch per block, but at least a block per decode task the cluster runs at once,
    # so that a small run is decoded in parallel too (no padding: smaller batches give
    # the same descriptors).
    blocks = min(max(math.ceil(files / batch_size), min(files, decoders)), MAX_BLOCKS)
    # And a small run is shared by the actors: a batch each, not one for the first.
    embed_batch = max(1, min(batch_size, math.ceil(files / actors)))
    return _Plan(actors, actor_cpus, bool(gpus), decoders, blocks, embed_batch)


def _dataset(ray, paths: Sequence[str], recipe, weights, batch_size: int, max_pixels: int,
             decode_timeout: float | None):
    """The lazy Dataset of Results columns: the paths in small blocks, decoded by CPU tasks,
    embedded by a pool of actors."""
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the caller has its own
    ctx.raise_original_map_exception = True  # an OSError arrives as one, errno and all
    resources = ray.cluster_resources()
    plan = _plan(int(resources.get("CPU", 1)), int(resources.get("GPU", 0)), len(paths), batch_size)
    log.info("embedding %d files on Ray: %d actors (%s), %d decode tasks at once, %d blocks",
             len(paths), plan.actors, "1 GPU each" if plan.gpus else f"{plan.actor_cpus} CPU each",
             plan.decoders, plan.blocks)
    items = [{"index": i, "path": p} for i, p in enumerate(paths)]
    ds = ray.data.from_items(items, override_num_blocks=plan.blocks)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates remote arguments here, yet has no other way to bound retries.
        warnings.simplefilter("ignore", DeprecationWarning)
        # Tasks, not actors: they spread over every CPU the actors leave free, each in the
        # main thread of its process, where the decode time limit works.
        ds = ds.map_batches(_decode, batch_size=None, batch_format="numpy", num_cpus=1,
                            compute=TaskPoolStrategy(size=plan.decoders), max_retries=TASK_RETRIES,
                            fn_kwargs=dict(longest=recipe.image_size, max_pixels=max_pixels,
                                           timeout=decode_timeout, local=local_spec(recipe)))
        # A dead actor is restarted (max_restarts -1, Ray Data's default) and its batch retried.
        return ds.map_batches(
            _Embedder, batch_size=plan.embed_batch, batch_format="numpy",
            compute=ActorPoolStrategy(size=plan.actors, max_tasks_in_flight_per_actor=TASKS_PER_ACTOR),
            fn_constructor_kwargs=dict(recipe_json=recipe.to_json(),
                                       weights=None if weights is None else os.fspath(weights),
                                       batch_size=batch_size, threads=max(1, plan.actor_cpus)),
            num_cpus=plan.actor_cpus, num_gpus=1 if plan.gpus else 0,
            max_restarts=-1, max_task_retries=TASK_RETRIES)


def _failure(ray, exc: BaseException) -> BaseException:
    """What the driver raises for a failed Ray run: an OSError of a worker's process as an
    OSError (sync stops and says where), an error of our code as itself, else ClusterError."""
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else None
    if isinstance(cause, _ProcessError):
        return OSError(*cause.info)
    if cause is not None and not isinstance(cause, ray.exceptions.RayError):
        if cause.args and isinstance(cause.args[0], str):  # without the lines Ray Data added
            cause.args = (cause.args[0].splitlines()[0],) + cause.args[1:]
        return cause
    if isinstance(exc, (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)):
        return ClusterError(f"a Ray worker kept dying on the same batch of files (out of memory, "
                            f"or a crash while decoding): {first_line(exc)}; the images committed "
                            "so far are kept")
    return ClusterError(f"the Ray run failed: {first_line(exc)}; the images committed so far "
                        "are kept, run again to finish")


def embed_files(paths: Sequence[str], recipe, *, weights=None, batch_size: int = 32,
                max_pixels: int = DEFAULT_MAX_PIXELS,
                decode_timeout: float | None = DEFAULT_DECODE_TIMEOUT) -> Iterator[list[Result]]:
    """Yield lists of Results (``index``: position in ``paths``), in any order, until every
    path has exactly one; a file that fails has a Result with the reason, as locally
    (a decode that takes longer than ``decode_timeout`` seconds too)."""
    if not paths:
        return
    ray = _ray()
    _quiet_ray_data()
    began, began_at = time.perf_counter(), time.time()
    ds = _dataset(ray, paths, recipe, weights, batch_size, max_pixels, decode_timeout)
    seen = np.zeros(len(paths), dtype=bool)
    first, in_first = None, 0
    decode_s = embed_s = 0.0
    try:
        # Streamed: Ray Data's executor stops feeding actors while results wait here. No
        # prefetch: with it, each batch waited here for the next one to be ready.
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            if batch["load_s"].max(initial=0.0) > 0:  # an actor's first batch
                log.info("a Ray actor was ready %.1f s after the start (its model took %.1f s)",
                         batch["ready_at"].max() - began_at, batch["load_s"].max())
            # A retried task could deliver a batch twice: every path gets one Result.
            results = [r for r in _results(batch) if not seen[r.index]]
            if len(results) < len(batch["index"]):
                log.debug("Ray delivered %d results twice", len(batch["index"]) - len(results))
            seen[[r.index for r in results]] = True
            decode_s += float(batch["decode_s"].sum())
            embed_s += float(batch["embed_s"].sum())
            if first is None:
                first, in_first = time.perf_counter(), len(results)
                log.info("first results from Ray after %.1f s", first - began)
            if results:
                yield results
    except ray.exceptions.RayError as exc:
        raise _failure(ray, exc) from None
    if not seen.all():
        raise ClusterError(f"Ray returned no result for {int((~seen).sum())} of {len(paths)} files; "
                           "run again to embed them")
    done = time.perf_counter()
    rate = (f", {(len(paths) - in_first) / (done - first):.1f} files/s after the first results"
            if len(paths) > in_first and done > first else "")
    log.info("embedded %d files on Ray in %.1f s%s", len(paths), done - began, rate)
    log.info("Ray stages: decode tasks %.1f s (%.1f ms a file), embedding actors %.1f s "
             "(%.1f ms a file)", decode_s, 1000 * decode_s / len(paths), embed_s,
             1000 * embed_s / len(paths))
