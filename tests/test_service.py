"""The HTTP service (search/service.py) over a real Searcher on a real tiny database."""
from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import io
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import make_photo, png_header, save_photo
from indexer import Indexer
from indexer.decode import THUMBNAIL_SIZES
from search import Searcher
from search.service import create_app

# Small images and a small model input keep the model's work light on a 2-core machine.
IMAGE_SIZE = 128


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def upright_sideways(path: Path, seed: int) -> Image.Image:
    """Save a photo stored sideways with the EXIF tag that turns it upright; return it upright."""
    upright = make_photo(seed, (64, 96))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
    return upright


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """Five photos, one in a subfolder, a byte-identical copy and one stored sideways, indexed."""
    root = tmp_path_factory.mktemp("service") / "photos"
    for i in range(5):
        save_photo(root / f"p{i}.jpg", seed=i, quality=92)
    save_photo(root / "sub" / "p5.png", seed=5)
    (root / "dup").mkdir()
    shutil.copy(root / "p0.jpg", root / "dup" / "p0.jpg")
    upright_sideways(root / "turned.jpg", seed=9)
    summary = Indexer(root.parent / "index.db", image_size=IMAGE_SIZE, workers=0).index([root])
    assert summary.failed == 0 and summary.added == 8
    return root


@pytest.fixture(scope="module")
def searcher(library):
    with Searcher(library.parent / "index.db") as s:
        yield s


@pytest.fixture(scope="module")
def client(searcher):
    with TestClient(create_app(searcher)) as c:
        yield c


def ids_by_name(client, library: Path) -> dict[str, int]:
    """Database id by path relative to ``library``."""
    found = {}
    for i in range(1, 40):
        r = client.get(f"/api/images/{i}")
        if r.status_code == 200:
            found[str(Path(r.json()["path"]).relative_to(library))] = i
    return found


@pytest.fixture(scope="module")
def ids(client, library) -> dict[str, int]:
    return ids_by_name(client, library)


def upload(client, data: bytes, name: str = "q.jpg", params=None, form=None):
    return client.post("/api/search", params=params or {}, data=form or {},
                       files={"file": (name, data, "image/jpeg")})


