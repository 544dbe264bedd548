"""The vector index: the one module that touches FAISS.

It is derived from the database (indexer.store, which keeps every full
descriptor) and kept next to it, with a sidecar JSON saying which database
generation, whitening and layout it holds; when they disagree it is rebuilt.
Vectors go in whitened, so searches use them as they are.

Two tiers (``choose``): exact inner-product search while the collection is
small, then an IVF index of 4-bit PQ codes, whose shortlist is re-ranked by
the exact cosine of the stored descriptors, so scores stay those of exact
search. Searchers open an IVF file memory-mapped (FAISS maps the lists of
8-bit codes; it reads 4-bit "fast scan" lists whole).
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .atomic import write_atomically
from .store import Store

log = logging.getLogger(__name__)

EXACT, AUTO = "exact", "auto"
# Auto keeps exact search up to this many images: exact scores, and a search over
# 100,000 descriptors still takes 40 to 80 ms on 2 cores (README, "Large collections").
EXACT_MAX = 100_000
# The index's size in RAM that auto stays within (codes and ids; --memory).
DEFAULT_MEMORY = 4 << 30
# Sub-quantizers of the 4-bit PQ codes (m / 2 bytes a vector): the most that fit the
# budget and divide the dimension. 4-bit codes are scanned with SIMD ("fast scan"),
# ten times faster than 8-bit ones, and train in seconds (bench/SCALE.md).
PQ_CHOICES = (256, 128, 64, 32, 16)
HNSW_LISTS = 4096  # more lists than this are found by an HNSW graph (cheaper to assign), fewer by a scan
# A compressed index is trained again once the collection is this many times
# the size it was trained at.
RETRAIN_FACTOR = 4
TARGET_RECALL = 0.95  # recall@10 against exact search that nprobe is tuned to reach
RERANK = 256  # shortlist re-ranked by exact cosines
RECALL_QUERIES = 256
TRAIN_PER_LIST, TRAIN_MAX = 40, 262_144
SMALL_FILTER = 2_000  # a filter this narrow is searched exactly, over its own vectors (~40 ms at 1,000)


class IndexChoiceError(ValueError):
    """An index choice FAISS cannot build; str() says why."""


@dataclass(frozen=True)
class Layout:
    """What an index is: ``key`` ("exact" or a FAISS factory string) and, for a
    compressed one, the collection size it was trained at, the nprobe tuned for
    it and the recall@10 that reached."""

    key: str = EXACT
    trained_on: int = 0
    nprobe: int = 0
    recall: float | None = None

    @property
    def exact(self) -> bool:
        return self.key == EXACT


def parse_memory(text: str) -> int:
    """Bytes from '4G', '512M', '2GiB' or a plain number; ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a size (for example 4G or 512M)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def choose(count: int, dim: int, choice: str = AUTO, memory: int = DEFAULT_MEMORY,
           current: Layout | None = None) -> str:
    """The index key for ``count`` vectors of ``dim`` dims, as ``choice`` asks.

    "auto": exact while the collection is at most EXACT_MAX images and fits
    ``memory`` as float32; past that, an IVF of 4-bit PQ codes, the largest
    codes that fit. A compressed index goes back to exact only below half of
    that size, so that a collection near the line does not flip at each run.
    """
    if choice != AUTO:
        return choice
    limit = EXACT_MAX // 2 if current is not None and not current.exact else EXACT_MAX
    if count <= limit and count * dim * 4 <= memory:
        return EXACT
    nlist = nlist_for(count)
    coarse = f"IVF{nlist}_HNSW32" if nlist > HNSW_LISTS else f"IVF{nlist}"
    fits = [m for m in PQ_CHOICES if dim % m == 0]
    if not fits:  # a dimension no choice divides: a rotation to one that is
        return f"PCAR256,{coarse},PQ128x4fs" if dim > 256 else f"{coarse},Flat"
    m = next((m for m in fits if count * (m // 2 + 8) <= memory), fits[-1])
    return f"{coarse},PQ{m}x4fs"


def nlist_for(count: int) -> int:
    """Inverted lists for ``count`` vectors: a power of two near 4 sqrt(count)."""
    return int(min(65536, max(16, 2 ** round(math.log2(4 * math.sqrt(max(count, 1)))))))


def index_path(db: Path) -> Path:
    return db.with_name(db.name + ".faiss")


def _meta_path(db: Path) -> Path:
    return db.with_name(db.name + ".faiss.json")


def whitening_mark(store: Store) -> str:
    """What the vectors in the index were whitened with: changes when the whitening does."""
    return hashlib.sha256((store.whitening_setting() or "").encode()).hexdigest()[:16]


class VectorIndex:
    """Whitened descriptors searchable by database id: exact, or IVF codes re-ranked
    by the stored descriptors. Made by ``load`` or ``build``; searches may run in
    several threads, changes only in the writer."""

    def __init__(self, index, layout: Layout, store: Store, whitening, dim: int):
        self._index = index
        self.layout = layout
        self.store = store
        self.whitening = whitening
        self.dim = dim  # of the raw descriptors (the recipe's)
        self.generation: int | None = None  # the database generation it holds, when loaded
        self._gpu = None
        self._hnsw = _hnsw_quantizer(index)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def stored_dim(self) -> int:
        """Dimensions of the vectors the FAISS index was made for."""
        return int(self._index.d)

    @property
    def space_dim(self) -> int:
        """Dimensions of the vectors searched (whitening may reduce them)."""
        return self.whitening.dim if self.whitening is not None else self.dim

    def space(self, raw: np.ndarray) -> np.ndarray:
        """Raw descriptors as the index holds them: whitened, L2-normalised, float32."""
        from .pooling import l2n

        raw = np.atleast_2d(np.asarray(raw, dtype=np.float32))
        x = self.whitening.apply(raw) if self.whitening is not None else l2n(raw)
        return np.ascontiguousarray(x, dtype=np.float32)

    def add(self, ids, raw: np.ndarray) -> None:
        """Add raw descriptors under their database ids (not already present)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids):
            self._index.add_with_ids(self.space(raw), ids)
            self._gpu = None

    def remove(self, ids) -> None:
        ids = np.asarray(list(ids), dtype=np.int64)
        if len(ids):
            import faiss

            self._index.remove_ids(faiss.IDSelectorBatch(ids))
            self._gpu = None

    def ids(self) -> np.ndarray:
        """Every id the index holds (a pass over an IVF's lists)."""
        import faiss

        if self.layout.exact:
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)
        ivf = faiss.extract_index_ivf(self._index)
        lists = ivf.invlists
        out = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
               for i in range(ivf.nlist) if lists.list_size(i)]
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def vectors(self, ids) -> np.ndarray:
        """Whitened full vectors of ``ids`` (len(ids) x space_dim); zeros for an id the
        database no longer holds. Exact: from the index; IVF: from the database."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return np.zeros((0, self.space_dim), np.float32)
        if self.layout.exact:
            return self._index.reconstruct_batch(ids)
        found = self.store.vectors_by_id(ids)
        out = np.zeros((len(ids), self.space_dim), np.float32)
        have = [j for j, i in enumerate(ids) if int(i) in found]
        if have:
            out[have] = self.space(np.stack([found[int(ids[j])] for j in have]))
        return out

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None = None,
               nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(cosines, ids), N x k, best first, for queries ``q`` already in the index's space
        (``space``); -1 ids pad rows with fewer results. ``allowed``: only these ids
        (a sorted int64 array); k results whenever that many are indexed."""
        q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
        k = max(1, min(int(k), len(self) if allowed is None else len(allowed)))
        if not len(self) or (allowed is not None and not len(allowed)):
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if allowed is not None and not self.layout.exact and len(allowed) <= SMALL_FILTER:
            return self._among(q, k, allowed)
        if self.layout.exact:
            return self._exact(q, k, allowed)
        return self._ivf(q, k, allowed, nprobe or self.layout.nprobe)

    def neighbours(self, ids: np.ndarray, k: int, allowed: np.ndarray | None = None, batch: int = 2048):
        """Each of ``ids``' ``k`` nearest images besides itself (among ``allowed``), searched
        a batch at a time: yields (ids, cosines, neighbour ids) per batch, rows as ``search``
        gives them (the image itself may be among them: the caller drops it)."""
        ids = np.asarray(ids, dtype=np.int64)
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            yield (chunk, *self.search(self.vectors(chunk), k + 1, allowed))

    def _among(self, q: np.ndarray, k: int, allowed: np.ndarray):
        """Exact search over the stored descriptors of ``allowed`` (those indexed)."""
        found = self.store.vectors_by_id(allowed)
        if not found:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        ids = np.fromiter(found, np.int64, len(found))
        return _top(q @ self.space(np.stack(list(found.values()))).T, ids, k)

    def _exact(self, q: np.ndarray, k: int, allowed: np.ndarray | None):
        import faiss

        if allowed is not None:
            return self._index.search(q, k, params=faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed)))
        # FAISS on the GPU answers at most 2048 neighbours; the CPU copy has no limit.
        index = self._gpu if self._gpu is not None and k <= 2048 else self._index
        return index.search(q, k)

    def _ivf(self, q: np.ndarray, k: int, allowed: np.ndarray | None, nprobe: int):
        """The IVF's shortlist, re-ranked by exact cosines. With a filter, more lists are
        visited (sqrt(1 / the share it keeps) times), and a row left with fewer than k
        results widens the search (4 x nprobe) until it has them."""
        import faiss

        nlist = faiss.extract_index_ivf(self._index).nlist
        sel = faiss.IDSelectorBatch(allowed) if allowed is not None else None
        if allowed is not None:
            # The k best of a filter lie further out than the k best of all: visit more lists,
            # the more the rarer the filter (cheap: the selector skips the codes of others).
            nprobe *= math.ceil(math.sqrt(len(self) / max(1, len(allowed))))
        while True:
            params = faiss.SearchParametersIVF(nprobe=min(nprobe, nlist), sel=sel)
            if self._hnsw:  # the graph must look at least as far as the lists wanted
                params.quantizer_params = faiss.SearchParametersHNSW(efSearch=max(64, 2 * nprobe))
            if isinstance(self._index, faiss.IndexPreTransform):
                params = faiss.SearchParametersPreTransform(index_params=params)
            _, ids = self._index.search(q, max(RERANK, k), params=params)
            if allowed is None or nprobe >= nlist or (ids >= 0).sum(axis=1).min() >= k:
                break
            nprobe *= 4
        return self._reranked(q, ids, k)

    def _reranked(self, q: np.ndarray, ids: np.ndarray, k: int):
        unique = np.unique(ids[ids >= 0])
        vecs = self.vectors(unique)
        # An id the database no longer holds (a reader's older file) has no vector: drop it.
        held = np.any(vecs != 0, axis=1)
        unique, vecs = unique[held], vecs[held]
        ids = np.where(np.isin(ids, unique), ids, -1)
        where = {int(i): j for j, i in enumerate(unique)}
        scores = np.full((len(q), k), -np.inf, np.float32)
        out = np.full((len(q), k), -1, np.int64)
        for row, irow in enumerate(ids):
            kept = irow[irow >= 0]
            if len(kept):
                s, i = _top(q[row:row + 1] @ vecs[[where[int(i)] for i in kept]].T, kept, k)
                scores[row, :s.shape[1]], out[row, :i.shape[1]] = s[0], i[0]
        return scores, out

    def to_device(self, device: str) -> "VectorIndex":
        """Search an exact index on the GPU when ``device`` is CUDA and FAISS sees one. A
        compressed index stays memory-mapped on the CPU."""
        import faiss

        if (not self.layout.exact or not device.startswith("cuda") or not hasattr(faiss, "get_num_gpus")
                or not faiss.get_num_gpus()):
            return self
        try:
            self._gpu = faiss.index_cpu_to_all_gpus(self._index)
        except Exception as exc:  # noqa: BLE001 - fall back to CPU search, which is exact too
            log.warning("FAISS could not move the index to the GPU (%s); searching on the CPU", exc)
        return self

    def augmented(self, dba: int, alpha: float) -> "VectorIndex":
        """An exact index in memory whose vectors are each replaced by the alpha-weighted
        sum of itself and its ``dba`` nearest neighbours (database-side augmentation)."""
        from .pooling import l2n

        if not self.layout.exact:
            raise ValueError("database-side augmentation (dba) needs an exact index; this "
                             f"collection has {self.layout.key}")
        ids = self.ids()
        x = self.vectors(ids)
        if len(ids) > 1:
            sims, nn = self.search(x, dba + 1)  # the first is the image itself
            order = np.argsort(ids)
            nn = order[np.searchsorted(ids[order], nn)]
            w = np.maximum(sims, 0) ** alpha
            x = l2n((x[nn] * w[..., None]).sum(axis=1)).astype(np.float32)
        out = VectorIndex(_new_faiss(EXACT, self.space_dim), self.layout, self.store, self.whitening, self.dim)
        out._index.add_with_ids(np.ascontiguousarray(x), ids)
        out.generation = self.generation
        return out

    def describe(self) -> dict:
        """What the index is, for ``info`` and ``check``."""
        return {"key": self.layout.key, "vectors": len(self), "dims": self.space_dim,
                **{k: v for k, v in asdict(self.layout).items() if k != "key"}}


