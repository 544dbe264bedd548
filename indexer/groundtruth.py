"""Labelled image sets: a CSV that says which images show the same thing.

The CSV has columns ``path`` (relative to the set's folder, or absolute) and
``group`` (images of one group show the same thing), and an optional
``query`` column (1/true/yes marks the queries; without it every image is
one). ``lookalike evaluate`` scores rankings with it and ``lookalike tune``
learns from it.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

FILENAME = "groundtruth.csv"


def average_precision(relevant: Sequence[bool], total_relevant: int | None = None) -> float:
    """AP of a ranking given as relevance flags, best first.

    ``total_relevant`` counts relevant items that the ranking may have missed
    (default: those in it); each missed one adds a precision of 0.
    """
    rel = np.asarray(relevant, dtype=bool)
    total = int(rel.sum()) if total_relevant is None else int(total_relevant)
    if total == 0:
        return 0.0
    hits = np.cumsum(rel)
    precisions = hits[rel] / (np.flatnonzero(rel) + 1)
    return float(precisions.sum() / total)


def leave_one_out_map(vecs: np.ndarray, groups: Sequence[str]) -> float:
    """mAP of every row of ``vecs`` (unit vectors) as a query against the others, by cosine;
    rows alone in their group are left out."""
    labels = np.asarray(groups, dtype=object).astype(str)
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -np.inf)
    aps = []
    for q in range(len(vecs)):
        total = int((labels == labels[q]).sum()) - 1
        if total:
            order = np.argsort(-sims[q])[:-1]
            aps.append(average_precision(labels[order] == labels[q], total))
    return float(np.mean(aps)) if aps else 0.0


class GroundTruthError(ValueError):
    """The ground-truth file cannot be used; str() says why."""


@dataclass(frozen=True)
class Entry:
    path: str
    group: str
    query: bool
    columns: dict = field(default_factory=dict, compare=False)  # the row's other columns


def read_groundtruth(csv_path: str | os.PathLike, root: str | os.PathLike) -> list[Entry]:
    """The entries of a ground-truth CSV, with absolute paths under ``root``."""
    csv_path, root = Path(csv_path), Path(root)
    try:
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or ())
            if not {"path", "group"} <= columns:
                raise GroundTruthError(f"{csv_path}: needs the columns path and group, "
                                       f"has {', '.join(sorted(columns)) or 'none'}")
            has_query = "query" in columns
            entries = []
            for line, row in enumerate(reader, start=2):
                if not row["path"] or not row["group"]:
                    raise GroundTruthError(f"{csv_path}:{line}: empty path or group")
                flag = (row.get("query") or "").strip().lower() in ("1", "true", "yes", "y")
                extra = {k: v for k, v in row.items() if k not in ("path", "group", "query")}
                entries.append(Entry(os.path.abspath(root / row["path"]), row["group"],
                                     flag if has_query else True, extra))
    except OSError as exc:
        raise GroundTruthError(f"{csv_path}: cannot read the ground truth ({exc.strerror or exc})") from None
    if not entries:
        raise GroundTruthError(f"{csv_path}: no images listed")
    if not any(e.query for e in entries):
        raise GroundTruthError(f"{csv_path}: no row is marked as a query")
    return entries


def labelled_set(path: str | os.PathLike, groundtruth: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(csv, root) of a labelled set given as its folder (holding groundtruth.csv) or its CSV."""
    path = Path(path).expanduser()
    if groundtruth is not None:
        return Path(groundtruth).expanduser(), path
    if path.is_dir():
        csv_path = path / FILENAME
        if not csv_path.is_file():
            raise GroundTruthError(f"{path}: no {FILENAME} in this folder (columns path,group)")
        return csv_path, path
    if path.is_file():
        return path, path.parent
    raise GroundTruthError(f"{path}: no such folder or CSV file")