def assert_error(r, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"], body
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    for w in words:
        assert w in body["error"], body


# --- health, info, page ------------------------------------------------------------------


def test_health_and_info(client, library):
    r = client.get("/api/health")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok" and r.json()["images"] == 8
    assert isinstance(r.json()["generation"], int)
    r = client.get("/api/info")
    assert r.status_code == 200, r.text
    assert r.json()["counts"] == {"ok": 8, "failed": 0}
    assert r.json()["recipe"]["image_size"] == IMAGE_SIZE


def test_page_static_files_and_offline_api_description(client):
    r = client.get("/")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert r.content == (Path(__file__).parents[1] / "search" / "static" / "index.html").read_bytes()
    spec = client.get("/openapi.json").json()
    assert {"/api/health", "/api/info", "/api/search", "/api/images/{image_id}",
            "/api/images/{image_id}/similar", "/api/images/{image_id}/thumbnail",
            "/api/images/{image_id}/file", "/api/duplicates"} <= set(spec["paths"])
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "POST /api/search" in docs.text and "include_self" in docs.text
    assert "http://" not in docs.text and "https://" not in docs.text  # nothing from the network
    assert_error(client.get("/no/such/page"), 404, "/no/such/page")
    assert_error(client.delete("/api/health"), 405)


def test_an_unexpected_error_is_a_one_line_500():
    # A searcher that is not one: the service must still answer in one line, no traceback.
    with TestClient(create_app(object()), raise_server_exceptions=False) as broken:
        assert_error(broken.get("/api/health"), 500, "internal error: AttributeError")


# --- search ------------------------------------------------------------------------------


def test_upload_finds_the_original_first(client, library):
    copy = jpeg(Image.open(library / "p2.jpg").resize((150, 100)), quality=60)
    r = upload(client, copy, "copy of p2.jpg", params={"k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == "copy of p2.jpg"
    top = body["results"]
    assert len(top) == 3
    assert top[0]["path"] == str(library / "p2.jpg")
    assert top[0]["score"] > 0.9 and top[0]["score"] >= top[1]["score"] >= top[2]["score"]
    # Shaped as `query --json`, each with its thumbnail.
    assert set(top[0]) == {"path", "score", "id", "width", "height", "inliers", "box", "thumbnail"}
    assert top[0]["thumbnail"] == f"/api/images/{top[0]['id']}/thumbnail"
    assert (top[0]["width"], top[0]["height"]) == (96, 64)


def test_upload_options_as_query_or_form_fields(client, library):
    query = (library / "p1.jpg").read_bytes()
    plain = upload(client, query, params={"k": 2, "qe": 0, "verify": 0}).json()["results"]
    assert [m["inliers"] for m in plain] == [0, 0]  # not verified
    as_form = upload(client, query, form={"k": "2", "qe": "0", "verify": "0"}).json()["results"]
    assert [m["id"] for m in as_form] == [m["id"] for m in plain]
    # A folder filter, repeatable, from the query string and the form together.
    r = upload(client, query, params={"under": str(library / "sub")}, form={"under": str(library / "dup")})
    assert r.status_code == 200, r.text
    assert {Path(m["path"]).parent.name for m in r.json()["results"]} == {"sub", "dup"}
    # A turned and mirrored copy, with rotations and flip.
    turned = jpeg(Image.open(library / "p3.jpg").transpose(Image.Transpose.ROTATE_90)
                  .transpose(Image.Transpose.FLIP_LEFT_RIGHT), quality=95)
    r = upload(client, turned, params={"rotations": "true", "flip": "true", "k": 1})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["path"] == str(library / "p3.jpg")
    # A region of the query.
    r = upload(client, query, params={"box": "10,8,80,60", "k": 1})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["path"] == str(library / "p1.jpg")


def test_search_by_id_leaves_the_image_out_unless_asked(client, library, ids):
    p0 = ids["p0.jpg"]
    r = client.get(f"/api/images/{p0}/similar", params={"k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == str(library / "p0.jpg") and body["id"] == p0
    assert p0 not in [m["id"] for m in body["results"]]
    # Its byte-identical copy comes first.
    assert body["results"][0]["path"] == str(library / "dup" / "p0.jpg")
    assert body["results"][0]["thumbnail"].endswith(f"/{body['results'][0]['id']}/thumbnail")
    r = client.get(f"/api/images/{p0}/similar", params={"k": 2, "include_self": "true"})
    assert p0 in [m["id"] for m in r.json()["results"]]
    r = client.get(f"/api/images/{p0}/similar", params=[("under", str(library / "sub"))])
    assert [Path(m["path"]).name for m in r.json()["results"]] == ["p5.png"]
    assert_error(client.get("/api/images/9999/similar"), 404, "9999")


def test_bad_search_parameters_are_one_line_errors(client, library, ids):
    data = (library / "p1.jpg").read_bytes()
    for params, field in (({"k": 0}, "k"), ({"k": 1001}, "k"), ({"k": "ten"}, "k"), ({"qe": -1}, "qe"),
                          ({"verify": -3}, "verify"), ({"rotations": "maybe"}, "rotations"),
                          ({"box": "1,2,3"}, "box"), ({"box": "a,b,c,d"}, "box"),
                          ({"box": "0,0,nan,5"}, "box"), ({"top_k": 3}, "top_k")):
        assert_error(upload(client, data, params=params), 422, field)
        assert_error(client.get(f"/api/images/{ids['p1.jpg']}/similar", params=params), 422, field)
    assert_error(upload(client, data, form={"k": "0"}), 422, "k")
    # A box outside the image is a bad request about the file.
    assert_error(upload(client, data, "x.jpg", params={"box": "0,0,500,500"}), 400, "x.jpg", "box")
    assert_error(client.get(f"/api/images/{ids['p1.jpg']}/similar", params={"box": "0,0,500,500"}),
                 400, "box")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_uploads_are_one_line_errors(client, searcher, tmp_path):
    assert_error(upload(client, b"not an image at all", "notes.txt"), 400, "notes.txt", "not an image")
    assert_error(upload(client, b"", "empty.jpg"), 400, "empty.jpg", "empty")
    # Decompression bombs: a tiny PNG that declares a huge size, above our limit and above Pillow's.
    assert_error(upload(client, png_header(10_000, 10_000), "bomb.png"), 400, "bomb.png",
                 "decompression bomb")
    assert_error(upload(client, png_header(100_000, 100_000), "huge.png"), 400, "huge.png",
                 "decompression bomb")
    truncated = jpeg(make_photo(3, (300, 200)))[:2000]
    assert_error(upload(client, truncated, "cut.jpg"), 400, "cut.jpg")
    assert_error(client.post("/api/search", data={"k": "3"}), 400, "multipart")
    assert_error(client.post("/api/search", files={"other": ("a.jpg", b"x")}), 422, "file")
    assert_error(client.post("/api/search", content=b"\xff\xd8", headers={"content-type": "image/jpeg"}),
                 400, "multipart")


def test_upload_size_limit(searcher, library):
    with TestClient(create_app(searcher, max_upload_bytes=4000)) as small:
        big = (library / "p1.jpg").read_bytes() + b"\0" * 5000
        # Refused from its Content-Length, before the body is read.
        assert_error(upload(small, big), 413, "4000")
        # Without a Content-Length (chunked), refused while counting.
        boundary = "lookalike-test-boundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + big + f"\r\n--{boundary}--\r\n".encode()

        def chunks():
            for i in range(0, len(body), 1000):
                yield body[i:i + 1000]

        r = small.post("/api/search", content=chunks(),
                       headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert "content-length" not in r.request.headers
        assert_error(r, 413, "4000")
        # A small upload still passes.
        small_query = jpeg(make_photo(1), quality=50)
        assert len(small_query) < 3000
        assert upload(small, small_query).status_code == 200


def test_upload_decode_time_limit(searcher, library):
    # A limit that has passed before the decoder reads the pixels: refused, from a worker thread.
    with TestClient(create_app(searcher, decode_timeout=1e-9)) as hasty:
        r = upload(hasty, jpeg(make_photo(4, (400, 300))), "slow.jpg")
        assert_error(r, 400, "slow.jpg", "decoding took longer")


# --- images ------------------------------------------------------------------------------


def test_image_metadata_and_original_file(client, library, ids):
    i = ids["p2.jpg"]
    r = client.get(f"/api/images/{i}")
    assert r.status_code == 200, r.text
    info = r.json()
    path = library / "p2.jpg"
    assert {k: info[k] for k in ("id", "path", "width", "height", "bytes")} == {
        "id": i, "path": str(path), "width": 96, "height": 64, "bytes": path.stat().st_size}
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    mtime = dt.datetime.fromisoformat(info["mtime"])
    assert mtime.tzinfo is not None and abs(mtime.timestamp() - path.stat().st_mtime) < 1
    r = client.get(info["file"])
    assert r.status_code == 200, r.text
    assert r.content == path.read_bytes() and r.headers["content-type"] == "image/jpeg"
    for bad in ("9999", str(2**70), "0"):
        assert_error(client.get(f"/api/images/{bad}"), 404)
        assert_error(client.get(f"/api/images/{bad}/file"), 404)
    assert_error(client.get("/api/images/p2.jpg"), 404)


def test_no_path_from_the_client_opens_a_file(client, library):
    secret = library.parent / "secret.txt"
    secret.write_text("root:x:0:0")
    for url in ("/api/images/..%2F..%2Fetc%2Fpasswd/file", "/api/images/..%2Fsecret.txt/file",
                f"/api/images/{secret}/file", "/static/..%2F..%2F..%2Fetc%2Fpasswd",
                "/static/%2E%2E/%2E%2E/%2E%2E/etc/passwd", "/static/..%2Fservice.py",
                f"/static/{secret}", "/api/images/1/file/..%2F..%2Fsecret.txt"):
        r = client.get(url)
        assert r.status_code in (400, 404), (url, r.status_code)
        assert "root:" not in r.text and "import" not in r.text


def test_thumbnails_are_upright_jpegs_and_cached(client, library, ids):
    cache = client.app.state.thumbnails
    i = ids["turned.jpg"]
    r = client.get(f"/api/images/{i}/thumbnail", params={"size": 64})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.format == "JPEG" and thumb.size == (43, 64)  # upright: taller than wide
    want = np.asarray(make_photo(9, (64, 96)).resize(thumb.size), np.float32)
    assert np.abs(np.asarray(thumb.convert("RGB"), np.float32) - want).mean() < 20
    # Made once, then served from memory; revalidated by its ETag.
    hits = cache.hits
    again = client.get(f"/api/images/{i}/thumbnail", params={"size": 64})
    assert again.content == r.content and cache.hits == hits + 1
    assert client.get(f"/api/images/{i}/thumbnail", params={"size": 64},
                      headers={"if-none-match": r.headers["etag"]}).status_code == 304
    # Each size; never enlarged past the picture.
    for size in THUMBNAIL_SIZES:
        got = Image.open(io.BytesIO(client.get(f"/api/images/{ids['p1.jpg']}/thumbnail",
                                               params={"size": size}).content))
        assert got.size == ((size, round(size * 2 / 3)) if size < 96 else (96, 64))
    for bad in (100, 0, -1, "big"):
        assert_error(client.get(f"/api/images/{i}/thumbnail", params={"size": bad}), 422, "size")
    assert_error(client.get("/api/images/9999/thumbnail"), 404, "9999")


def test_a_changed_file_gets_a_new_thumbnail(client, library, ids, searcher):
    path = library / "p4.jpg"
    url = f"/api/images/{ids['p4.jpg']}/thumbnail"
    before = client.get(url).content
    original = path.read_bytes()
    try:
        make_photo(44).save(path, quality=92)
        after = client.get(url)
        assert after.status_code == 200 and after.content != before
        path.unlink()
        assert_error(client.get(url), 404, "gone")
        assert_error(client.get(f"/api/images/{ids['p4.jpg']}/file"), 404, "gone")
    finally:
        path.write_bytes(original)


# --- a live collection, many clients -----------------------------------------------------


def test_the_index_grows_under_a_running_app(tmp_path):
    root = tmp_path / "grow"
    for i in range(3):
        save_photo(root / f"a{i}.jpg", seed=100 + i, quality=92)
    db = tmp_path / "grow.db"
    Indexer(db, image_size=IMAGE_SIZE, workers=0).index([root])
    with Searcher(db) as s, TestClient(create_app(s)) as c:
        assert c.get("/api/health").json()["images"] == 3
        generation = c.get("/api/health").json()["generation"]
        new = save_photo(root / "new" / "b0.jpg", seed=200, quality=92)
        save_photo(root / "new" / "b1.jpg", seed=201, quality=92)
        Indexer(db, workers=0).index([root])  # another writer, while the app is up
        health = c.get("/api/health").json()
        assert health["images"] == 5 and health["generation"] > generation
        assert c.get("/api/info").json()["counts"]["ok"] == 5
        r = upload(c, new.read_bytes(), params={"k": 1})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["path"] == str(new)


@pytest.fixture(scope="module")
def server(searcher):
    """The app served by a real uvicorn on a free loopback port, in a thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(searcher), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            pytest.fail("uvicorn did not start")
        threading.Event().wait(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(30)
    sock.close()


def test_raw_traversal_paths_on_a_real_server(server, library):
    host, port = server.removeprefix("http://").split(":")
    for path in ("/static/../../../../etc/passwd", "/api/images/../../../../etc/passwd/file",
                 "/static/..%2f..%2f..%2f..%2fetc%2fpasswd", "/static//etc/passwd"):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", path)  # sent as written: no client-side normalisation
        r = conn.getresponse()
        body = r.read()
        conn.close()
        assert r.status in (400, 404), (path, r.status)
        assert b"root:" not in body


def test_many_clients_share_one_searcher(server, library, ids):
    uploads = {name: jpeg(Image.open(library / name).resize((120, 80)), quality=70)
               for name in ("p0.jpg", "p2.jpg", "p3.jpg")}
    by_id = [ids["p1.jpg"], ids["sub/p5.png"], ids["turned.jpg"]]
    jobs = [("upload", name) for name in uploads] + [("id", i) for i in by_id]

    def ask(http: httpx.Client, job) -> tuple[int, list]:
        kind, what = job
        if kind == "upload":
            r = http.post("/api/search", params={"k": 4}, files={"file": (what, uploads[what])})
        else:
            r = http.get(f"/api/images/{what}/similar", params={"k": 4})
        return r.status_code, r.json()["results"] if r.status_code == 200 else r.text

    with httpx.Client(base_url=server, timeout=120) as http:
        expected = {job: ask(http, job) for job in jobs}
    assert all(status == 200 for status, _ in expected.values()), expected

    def client_thread(n: int) -> list:
        with httpx.Client(base_url=server, timeout=300) as http:
            return [(job, ask(http, job)) for job in jobs[n % len(jobs):] + jobs[:n % len(jobs)]][:3]

    with ThreadPoolExecutor(12) as pool:
        answers = [a for batch in pool.map(client_thread, range(12)) for a in batch]
    assert len(answers) == 36
    for job, (status, results) in answers:
        assert status == 200, (job, results)
        want = expected[job][1]
        assert [m["id"] for m in results] == [m["id"] for m in want], job
        assert np.allclose([m["score"] for m in results], [m["score"] for m in want], atol=1e-5), job
        assert [m["inliers"] for m in results] == [m["inliers"] for m in want], job


# --- duplicates (search/duplicates.py) ---------------------------------------------------


def test_duplicates_lists_the_identical_copies(client, library):
    r = client.get("/api/duplicates")
    assert r.status_code == 200, r.text
    groups = r.json()["groups"]
    exact = [g for g in groups if g["kind"] == "exact"]
    assert len(exact) == 1
    assert {m["path"] for m in exact[0]["members"]} == {str(library / "p0.jpg"), str(library / "dup" / "p0.jpg")}
    assert all(m["thumbnail"] == f"/api/images/{m['id']}/thumbnail" for m in exact[0]["members"])
    only = client.get("/api/duplicates", params={"exact_only": "true"}).json()["groups"]
    assert [g["kind"] for g in only] == ["exact"]
    assert client.get("/api/duplicates", params={"under": str(library / "sub")}).json() == {"groups": []}
    assert_error(client.get("/api/duplicates", params={"threshold": 2}), 422, "threshold")
