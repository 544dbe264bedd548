"""Decode files in worker processes and embed them in batches of equally sized images."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .decode import DEFAULT_DECODE_TIMEOUT, DEFAULT_MAX_PIXELS, PROCESS_ERRNOS, DecodeError, open_image

log = logging.getLogger(__name__)


@dataclass
class Result:
    """The outcome for one input file: a descriptor, or the reason it failed."""

    index: int
    vector: np.ndarray | None
    width: int = 0
    height: int = 0
    error: str | None = None


class _Files:
    """A map-style dataset of decoded files; decode failures are returned, not raised.

    Each file gets ``timeout`` seconds: __getitem__ runs in the main thread of a
    DataLoader worker process (or of this process with no workers), where the
    SIGALRM-based limit of open_image applies, so a decoder that hangs costs
    one failed file instead of a stalled worker.
    """

    def __init__(self, paths: Sequence[str], longest: int, max_pixels: int,
                 timeout: float | None = DEFAULT_DECODE_TIMEOUT):
        self.paths, self.longest, self.max_pixels = paths, longest, max_pixels
        self.timeout = timeout

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            d = open_image(self.paths[i], self.longest, self.max_pixels, timeout=self.timeout)
        except DecodeError as exc:
            return i, None, 0, 0, str(exc)
        except Exception as exc:  # noqa: BLE001 - a bad file must never stop the run
            if isinstance(exc, OSError) and exc.errno in PROCESS_ERRNOS:
                # Raised in the caller's process, where the DataLoader would not keep errno.
                return i, None, 0, 0, _ProcessError(exc.errno, exc.strerror, self.paths[i])
            return i, None, 0, 0, " ".join(f"{type(exc).__name__}: {exc}".split())
        # A NumPy array travels from the worker pickled through the worker's pipe.
        # A tensor would go through shared memory, passing a file descriptor
        # per image; short of descriptors, torch's fd passing can hang forever.
        return i, d.pixels, d.width, d.height, None


@dataclass(frozen=True)
class _ProcessError:
    """An OSError of the decoding process (EMFILE, ...): it stops the run, it fails no file."""

    errno: int
    strerror: str
    path: str


def _identity(item):
    return item


def embed_files(paths: Sequence[str], encoder, *, batch_size: int = 32, workers: int = 0,
                max_pixels: int = DEFAULT_MAX_PIXELS,
                decode_timeout: float | None = DEFAULT_DECODE_TIMEOUT) -> Iterator[list[Result]]:
    """Yield lists of Results, in batches, until every path has one.

    A file whose decoding takes longer than ``decode_timeout`` seconds (None:
    no limit) fails with that reason and the run goes on. An error of the
    process rather than of a file (too many open files) raises OSError.

    Images are grouped by their resized shape and a model batch only ever
    holds images of one shape: no padding, so a descriptor does not depend on
    which other images share its batch.
    """
    from torch.utils.data import DataLoader

    dataset = _Files(paths, encoder.recipe.image_size, max_pixels, decode_timeout)
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                        collate_fn=_identity, prefetch_factor=4 if workers else None,
                        persistent_workers=False)
    buckets: dict[tuple[int, int], list] = {}
    buffered = 0
    # Bound memory when many shapes are pending: flush the largest bucket.
    limit = max(4 * batch_size, 64)

    def flush(shape) -> list[Result]:
        nonlocal buffered
        items = buckets.pop(shape)
        buffered -= len(items)
        vecs = encoder.embed(np.stack([px for _, px, _, _ in items]))
        return [Result(i, v, w, h) if np.isfinite(v).all()
                else Result(i, None, error="the model gave a descriptor that is not finite")
                for (i, _, w, h), v in zip(items, vecs)]

    failed: list[Result] = []
    for i, px, w, h, err in loader:
        if isinstance(err, _ProcessError):
            raise OSError(err.errno, err.strerror, err.path)
        if err is not None:
            failed.append(Result(i, None, error=err))
            if len(failed) >= batch_size:
                yield failed
                failed = []
            continue
        shape = px.shape[:2]
        buckets.setdefault(shape, []).append((i, px, w, h))
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
