"""Fine-tuning the network on labelled groups (lookalike tune --method finetune)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from conftest import labelled_set
from indexer import finetune
from indexer.backbone import weights_dir
from indexer.store import Store


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_batches_gather_a_group_with_the_groups_nearest_to_it():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 8))
    groups = np.repeat([f"g{i}" for i in range(20)], 3)
    vecs = centres[np.repeat(np.arange(20), 3)] + 0.01 * rng.normal(size=(60, 8))
    batches = finetune.mine(vecs, groups, np.random.default_rng(1))
    assert len(batches) == round(60 / (finetune.GROUPS_PER_BATCH * finetune.PER_GROUP))
    means = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    for batch in batches:
        names, counts = np.unique(groups[batch], return_counts=True)
        assert len(names) == finetune.GROUPS_PER_BATCH and (counts == finetune.PER_GROUP).all()
        seed = int(groups[batch[0]][1:])
        sims = means @ means[seed]
        sims[seed] = -np.inf
        nearest = {f"g{i}" for i in np.argsort(-sims)[: finetune.GROUPS_PER_BATCH - 1]}
        assert set(names) == nearest | {f"g{seed}"}


def test_a_share_of_the_groups_is_held_out_to_choose_the_epoch():
    labels = np.array([f"g{i}" for i in range(20) for _ in range(3)] + ["alone"])
    fit, held = finetune.split(labels, np.random.default_rng(0))
    assert sorted(np.concatenate([fit, held])) == list(range(61))
    assert len(set(labels[held])) == 4 and not set(labels[held]) & set(labels[fit])
    assert "alone" in set(labels[fit])  # a group of one cannot be scored


def test_contrastive_loss_by_hand():
    v = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    labels = np.array(["a", "a", "b"])
    # pairs: (0,1) match, distance sqrt(0.16 + 0.64); (0,2) and (1,2) do not, distances
    # sqrt(2) (beyond the margin: no loss) and sqrt(0.36 + 0.04).
    want = 0.5 * (0.8 + (finetune.MARGIN - np.sqrt(0.4)) ** 2) / 3
    assert float(finetune.contrastive(v, labels)) == pytest.approx(want, rel=1e-5)


def test_a_set_it_cannot_learn_from_is_refused(tmp_path):
    from indexer.recipe import make_recipe

    recipe = make_recipe("efficientnet_lite0", weights_sha256="x", local_features="none")
    with pytest.raises(finetune.FinetuneError, match="at least 10 groups of two.*have 9: use --method whiten"):
        finetune.check_trainable(recipe, [g for g in "abcdefghij" for _ in range(2)][:-1])
    with pytest.raises(finetune.FinetuneError, match="pools with mac"):
        finetune.check_trainable(make_recipe("efficientnet_lite0", weights_sha256="x", pooling="mac",
                                             local_features="none"), ["a"] * 30)


def test_finetune_a_new_database_then_index_and_query(tmp_path, photos):
    labelled, db = labelled_set(tmp_path / "labelled", groups=12), tmp_path / "tuned.db"
    result = run("tune", labelled, "--db", db, "--method", "finetune", "--epochs", "1",
                 "--image-size", "64", "--local-features", "none", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "fine-tuning: step" in result.output and "tuned (finetune)" in result.output
    store = Store(db, create=False)
    recipe = store.recipe()
    store.close()
    saved = list(weights_dir().glob(f"efficientnet_lite0-tuned-{recipe.weights_sha256[:16]}.pth"))
    assert len(saved) == 1, sorted(weights_dir().iterdir())
    assert f"saved as {saved[0]}" in result.output

    plain = tmp_path / "plain.db"
    for d in (db, plain):  # the tuned recipe is found by its checksum, with no --weights
        result = run("index", photos, "--db", d, "--image-size", "64", "--local-features", "none")
        assert result.exit_code == 0, result.output
    result = run("query", photos / "p2.jpg", "--db", db, "--json", "-k", "1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["results"][0]["path"] == str(photos / "p2.jpg")
    tuned_vec = _embedding(db, photos / "p2.jpg")
    assert not np.allclose(tuned_vec, _embedding(plain, photos / "p2.jpg"), atol=1e-3)
    assert run("check", "--db", db, "--all").exit_code == 0  # recomputed with the tuned weights

    saved[0].rename(tmp_path / "elsewhere.pth")
    result = run("query", photos / "p2.jpg", "--db", db)
    assert result.exit_code == 1, result.output
    assert f"{saved[0]} is not there" in result.output and len(result.output.strip().splitlines()) == 1
    result = run("query", photos / "p2.jpg", "--db", db, "--weights", tmp_path / "elsewhere.pth")
    assert result.exit_code == 0, result.output


def _embedding(db: Path, path: Path) -> np.ndarray:
    store = Store(db, create=False)
    try:
        want = store.id_of(str(path))
        for ids, vecs in store.embeddings():
            for i, v in zip(ids, vecs):
                if i == want:
                    return v
    finally:
        store.close()
    raise AssertionError(f"{path} not in {db}")


def test_finetuning_a_database_that_holds_images_embeds_them_again(tmp_path, photos, db):
    assert run("index", photos, "--db", db, "--image-size", "64").exit_code == 0
    before = {p: _embedding(db, photos / p) for p in ("p0.jpg", "sub/p5.png")}
    result = run("tune", labelled_set(tmp_path / "labelled", groups=12), "--db", db, "--method", "finetune",
                 "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert "6 indexed images embedded again" in result.output
    for p, vec in before.items():
        assert not np.allclose(_embedding(db, photos / p), vec, atol=1e-3)
    result = run("check", "--db", db, "--all")  # every descriptor is the tuned network's, local features kept
    assert result.exit_code == 0, result.output
    result = run("index", photos, "--db", db)
    assert result.exit_code == 0 and "6 unchanged" in result.output, result.output
    tuned_sha = Store(db, create=False).recipe().weights_sha256
    result = run("info", "--db", db)
    assert f"tuned      fine-tuned weights in {weights_dir()}" in result.output, result.output
    # The ONNX graph follows the tuned weights: exported once more, named by their checksum.
    assert list(Path(os.environ["LOOKALIKE_CACHE"]).glob(f"*{tuned_sha[:16]}*.onnx"))

    result = run("tune", "--undo", "--db", db)
    assert result.exit_code == 0 and "the original weights are back" in result.output, result.output
    for p, vec in before.items():
        np.testing.assert_allclose(_embedding(db, photos / p), vec, atol=1e-5)
    assert run("check", "--db", db, "--all").exit_code == 0
    result = run("tune", "--undo", "--db", db)
    assert result.exit_code == 0 and "nothing to undo" in result.output, result.output