def _top(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row of ``sims`` (N x len(ids)), best first, as (scores, ids)."""
    k = min(k, sims.shape[1])
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.tile(
        np.arange(sims.shape[1]), (len(sims), 1))
    order = np.take_along_axis(part, np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1), axis=1)
    return (np.take_along_axis(sims, order, axis=1).astype(np.float32),
            np.asarray(ids, np.int64)[order])


def _new_faiss(key: str, dim: int):
    """An empty FAISS index for ``key``: exact inner product with ids, or a factory key that
    must describe an IVF (ids stored in its lists, removable)."""
    import faiss

    if key == EXACT:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    try:
        # L2 on unit vectors ranks as cosine does, and survives PCA's centring.
        index = faiss.index_factory(dim, key, faiss.METRIC_L2)
    except RuntimeError as exc:
        raise IndexChoiceError(f"{key!r}: FAISS cannot build it ({_faiss_reason(exc)})") from None
    try:
        _no_tables(faiss.extract_index_ivf(index))
    except RuntimeError:
        raise IndexChoiceError(f"{key!r}: not an IVF index; use 'exact', 'auto' or a FAISS key "
                               "with IVF (for example IVF4096,PQ128x4fs)") from None
    return index


def _no_tables(ivf) -> None:
    """No precomputed PQ distance tables: they take nlist x M x 2^bits floats (512 MB for
    4096 lists of 128 8-bit codes), all made at open, to save a little per query."""
    import faiss

    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)):
        ivf.use_precomputed_table = -1


def _hnsw_quantizer(index) -> bool:
    import faiss

    if isinstance(index, faiss.IndexIDMap2):
        return False
    return isinstance(faiss.downcast_index(faiss.extract_index_ivf(index).quantizer), faiss.IndexHNSW)


def _read_index(path: Path, mmap: bool = False):
    """A FAISS file, memory-mapped if asked, never with precomputed tables."""
    import faiss

    index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE
                             | (faiss.IO_FLAG_MMAP if mmap else 0))
    if not isinstance(index, faiss.IndexIDMap2):
        _no_tables(faiss.extract_index_ivf(index))
    return index


def _faiss_reason(exc: Exception) -> str:
    """The reason in a FAISS error, without the C++ function and source line before it."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    m = re.search(r" at \S+:\d+: (.*)$", lines[-1])
    return (m.group(1) if m else lines[-1].split("Error: ")[-1]).strip()


# -- building -----------------------------------------------------------------
def build(store: Store, key: str) -> VectorIndex:
    """A new index of every descriptor the database holds; an IVF is first trained on a
    sample of them, and its nprobe tuned on others."""
    recipe = store.recipe()
    whitening = store.whitening()
    space_dim = whitening.dim if whitening is not None else recipe.dim
    index = VectorIndex(_new_faiss(key, space_dim), Layout(key), store, whitening, recipe.dim)
    if key == EXACT:
        _fill(index)
        return index
    ids = store.ok_ids()
    rng = np.random.default_rng(len(ids))
    ivf_lists = _nlist(index)
    size = min(len(ids), max(TRAIN_PER_LIST * ivf_lists, 16_384), TRAIN_MAX)
    shuffled = rng.permutation(ids)
    train, rest = np.sort(shuffled[:size]), shuffled[size:]
    log.info("training the vector index %s on %d of %d images", key, len(train), len(ids))
    _train(index, train)
    _fill(index)
    held_out = rest[:RECALL_QUERIES] if len(rest) >= RECALL_QUERIES // 4 else shuffled[:RECALL_QUERIES]
    nprobe, recall = tune(index, np.sort(held_out))
    index.layout = Layout(key, trained_on=len(ids), nprobe=nprobe, recall=recall)
    log.info("vector index %s: nprobe %d reaches recall@10 %.3f", key, nprobe, recall)
    return index


def _nlist(index: VectorIndex) -> int:
    import faiss

    return int(faiss.extract_index_ivf(index._index).nlist)


def _train(index: VectorIndex, ids: np.ndarray) -> None:
    found = index.store.vectors_by_id(ids)
    x = index.space(np.stack([found[int(i)] for i in ids if int(i) in found]))
    try:
        index._index.train(x)
    except RuntimeError as exc:
        raise IndexChoiceError(f"{index.layout.key!r} cannot be trained on {len(x)} images "
                               f"({_faiss_reason(exc)}); use 'exact' or fewer lists and codes") from None


def _fill(index: VectorIndex) -> None:
    """Add every stored descriptor, read in chunks (memory bounded by the chunk)."""
    for ids, vecs in index.store.embeddings():
        index.add(ids, vecs)


def tune(index: VectorIndex, query_ids: np.ndarray) -> tuple[int, float]:
    """The smallest power-of-two nprobe whose recall@10 against exact search, for the
    stored descriptors ``query_ids`` as queries, reaches TARGET_RECALL; and that recall."""
    q = index.vectors(query_ids)
    truth = _others(exact_neighbours(index, q, 11), query_ids)
    nlist, nprobe = _nlist(index), 1
    while True:
        recall = _recall(_others(index.search(q, 11, nprobe=nprobe)[1], query_ids), truth)
        if recall >= TARGET_RECALL or nprobe >= nlist:
            return nprobe, recall
        nprobe *= 2


def measure_recall(index: VectorIndex, queries: int = RECALL_QUERIES, seed: int = 0) -> float | None:
    """Recall@10 against exact search for a sample of the stored descriptors as queries
    (None for an exact index: 1 by construction)."""
    if index.layout.exact or not len(index):
        return None
    ids = index.store.ok_ids()
    pick = np.sort(np.random.default_rng(seed).choice(ids, min(queries, len(ids)), replace=False))
    q = index.vectors(pick)
    return _recall(_others(index.search(q, 11)[1], pick), _others(exact_neighbours(index, q, 11), pick))


def _others(found: np.ndarray, query_ids: np.ndarray, k: int = 10) -> np.ndarray:
    """Each row's first ``k`` ids other than the query's own: a stored vector finds itself
    first, which would flatter the recall of every index."""
    out = np.full((len(found), k), -1, np.int64)
    for row, (ids, own) in enumerate(zip(found, query_ids)):
        kept = ids[(ids != own) & (ids >= 0)][:k]
        out[row, :len(kept)] = kept
    return out


def nearest_rows(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, row numbers): each row's ``k`` rows of ``x`` with the largest inner
    product, itself among them, best first; an exact search of ``x`` against itself."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index.search(x, max(1, min(k, len(x))))


def exact_neighbours(index: VectorIndex, q: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact k nearest stored descriptors of each query, by a streaming pass
    over the database (memory bounded by a chunk)."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for ids, vecs in index.store.embeddings():
        s = np.concatenate([best_s, q @ index.space(vecs).T], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(ids, (len(q), len(ids)))], axis=1)
        best_s, pos = _top(s, np.arange(s.shape[1]), min(k, s.shape[1]))
        best_i = np.take_along_axis(i, pos, axis=1)
    return best_i


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth))
    return hits / max(1, int((truth >= 0).sum()))


