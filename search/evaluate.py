"""Retrieval quality on a labelled image set: index it, query every image, score the rankings.

The ground truth is a CSV with columns ``path`` (relative to the set's folder)
and ``group`` (images of one group are relevant to each other), and an
optional ``query`` column (1/true/yes marks the queries; without it every
image is one). Each query is ranked against the rest, itself left out, with
the same public ``Searcher`` calls an application makes.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

# The labelled-set format and AP are the indexer's (tune learns and validates with them);
# named here too for callers of evaluate.
from indexer.groundtruth import (  # noqa: F401
    Entry,
    GroundTruthError,
    average_precision,
    labelled_set,
    read_groundtruth,
)

log = logging.getLogger(__name__)

RECALL_AT = (10, 100)


# -- metrics: pure functions of one ranking ----------------------------------
def precision_at(relevant: Sequence[bool], k: int) -> float:
    """Share of relevant items among the first ``k`` (a short ranking counts its gaps as misses)."""
    return float(np.sum(np.asarray(relevant[:k], dtype=bool)) / k)


def recall_at(relevant: Sequence[bool], k: int, total_relevant: int) -> float:
    """Share of all ``total_relevant`` items found among the first ``k``."""
    if total_relevant == 0:
        return 0.0
    return float(np.sum(np.asarray(relevant[:k], dtype=bool)) / total_relevant)


# -- the run -----------------------------------------------------------------
@dataclass
class Evaluation:
    """Scores of one evaluation run; ``lines()`` for people, ``to_dict()`` for JSON."""

    dataset: str
    images: int
    queries: int
    map: float
    precision_at_1: float
    precision_at_10: float
    recall: dict[int, float]
    index_images_per_s: float | None
    queries_per_s: float
    recipe: dict
    whitening: str | None
    tuning: str | None = None  # what tune_on learned, from what, in how long
    query_options: dict = field(default_factory=dict)
    skipped_alone: int = 0  # queries whose group has no other image
    unreadable_queries: int = 0  # queries that could not be decoded (scored 0)
    local_bytes_per_image: float | None = None  # stored local features, mean per indexed image
    verified_per_query: float | None = None  # results verified per query, with verification
    # With ``by``: {column value: {"queries", "map", "precision_at_1"}}.
    by: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recall"] = {str(k): v for k, v in self.recall.items()}
        return d

    def lines(self) -> list[str]:
        r = self.recipe
        speed = (f"{self.index_images_per_s:.1f} images/s" if self.index_images_per_s
                 else "already indexed")
        opts = ", ".join(f"{k} {v}" for k, v in self.query_options.items() if v) or "none"
        notes = []
        if self.skipped_alone:
            notes.append(f"{self.skipped_alone} left out: alone in their group")
        if self.unreadable_queries:
            notes.append(f"{self.unreadable_queries} unreadable, scored 0")
        local = ("no local features" if not self.local_bytes_per_image else
                 f"{r['local_features']} local features, {r['local_keypoints']} per image at "
                 f"{r['local_size']} px, {self.local_bytes_per_image / 1000:.1f} KB per image")
        lines = [
            f"{self.dataset}: {self.queries} queries against {self.images} images"
            + (f" ({'; '.join(notes)})" if notes else ""),
            f"recipe: {r['model']}, layer {r['layer']}, {r['pooling']}"
            + (f" p={r['gem_p']:g}" if r["pooling"] == "gem" else "")
            + f", {r['image_size']} px, scales {','.join(f'{s:g}' for s in r['scales'])}; {local}; "
            f"whitening: {self.whitening or 'none'}; query options: {opts}",
            f"mAP {self.map:.3f}  P@1 {self.precision_at_1:.3f}  P@10 {self.precision_at_10:.3f}  "
            + "  ".join(f"R@{k} {v:.3f}" for k, v in self.recall.items())
            + (f"  ({self.verified_per_query:.1f} results verified per query)"
               if self.verified_per_query is not None else ""),
            f"speed: indexing {speed}, querying {self.queries_per_s:.1f} queries/s",
        ]
        if self.tuning:
            lines.insert(2, self.tuning)
        for value, scores in self.by.items():
            lines.append(f"  {value}: {scores['queries']} queries, mAP {scores['map']:.3f}  "
                         f"P@1 {scores['precision_at_1']:.3f}")
        return lines


def evaluate(dataset: str | os.PathLike, groundtruth: str | os.PathLike | None = None, *,
             db: str | os.PathLike | None = None, qe: int | None = None, dba: int = 0,
             rotations: bool = False, flip: bool = False, verify: int | None = None,
             by: str | None = None, device: str = "auto", tune_on: str | os.PathLike | None = None,
             tune_method: str = "whiten",
             progress: Callable[[int, int], None] | None = None,
             **index_options) -> Evaluation:
    """Index ``dataset`` (into ``db``, or a temporary database) and score every query.

    ``index_options`` go to ``Indexer`` (model, layer, pooling, gem_p,
    image_size, scales, whiten, local_features, keypoints, weights, workers...);
    ``qe``, ``dba``, ``rotations``, ``flip`` and ``verify`` to ``Searcher``.
    Images listed but not indexed (a file that failed) still count as relevant
    items never found. ``by`` names a ground-truth column: the queries are
    also scored for each of its values. ``tune_on`` (another labelled set,
    whose groups must not be this one's) tunes the database by ``tune_method``
    before indexing.
    """
    from indexer import DecodeError, Indexer

    from .searcher import DEFAULT_QE, Searcher

    root = Path(dataset).expanduser()
    entries = read_groundtruth(*labelled_set(root, groundtruth))
    if by is not None and by not in entries[0].columns:
        raise GroundTruthError(f"{root}: the ground truth has no column {by!r} "
                               f"(it has {', '.join(sorted(entries[0].columns)) or 'none besides path and group'})")
    qe = DEFAULT_QE if qe is None else qe
    with tempfile.TemporaryDirectory(prefix="lookalike-eval-") as tmp:
        db_path = Path(db) if db else Path(tmp) / "evaluate.db"
        indexer = Indexer(db_path, device=device, **index_options)
        tuned = (_tune(indexer, tune_on, tune_method, entries, index_options.get("whiten"))
                 if tune_on else None)
        summary = indexer.index([root], progress=progress)
        embedded_per_s = summary.embedded / summary.seconds if summary.embedded else None
        with Searcher(db_path, device=device, dba=dba, weights=index_options.get("weights")) as s:
            group_of = {e.path: e.group for e in entries}
            sizes: dict[str, int] = {}
            for e in entries:
                sizes[e.group] = sizes.get(e.group, 0) + 1
            # A query with nothing else in its group has no ranking to score:
            # left out, and counted (mAP over the rest, as is usual).
            queries = [e for e in entries if e.query and sizes[e.group] > 1]
            alone = sum(1 for e in entries if e.query and sizes[e.group] == 1)
            unreadable = 0
            aps, p1, p10 = [], [], []
            recall = {k: [] for k in RECALL_AT}
            verified = 0
            n = len(s)
            depth = s.verify_depth(verify)
            start = time.perf_counter()
            for q in queries:
                own = s.id_of(q.path)
                try:
                    matches = s.search(q.path, k=n, qe=qe, rotations=rotations, flip=flip,
                                       exclude=[own] if own is not None else [], verify=depth)
                except (DecodeError, OSError) as exc:
                    # A query that cannot be read finds nothing: it scores 0, the run goes on.
                    log.warning("%s: cannot be queried (%s); it scores 0", q.path, exc)
                    unreadable += 1
                    matches = []
                rel = [group_of.get(m.path) == q.group for m in matches]
                total = sizes[q.group] - 1
                verified += sum(1 for m in matches if m.inliers)
                aps.append(average_precision(rel, total))
                p1.append(precision_at(rel, 1))
                p10.append(precision_at(rel, 10))
                for k in RECALL_AT:
                    recall[k].append(recall_at(rel, k, total))
            took = time.perf_counter() - start
            whitening = s.whitening.describe() if s.whitening is not None else None
            recipe = asdict(s.recipe)
            with_local, local_bytes = s.store.local_stats()
    if not queries:
        raise GroundTruthError(f"{root}: no query has another image of its group to find")
    return Evaluation(
        dataset=root.name, images=n, queries=len(queries), map=float(np.mean(aps)),
        precision_at_1=float(np.mean(p1)), precision_at_10=float(np.mean(p10)),
        recall={k: float(np.mean(v)) for k, v in recall.items()},
        index_images_per_s=embedded_per_s, queries_per_s=len(queries) / took if took else 0.0,
        recipe=recipe, whitening=whitening, tuning=tuned.line() if tuned else None,
        query_options={"qe": qe, "dba": dba, "rotations": rotations, "flip": flip, "verify": depth},
        skipped_alone=alone, unreadable_queries=unreadable,
        local_bytes_per_image=local_bytes / with_local if with_local else None,
        verified_per_query=verified / len(queries) if depth else None,
        by=_by(queries, aps, p1, by) if by else {},
    )


def _tune(indexer, tune_on, method: str, entries: list[Entry], whiten: str | None):
    """Tune ``indexer``'s database on ``tune_on``, refusing a set that shares images with the one measured."""
    if whiten not in (None, "auto") and method == "whiten":
        raise ValueError(f"--tune-on learns the whitening: leave --whiten at auto (not {whiten})")
    learned = read_groundtruth(*labelled_set(tune_on))
    shared = {e.path for e in learned} & {e.path for e in entries}
    if shared:
        raise GroundTruthError(f"{tune_on}: {len(shared)} of its images are in the set measured "
                               f"(for example {sorted(shared)[0]}); tune on other images")
    return indexer.tune(tune_on, method=method)


def _by(queries: list[Entry], aps: list[float], p1: list[float], column: str) -> dict:
    """mAP and precision@1 of the queries with each value of ``column``, values in order."""
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        groups.setdefault(q.columns.get(column) or "", []).append(i)
    return {value: {"queries": len(rows), "map": float(np.mean([aps[i] for i in rows])),
                    "precision_at_1": float(np.mean([p1[i] for i in rows]))}
            for value, rows in sorted(groups.items())}
