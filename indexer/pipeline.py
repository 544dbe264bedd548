"""Decode files in worker processes and embed them in batches of equally sized images."""
from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .decode import DEFAULT_DECODE_TIMEOUT, DEFAULT_MAX_PIXELS, PROCESS_ERRNOS, DecodeError, open_image

log = logging.getLogger(__name__)


@dataclass
class Result:
    """The outcome for one input file: a descriptor (and its local features, when the
    recipe has them), or the reason it failed."""

    index: int
    vector: np.ndarray | None
    width: int = 0
    height: int = 0
    error: str | None = None
    local: bytes | None = None


class _Files:
    """A map-style dataset of decoded files; decode failures are returned, not raised.

    Each file gets ``timeout`` seconds: __getitem__ runs in the main thread of a
    DataLoader worker process (or of this process with no workers), where the
    SIGALRM-based limit of open_image applies, so a decoder that hangs costs
    one failed file instead of a stalled worker. With ``local`` (the working
    size and keypoint count), the worker also finds the local features, in the
    grey picture of the same decode, and returns them packed.
    """

    def __init__(self, paths: Sequence[str], longest: int, max_pixels: int,
                 timeout: float | None = DEFAULT_DECODE_TIMEOUT,
                 local: tuple[int, int] | None = None):
        self.paths, self.longest, self.max_pixels = paths, longest, max_pixels
        self.timeout = timeout
        self.local = local

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple:
        return (i, *decode_one(self.paths[i], self.longest, self.max_pixels, self.timeout, self.local))


def local_spec(recipe) -> tuple[int, int] | None:
    """What decode_one needs to find ``recipe``'s local features (working size, keypoints),
    or None when it has none."""
    return (recipe.local_size, recipe.local_keypoints) if recipe.has_local else None


def decode_one(path: str, longest: int, max_pixels: int, timeout: float | None,
               local: tuple[int, int] | None) -> tuple:
    """(pixels, width, height, error, local features) for one file, as a decoding worker
    makes them; a failure is returned as its reason (or a _ProcessError), never raised.

    The time limit applies only in a main thread (see decode.time_limit): a DataLoader
    worker's, this process's with no workers, or a Ray task's.
    """
    try:
        d = open_image(path, longest, max_pixels, timeout=timeout, gray=local[0] if local else None)
        blob = None
        if local:
            from . import local as local_features

            blob = local_features.encode(local_features.extract(d.gray, local[1]))
    except DecodeError as exc:
        return None, 0, 0, str(exc), None
    except Exception as exc:  # noqa: BLE001 - a bad file must never stop the run
        if isinstance(exc, OSError) and exc.errno in PROCESS_ERRNOS:
            # Raised in the caller's process, where the DataLoader would not keep errno.
            return None, 0, 0, _ProcessError(exc.errno, exc.strerror, path), None
        return None, 0, 0, " ".join(f"{type(exc).__name__}: {exc}".split()), None
    # A NumPy array travels from the worker pickled through the worker's pipe.
    # A tensor would go through shared memory, passing a file descriptor
    # per image; short of descriptors, torch's fd passing can hang forever.
    return d.pixels, d.width, d.height, None, blob


@dataclass(frozen=True)
class _ProcessError:
    """An OSError of the decoding process (EMFILE, ...): it stops the run, it fails no file."""

    errno: int
    strerror: str
    path: str


def _identity(item):
    return item


@functools.cache
def _keep_freed_memory() -> None:
    """Let glibc keep freed blocks of up to 64 MB for reuse, instead of returning them to
    the system and faulting fresh pages in for the next batch.

    Each batch allocates and frees arrays of tens of megabytes (a batch's pixels as
    float32, the network's feature maps); above glibc's default threshold each one is
    a new mmap whose pages the kernel must zero. Keeping them cut the system time of
    an index run by 40 % and its wall time by 15 % (bench/RESULTS.md). Decoding
    processes forked after this inherit it. Elsewhere than glibc: nothing to do.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 64 << 20)
    mallopt(m_trim_threshold, 128 << 20)


def embed_files(paths: Sequence[str], encoder, *, recipe=None, batch_size: int = 32,
                workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                decode_timeout: float | None = DEFAULT_DECODE_TIMEOUT) -> Iterator[list[Result]]:
    """Yield lists of Results, in batches, until every path has one.

    ``encoder`` is an Encoder, or a function that makes one (then ``recipe``
    says what to decode): it is called once the decoding processes have
    started, so that a first run's model export overlaps their work.

    A file whose decoding takes longer than ``decode_timeout`` seconds (None:
    no limit) fails with that reason and the run goes on. An error of the
    process rather than of a file (too many open files) raises OSError.

    Images are grouped by their resized shape and a model batch only ever
    holds images of one shape: no padding, so a descriptor does not depend on
    which other images share its batch.
    """
    from torch.utils.data import DataLoader

    _keep_freed_memory()
    recipe = recipe or encoder.recipe
    dataset = _Files(paths, recipe.image_size, max_pixels, decode_timeout, local_spec(recipe))
    # Room for about 64 decoded images in flight (some 30 MB at the defaults), so that
    # the processes keep decoding while this one exports the model or writes a batch.
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                        collate_fn=_identity, prefetch_factor=max(4, 64 // workers) if workers else None,
                        persistent_workers=False)
    items = iter(loader)  # the decoding processes start here
    if callable(encoder):
        encoder = encoder()
    log.info("embedding %d files with %s", len(paths), encoder.engine)
    yield from embed_decoded(items, encoder, batch_size)


def embed_decoded(items: Iterable[tuple], encoder, batch_size: int) -> Iterator[list[Result]]:
    """Yield lists of Results for decoded ``items`` (index, pixels, width, height, error,
    local features: _Files' tuples), embedding images of one shape per model batch.

    A _ProcessError as the error raises OSError: the process failed, not the file.
    """
    buckets: dict[tuple[int, int], list] = {}
    buffered = 0
    # Bound memory when many shapes are pending: flush the largest bucket.
    limit = max(4 * batch_size, 64)

    def flush(shape) -> list[Result]:
        nonlocal buffered
        items = buckets.pop(shape)
        buffered -= len(items)
        vecs = encoder.embed(np.stack([px for _, px, _, _, _ in items]))
        return [Result(i, v, w, h, local=blob) if np.isfinite(v).all()
                else Result(i, None, error="the model gave a descriptor that is not finite")
                for (i, _, w, h, blob), v in zip(items, vecs)]

    failed: list[Result] = []
    for i, px, w, h, err, blob in items:
        if isinstance(err, _ProcessError):
            raise OSError(err.errno, err.strerror, err.path)
        if err is not None:
            failed.append(Result(i, None, error=err))
            if len(failed) >= batch_size:
                yield failed
                failed = []
            continue
        shape = px.shape[:2]
        buckets.setdefault(shape, []).append((i, px, w, h, blob))
        buffered += 1
        if len(buckets[shape]) >= batch_size:
            yield flush(shape) + failed
            failed = []
        elif buffered >= limit:
            yield flush(max(buckets, key=lambda s: len(buckets[s]))) + failed
            failed = []
    for shape in list(buckets):
        yield flush(shape) + failed
        failed = []
    if failed:
        yield failed