# -- the choice, kept in the database ------------------------------------------
def stored_choice(store: Store) -> tuple[str, int]:
    """The index choice and memory budget this database was given (auto, DEFAULT_MEMORY)."""
    with store.session() as s:
        text = store.get_setting(s, "vector_index")
    data = json.loads(text) if text else {}
    return data.get("choice", AUTO), int(data.get("memory", DEFAULT_MEMORY))


def set_choice(store: Store, choice: str | None, memory: int | None, dim: int) -> tuple[str, int]:
    """Keep the choice and budget given (None: as before) for this and later runs;
    IndexChoiceError for a key FAISS cannot build for ``dim`` dims."""
    old_choice, old_memory = stored_choice(store)
    choice = old_choice if choice is None else choice
    memory = old_memory if memory is None else memory
    if choice not in (AUTO, EXACT):
        _new_faiss(choice, dim)  # refuse a bad key before any work
    if (choice, memory) != (old_choice, old_memory):
        with store.session(write=True) as s:
            store.set_setting(s, "vector_index", json.dumps({"choice": choice, "memory": memory}))
            s.commit()
    return choice, memory


def maintain(store: Store, index: VectorIndex, asked: bool = False) -> VectorIndex:
    """``index``, or a new one when the choice calls for another kind (the collection
    crossed the exact tier's line, ``asked`` for a new choice) or a compressed index
    has outgrown its training (RETRAIN_FACTOR x). The caller holds the writer's lock
    and saves what this returns."""
    choice, memory = stored_choice(store)
    n, layout = len(index), index.layout
    key = choose(n, index.space_dim, choice, memory, layout)
    if choice == AUTO and not asked and not layout.exact and key != EXACT and layout.trained_on:
        key = layout.key  # auto keeps a trained IVF until it is outgrown (not one of unknown key)
    outgrown = not layout.exact and n > RETRAIN_FACTOR * max(1, layout.trained_on)
    if key == layout.key and not outgrown:
        return index
    log.warning("building a new vector index %s for %d images (it was %s%s)", key, n, layout.key,
                f", trained on {layout.trained_on}" if outgrown else "")
    return build(store, key)


