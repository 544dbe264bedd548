"""Adapt a database's descriptors to a labelled collection (``Indexer.tune``).

A labelled set (indexer.groundtruth: ``path,group``) says which pictures show
the same thing. ``whiten`` learns a projection from its matching pairs
(indexer.whitening.learn_from_groups) and stores it as the database's
whitening: nothing is embedded again, every stored vector and every query
goes through it. ``finetune`` trains the network itself (indexer.finetune)
and embeds the database again (indexer.retune). ``Indexer.untune`` undoes both.

The labelled images need not be in the database: those that are lend their
stored descriptors, the others are embedded with the database's recipe and
not added (a training set is not part of the collection searched).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .groundtruth import Entry
from .recipe import Recipe
from .scan import display_path
from .store import OK, Store, now, writer_lock

log = logging.getLogger(__name__)

METHODS = ("whiten", "finetune")
DEFAULT_METHOD = "whiten"


@dataclass
class Tuned:
    """What a tuning run learned, and from what."""

    method: str
    images: int  # labelled images learned from
    groups: int
    pairs: int
    embedded: int  # of them, embedded for the occasion (the rest were in the database)
    description: str  # of the result, as ``info`` shows it
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    # finetune: indexed images embedded again under the tuned weights, and those that failed
    reembedded: int = 0
    reembed_failures: list[tuple[str, str]] = field(default_factory=list)

    def line(self) -> str:
        failed = f", {len(self.failures)} unreadable" if self.failures else ""
        what = "whitening " if self.method == "whiten" else ""
        again = ""
        if self.reembedded or self.reembed_failures:
            again = (f", {self.reembedded} indexed images embedded again"
                     + (f" ({len(self.reembed_failures)} failed)" if self.reembed_failures else ""))
        return (f"tuned ({self.method}) in {self.seconds:.1f}s, {self.embedded} of the labelled images "
                f"embedded{failed}{again}; {what}{self.description}")


def labelled_descriptors(store: Store, recipe: Recipe, entries: list[Entry], make_encoder, *,
                         batch_size: int, workers: int, max_pixels: int
                         ) -> tuple[np.ndarray, list[Entry], int, list[tuple[str, str]]]:
    """(descriptors, the entries they are of, embedded, failures) of the labelled ``entries``.

    Stored descriptors are reused; the other images are embedded with
    ``recipe`` (without local features, which tuning does not use). A file
    that cannot be read is left out and reported, the run goes on.
    """
    from .pipeline import embed_files

    paths = [e.path for e in entries]
    found = store.embeddings_at(paths)
    rest = [p for p in dict.fromkeys(paths) if p not in found]
    failures: list[tuple[str, str]] = []
    if rest:
        global_only = recipe.global_only()
        log.info("embedding %d labelled images that the database does not hold", len(rest))
        for results in embed_files(rest, lambda: make_encoder(global_only), recipe=global_only,
                                   batch_size=batch_size, workers=min(workers, len(rest)),
                                   max_pixels=max_pixels):
            for r in results:
                if r.vector is None:
                    log.warning("%s: left out of tuning: %s", display_path(rest[r.index]), r.error)
                    failures.append((rest[r.index], r.error or "unreadable"))
                else:
                    found[rest[r.index]] = r.vector
    kept = [e for e in entries if e.path in found]
    vecs = np.stack([found[e.path] for e in kept]) if kept else np.zeros((0, recipe.dim), np.float32)
    return vecs, kept, len(rest) - len(failures), failures


def finetune_recipe(recipe: Recipe, kept: list[Entry], vecs: np.ndarray, weights, device: str,
                    epochs: int | None, max_pixels: int, progress) -> tuple[Recipe, Tuned]:
    """Fine-tune ``recipe``'s network on the labelled images ``kept`` (``vecs``: their current
    descriptors); the recipe that names the saved weights, and what was done."""
    from . import finetune
    from .backbone import resolve_weights
    from .network import build_trunk
    from .whitening import pair_count

    finetune.check_trainable(recipe, [e.group for e in kept])
    pictures, failures = finetune.pictures([e.path for e in kept], max_pixels)
    ok = [i for i, px in enumerate(pictures) if px is not None]
    groups = [kept[i].group for i in ok]
    path, _ = resolve_weights(recipe.model, weights, recipe.weights_sha256)
    trained = finetune.train(lambda: build_trunk(recipe.model, recipe.layer, path), recipe.gem_p,
                             [pictures[i] for i in ok], groups, vecs[ok],
                             epochs=finetune.EPOCHS if epochs is None else epochs,
                             learning_rate=finetune.LEARNING_RATE,
                             device=device, progress=progress)
    saved, sha = finetune.save(trained.state, recipe.model)
    tuned_recipe = replace(recipe, weights_sha256=sha, gem_p=trained.gem_p)
    held = ", ".join(f"{x:.3f}" for x in trained.validation)
    return tuned_recipe, Tuned(
        "finetune", len(ok), len(set(groups)), pair_count(groups), 0,
        f"{recipe.model} fine-tuned for {trained.epochs} epochs, the count that ranked held-out groups "
        f"best (their mAP before and after each trial epoch: {held}), GeM p {trained.gem_p:g}, "
        f"saved as {saved}",
        failures)


class Tuning:
    """``Indexer``'s tuning methods (the Indexer gives the recipe, encoders and whitening)."""

    def tune(self, labelled: str | os.PathLike, groundtruth: str | os.PathLike | None = None, *,
             method: str = "whiten", dim: int | None = None, shrinkage: float | None = None,
             epochs: int | None = None, progress=None):
        """Learn from a labelled set (its folder with groundtruth.csv, or the CSV) how to
        search this database better; returns a tuning.Tuned.

        ``whiten``: a projection learned from the set's matching pairs becomes the
        database's whitening (``dim`` output dimensions, ``shrinkage`` 0..1; None
        takes the defaults).
        ``finetune``: the network and GeM's p are trained on the set for up to
        ``epochs`` (``progress(step, steps, loss)``); the weights go to the weights
        folder, the recipe names them, and indexed images are embedded again.
        A new database is made with this Indexer's recipe. ``untune()`` undoes both.
        """
        from .encoder import resolve_device
        from .groundtruth import labelled_set, read_groundtruth

        if method not in METHODS:
            raise ValueError(f"unknown tuning method {method!r}; choose one of {', '.join(METHODS)}")
        start = time.perf_counter()
        entries = read_groundtruth(*labelled_set(labelled, groundtruth))
        device = resolve_device(self.device)
        with writer_lock(self.db):
            store = Store(self.db)
            try:
                self._finish_retune(store, device)
                name = Path(labelled).expanduser().name
                tuned = (self._tune_whitening(store, entries, device, dim, shrinkage, name)
                         if method == "whiten" else self._finetune(store, entries, device, epochs, progress))
            finally:
                store.close()
        tuned.seconds = time.perf_counter() - start
        return tuned

    def _tune_whitening(self, store: Store, entries, device: str, dim: int | None,
                        shrinkage: float | None, name: str):
        from .whitening import (
            CENTER_MIN_IMAGES,
            LEARNED_SHRINKAGE,
            learn_from_groups,
            pair_count,
        )

        recipe, vecs, kept, embedded, failures = self._labelled(store, entries, device)
        groups = [e.group for e in kept]
        w = learn_from_groups(vecs, groups, dim=dim,
                              shrinkage=LEARNED_SHRINKAGE if shrinkage is None else shrinkage,
                              learned_at=now().strftime("%Y-%m-%d %H:%M:%S"), name=name)
        if store.count(OK) >= CENTER_MIN_IMAGES:
            w = w.centred(self._collection(store))
        self._set_whitening(store, w)
        log.info("%s: %s", store.name, w.describe())
        return Tuned("whiten", len(vecs), len(set(groups)), pair_count(groups), embedded,
                     w.describe(), failures)

    def untune(self) -> list[str]:
        """Undo tuning: the original weights back (every image embedded again) after
        fine-tuning, and the default whitening after either method; what was undone."""
        from . import retune
        from .encoder import resolve_device
        from .whitening import CENTER_MIN_IMAGES, LEARNED

        device = resolve_device(self.device)
        undone = []
        with writer_lock(self.db):
            store = Store(self.db, create=False)
            try:
                self._finish_retune(store, device)
                first = retune.original(store)
                if first is not None:
                    retune.begin(store, first)
                    self._finish_retune(store, device, first)
                    undone.append(f"the original weights are back ({first.model}, sha256 "
                                  f"{first.weights_sha256[:12]}, GeM p {first.gem_p:g})")
                stored = store.whitening()
                learned = stored is not None and stored.kind == LEARNED
                if learned or first is not None:
                    if store.count(OK) >= CENTER_MIN_IMAGES:
                        self._learn(store, "center")
                    else:
                        self._set_whitening(store, None, forget=True)
                if learned:
                    undone.append("the learned whitening is replaced by the default, centring")
            finally:
                store.close()
        return undone

    def _finetune(self, store: Store, entries, device: str, epochs: int | None, progress):
        from . import finetune, retune

        finetune.check_trainable(self._recipe(store), [e.group for e in entries])  # before any work
        recipe, vecs, kept, embedded, failures = self._labelled(store, entries, device)
        tuned_recipe, tuned = finetune_recipe(recipe, kept, vecs, self.weights, device, epochs,
                                              self.max_pixels, progress)
        # Every indexed image is embedded again under the tuned recipe (none: the swap is
        # all there is): resumable, and searches see the old state or the new one whole.
        retune.begin(store, tuned_recipe)
        tuned.reembedded, tuned.reembed_failures = self._finish_retune(store, device, tuned_recipe)
        tuned.embedded, tuned.failures = embedded, failures + tuned.failures
        return tuned

    def _labelled(self, store: Store, entries, device: str):
        """(recipe, descriptors, entries kept, embedded, failures): the database's recipe (a new
        one's, now kept), then the labelled images' descriptors under it."""
        recipe, encoder = self._bind_recipe(store, device)
        return (recipe, *labelled_descriptors(
            store, recipe, entries, lambda r: encoder or self._encoder(r, device),
            batch_size=self.batch_size, workers=self.workers, max_pixels=self.max_pixels))

    def _finish_retune(self, store: Store, device: str, recipe: Recipe | None = None):
        """Finish a move to fine-tuned weights, begun now or by a run that was stopped."""
        from . import retune
        from .encoder import Encoder

        if recipe is None and retune.pending(store) is None:
            return 0, []
        # No weights file: the tuned (or, undoing, the original) weights are found by checksum.
        return retune.finish(store, lambda r: Encoder(r, None, device),
                             batch_size=self.batch_size, workers=self.workers, max_pixels=self.max_pixels)
