"""The library API: Indexer, Searcher, batch invariance, backbones and recipes."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_photo, save_photo
from indexer import BackboneError, Indexer, RecipeMismatch
from indexer.backbone import SPECS, resolve_weights
from indexer.decode import open_image
from indexer.encoder import Encoder
from indexer.pipeline import embed_files
from indexer.recipe import Recipe, make_recipe
from search import Searcher


def lite0_recipe(**kw) -> Recipe:
    _, sha = resolve_weights("efficientnet_lite0")
    return make_recipe("efficientnet_lite0", weights_sha256=sha, **kw)


def test_descriptor_does_not_depend_on_its_batch(tmp_path):
    # Four images of one shape and two of another, embedded alone and together.
    paths = [save_photo(tmp_path / f"{i}.png", seed=i, size=(120, 90) if i < 4 else (90, 120))
             for i in range(6)]
    encoder = Encoder(lite0_recipe(image_size=160))
    alone = [encoder.embed(open_image(p, 160).pixels)[0] for p in paths]
    for batch_size in (3, 4):
        together = {}
        for results in embed_files([str(p) for p in paths], encoder, batch_size=batch_size):
            for r in results:
                together[r.index] = r.vector
        for i, vec in enumerate(alone):
            assert np.abs(together[i] - vec).max() < 1e-4
            assert abs(np.linalg.norm(vec) - 1) < 1e-5


def test_onnx_and_torch_give_the_same_descriptors(tmp_path):
    recipe = lite0_recipe(image_size=160)
    onnx = Encoder(recipe)
    assert onnx.engine == "onnxruntime"
    pixels = np.stack([open_image(make_photo(i), 160).pixels for i in range(3)])
    eager = Encoder(recipe, engine="torch")
    assert eager.engine == "torch-cpu"
    a, b = onnx.embed(pixels), eager.embed(pixels)
    assert np.abs(a - b).max() < 1e-4


@pytest.mark.parametrize("pooling", ["gem", "mac", "spoc", "rmac"])
def test_every_pooling_indexes_and_finds_itself(photos, tmp_path, pooling):
    db = tmp_path / f"{pooling}.db"
    Indexer(db, pooling=pooling, image_size=128, workers=0).index([photos])
    with Searcher(db) as s:
        assert s.recipe.pooling == pooling
        top = s.search(photos / "p1.jpg", k=1)[0]
        assert top.path == str(photos / "p1.jpg") and top.score > 0.999


def test_an_earlier_layer_changes_the_dimension(photos, db):
    Indexer(db, layer="block6", image_size=128, workers=0).index([photos])
    with Searcher(db) as s:
        assert s.recipe.dim == SPECS["efficientnet_lite0"].layers["block6"] == 192
        assert len(s.embed(photos / "p0.jpg")) == 192


def test_searcher_takes_paths_images_arrays_and_descriptors(photos, db):
    Indexer(db, image_size=128, workers=0).index([photos])
    target = str(photos / "p4.jpg")
    with Searcher(db) as s:
        vec = s.embed(photos / "p4.jpg")
        image = Image.open(photos / "p4.jpg")
        for query in (target, photos / "p4.jpg", image, np.asarray(image.convert("RGB")), vec,
                      vec.astype(np.float64) * 3):
            top = s.search(query, k=1)[0]
            assert top.path == target and top.score > 0.999
        assert len(s.search(target, k=100)) == 6
        with pytest.raises(ValueError, match="dims"):
            s.search(np.zeros(7, np.float32))


def test_searcher_is_safe_from_many_threads(photos, db):
    Indexer(db, image_size=128, workers=0).index([photos])
    queries = [photos / f"p{i % 5}.jpg" for i in range(20)]
    with Searcher(db) as s:
        serial = [s.search(q, k=3) for q in queries]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda q: s.search(q, k=3), queries))
    for a, b in zip(serial, parallel):
        assert [m.id for m in a] == [m.id for m in b]
        assert np.allclose([m.score for m in a], [m.score for m in b], atol=1e-5)


def test_exif_rotated_copy_matches_its_original(tmp_path, db):
    root = tmp_path / "rot"
    upright = make_photo(7, (160, 100))
    upright.save(root.mkdir() or root / "upright.jpg", quality=95)
    # Stored sideways, with the EXIF tag that turns it back upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(root / "sideways.jpg", quality=95, exif=exif)
    Indexer(db, workers=0).index([root])
    with Searcher(db) as s:
        top = s.search(root / "upright.jpg", k=2)
        assert top[1].path == str(root / "sideways.jpg")
        assert top[1].score > 0.95
        assert (top[1].width, top[1].height) == (160, 100)


def test_resnet50_with_a_weights_file(photos, tmp_path):
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    db = tmp_path / "r.db"
    Indexer(db, model="resnet50", weights=weights, layer="layer3", image_size=96,
            workers=0).index([photos])
    with Searcher(db, weights=weights) as s:
        assert s.recipe.model == "resnet50" and s.recipe.dim == 1024
        assert s.recipe.mean == (0.485, 0.456, 0.406)
        assert s.search(photos / "p0.jpg", k=1)[0].path == str(photos / "p0.jpg")
    # Other weights are refused, for indexing and querying alike.
    other = tmp_path / "other.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), other)
    with pytest.raises(RecipeMismatch, match="weights"):
        Indexer(db, weights=other, workers=0).index([photos])
    with Searcher(db, weights=other) as s, pytest.raises(RecipeMismatch, match="weights"):
        s.search(photos / "p0.jpg")


def test_wrong_weights_file_is_a_clear_error(photos, tmp_path):
    bad = tmp_path / "lite0.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(BackboneError, match="not an EfficientNet-Lite0 state dict"):
        Indexer(tmp_path / "x.db", weights=bad, workers=0).index([photos])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"nope")
    with pytest.raises(BackboneError, match="not a PyTorch weights file"):
        Indexer(tmp_path / "y.db", model="resnet50", weights=junk, workers=0).index([photos])


def test_recipe_round_trips_and_names_differences():
    a = lite0_recipe()
    assert Recipe.from_json(a.to_json()) == a
    b = lite0_recipe(pooling="spoc", image_size=224)
    diff = a.differences(b)
    assert "pooling: index has gem, asked for spoc" in diff
    assert "image_size: index has 448, asked for 224" in diff
    assert "gem_p: index has 3.0, asked for 0.0" in diff
    with pytest.raises(RecipeMismatch, match="use the same options or a new --db"):
        a.require_same(b, "x.db")


def test_unknown_model_layer_and_device_are_refused():
    with pytest.raises(BackboneError, match="unknown model 'vgg'"):
        lite0_recipe() and make_recipe("vgg", weights_sha256="x")
    with pytest.raises(BackboneError, match="no layer 'layer4'"):
        lite0_recipe(layer="layer4")
    from indexer.encoder import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_pooling_functions_agree_with_their_definitions():
    from indexer import pooling

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 2, (2, 8, 5, 7)).astype(np.float32)
    assert np.allclose(pooling.gem(x, 1.0), pooling.spoc(x), atol=1e-5)
    assert np.allclose(pooling.gem(x / 2, 100.0), pooling.mac(x / 2), rtol=0.05)
    assert np.allclose(pooling.mac(x), x.reshape(2, 8, -1).max(-1))
    for method in ("gem", "mac", "spoc", "rmac"):
        v = pooling.pool(x, method)
        assert v.shape == (2, 8) and v.dtype == np.float32
        assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    # R-MAC differs from MAC: regions count, not just the global maximum.
    assert not np.allclose(pooling.pool(x, "rmac"), pooling.pool(x, "mac"), atol=1e-3)
    with pytest.raises(ValueError, match="unknown pooling"):
        pooling.pool(x, "median")


def test_a_cpu_query_does_not_import_torch(photos, db, tmp_path):
    import subprocess
    import sys

    Indexer(db, image_size=128, workers=0).index([photos])
    code = ("import sys; from search import Searcher; s = Searcher(sys.argv[1], device='cpu'); "
            "m = s.search(sys.argv[2], k=1)[0]; print(m.path, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(db), str(photos / "p0.jpg")],
                         capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert out == [str(photos / "p0.jpg"), "False"]


def test_large_gem_exponent_stays_finite(photos, db):
    Indexer(db, gem_p=60, image_size=96, workers=0).index([photos])
    with Searcher(db) as s:
        vec = s.embed(photos / "p0.jpg")
        assert np.isfinite(vec).all()
        assert s.search(vec, k=1)[0].path == str(photos / "p0.jpg")


def test_bad_weights_do_not_bind_a_new_database(photos, db):
    with pytest.raises(BackboneError, match="not a PyTorch weights file") as exc:
        Indexer(db, weights=photos / "p0.jpg", workers=0).index([photos])
    assert "\n" not in str(exc.value)
    summary = Indexer(db, image_size=96, workers=0).index([photos])
    assert summary.added == 6


def test_float_image_arrays_are_refused(photos, db):
    Indexer(db, image_size=96, workers=0).index([photos])
    with Searcher(db) as s, pytest.raises(ValueError, match="uint8"):
        s.search(np.zeros((10, 10, 3), np.float32))