# -- the file next to the database ---------------------------------------------
def _read_meta(store: Store) -> dict:
    try:
        meta = json.loads(_meta_path(store.path).read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def is_current(store: Store) -> bool:
    """Whether the file on disk claims the database's generation, count and whitening (cheap)."""
    meta = _read_meta(store)
    if not meta:
        return not store.count("ok") and not index_path(store.path).exists()
    return (index_path(store.path).exists() and meta.get("generation") == store.generation()
            and meta.get("count") == store.count("ok") and meta.get("whitening") == whitening_mark(store))


def read(store: Store, mmap: bool = False) -> tuple[VectorIndex | None, dict, str | None]:
    """The index on disk as it is (None if absent or unreadable), its sidecar, and why it
    does not match the database (None: it does)."""
    path, meta = index_path(store.path), _read_meta(store)
    recipe = store.recipe()
    if not path.exists():
        return None, meta, "no FAISS index on disk" if store.count("ok") else None
    known = {f.name for f in fields(Layout)}
    layout = (Layout(**{k: v for k, v in meta["layout"].items() if k in known})
              if isinstance(meta.get("layout"), dict) else Layout())
    try:
        raw = _read_index(path, mmap and not layout.exact)
    except Exception as exc:  # noqa: BLE001 - unreadable or partial file
        return None, meta, f"unreadable ({_faiss_reason(exc)})"
    whitening = store.whitening()
    index = VectorIndex(raw, layout, store, whitening, recipe.dim)
    count, generation = store.count("ok"), store.generation()
    if layout.exact != _is_exact(raw):  # killed between writing the file and its sidecar
        layout = _inferred(raw)
        return VectorIndex(raw, layout, store, store.whitening(), recipe.dim), meta, \
            "its sidecar describes another kind of index"
    if meta.get("whitening") != whitening_mark(store):
        return index, meta, "its vectors were whitened otherwise (or by an older lookalike)"
    if meta.get("generation") != generation:
        return index, meta, f"it is at generation {meta.get('generation')}, the database at {generation}"
    if index.stored_dim != index.space_dim or raw.ntotal != count:
        return index, meta, f"it holds {raw.ntotal} vectors of {raw.d} dims, the database {count} of {index.space_dim}"
    return index, meta, None


def _inferred(raw) -> Layout:
    """What a FAISS file is when its sidecar does not say: exact, or an IVF of unknown key
    searched with an eighth of its lists (until the next run builds the one chosen)."""
    import faiss

    if _is_exact(raw):
        return Layout()
    return Layout("IVF (sidecar lost)", nprobe=max(1, faiss.extract_index_ivf(raw).nlist // 8))


def _is_exact(raw) -> bool:
    import faiss

    return isinstance(raw, faiss.IndexIDMap2)


def load(store: Store, dim: int | None = None, save_rebuilt: bool = True, mmap: bool = False,
         stale_ok: bool = False, expected: bool = False) -> VectorIndex:
    """The vector index for ``store``, read from disk if it matches the database, else rebuilt.

    ``mmap``: map a compressed index's file rather than read it (searchers).
    ``stale_ok``: an older state of the database is good enough if its whitening
    is the current one (a reader while an index run is under way). A rebuilt
    index is written back only if ``save_rebuilt`` (the caller holds the
    writer's lock). ``expected``: the caller changed what the vectors are (a rebuild is
    no news). ``dim`` is unused (the recipe's).
    """
    generation = store.generation()
    index, meta, why = read(store, mmap=mmap)
    if index is not None:
        index.generation = meta.get("generation")
    if why is None and index is not None:
        return index
    if (stale_ok and index is not None and meta.get("whitening") == whitening_mark(store)
            and index.stored_dim == index.space_dim):
        log.info("%s: searching the vector index of an earlier state while an index run is under way",
                 store.name)
        return index
    if why:
        (log.info if expected else log.warning)("rebuilding the vector index from the database: %s", why)
    index = _rebuilt(store, index, meta)
    index.generation = generation
    if save_rebuilt:
        try:
            save(store, index, generation)
        except OSError as exc:  # a read-only folder: search from memory all the same
            log.warning("cannot write the FAISS index of %s: %s", store.name, exc.strerror or exc)
    return index


def _rebuilt(store: Store, old: VectorIndex | None, meta: dict) -> VectorIndex:
    """Every stored vector again: into ``old``'s trained IVF when it is still good for
    them (same whitening and dims), else into a new index of the choice."""
    if (old is not None and not old.layout.exact and meta.get("whitening") == whitening_mark(store)
            and old.stored_dim == old.space_dim):
        raw = _read_index(index_path(store.path))  # in memory, writable
        raw.reset()
        index = VectorIndex(raw, old.layout, store, old.whitening, old.dim)
        _fill(index)
        return index
    return rebuild(store)


def rebuild(store: Store) -> VectorIndex:
    """A new index of the database's choice, trained afresh (every vector changed)."""
    choice, memory = stored_choice(store)
    whitening = store.whitening()
    dim = whitening.dim if whitening is not None else store.recipe().dim
    count = store.count("ok")
    # Nothing to train on yet: exact until an index run has added images.
    key = choose(count, dim, choice, memory) if count else EXACT
    try:
        return build(store, key)
    except IndexChoiceError as exc:  # a kept choice this collection cannot take: search all the same
        log.warning("%s; searching exactly until an index run is given another --index", exc)
        return build(store, EXACT)


def save(store: Store, index: VectorIndex, generation: int) -> None:
    """Write the index and its sidecar atomically (temp file, then rename).

    The caller holds the writer's lock, so temp files found next to the index
    were left by a writer that was killed: they are removed. Raises OSError.
    """
    with store.local_files_lock():
        on_disk = _read_meta(store).get("generation")
        if store.is_server and isinstance(on_disk, int) and generation < on_disk <= store.generation():
            # Another process of this machine saved a later state of the shared database.
            return
        _write(store, index, generation)


def _write(store: Store, index: VectorIndex, generation: int) -> None:
    import faiss

    path, meta_path = index_path(store.path), _meta_path(store.path)
    for stale in temp_files(store):
        stale.unlink(missing_ok=True)

    def write_index(tmp):
        try:
            faiss.write_index(index._index, tmp)
        except RuntimeError as exc:  # FAISS reports a failed write as "... (File too large)"
            raise _os_error(exc) from None

    write_atomically(path, write_index)
    # Written second: a crash in between leaves an old generation, which
    # only costs a rebuild on the next open.
    recipe = store.recipe()
    # The recipe travels with the vectors, so a changed recipe in the database shows.
    meta = json.dumps({"generation": generation, "count": len(index), "dim": index.space_dim,
                       "whitening": whitening_mark(store), "layout": asdict(index.layout),
                       "recipe": recipe.to_json() if recipe else None})
    write_atomically(meta_path, lambda tmp: Path(tmp).write_text(meta))


def update(store: Store, expected: bool = True) -> None:
    """After commits that did not go through an index run's vector index (the whitening,
    every vector, an import): bring the file in line, in the kind the collection now
    calls for. The caller holds the writer's lock."""
    if not store.count("ok") and not index_path(store.path).exists():
        return
    generation = store.generation()
    index = load(store, save_rebuilt=False, expected=expected)
    kept = maintain(store, index)
    if kept is not index or not is_current(store):
        save(store, kept, generation)


def temp_files(store: Store) -> list[Path]:
    """Temp files of writes of the index or its sidecar that did not finish (a killed writer)."""
    path = index_path(store.path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


_ERRNO_BY_TEXT = {os.strerror(code): code for code in errno.errorcode}


def _os_error(exc: RuntimeError) -> OSError:
    """The OSError behind a FAISS I/O error, from the reason at the end of its message."""
    text = str(exc).strip()
    m = re.search(r"\(([^()]+)\)$", text) or re.search(r":\s*([^:]+)$", text)
    reason = m.group(1).strip() if m else text.splitlines()[-1]
    return OSError(_ERRNO_BY_TEXT.get(reason, errno.EIO), reason)


def summary(store: Store) -> dict:
    """The choice kept in the database and what the file on disk says it is (no index read)."""
    choice, memory = stored_choice(store)
    meta = _read_meta(store)
    layout = meta.get("layout") if isinstance(meta.get("layout"), dict) else {}
    return {"choice": choice, "memory": memory, "vectors": meta.get("count"),
            "current": is_current(store), **{"key": EXACT, **layout}}
