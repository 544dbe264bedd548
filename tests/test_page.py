"""The web page of `lookalike serve` in a real browser: headless Chromium driven by Playwright,
over the real app (uvicorn) and a real Searcher on a tiny indexed database."""
from __future__ import annotations

import base64
import importlib.util
import os
import re
import shutil
import socket
import threading
import time

import pytest

from conftest import make_poster

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _browser_missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is not installed"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed"
    return None


_missing = _browser_missing()
if _missing:
    if os.environ.get("LOOKALIKE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"page test needs a browser: {_missing} (LOOKALIKE_REQUIRE_BROWSER=1)",
                    pytrace=False)
    pytest.skip(f"page test needs a browser: {_missing}", allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

# Each expect() waits for the page up to this long; the first search loads the model.
expect.set_options(timeout=60_000)


class Served:
    """The real app on a free loopback port, in a thread; ``url`` is its base address."""

    def __init__(self, app):
        import uvicorn

        # A socket bound here, handed to uvicorn: no window for another process to take the port.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> "Served":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> dict:
    """Five posters in two folders, a byte-identical copy of one, indexed with the real model."""
    from indexer import Indexer

    tmp = tmp_path_factory.mktemp("page")
    root = tmp / "photos"
    paths = {}
    for i in range(5):
        folder = root / ("a" if i < 3 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        paths[f"p{i}"] = folder / f"p{i}.jpg"
        make_poster(100 + i).save(paths[f"p{i}"], quality=92)
    paths["copy"] = root / "b" / "copy-of-p0.jpg"
    shutil.copyfile(paths["p0"], paths["copy"])
    db = tmp / "index.db"
    Indexer(db, workers=0).index([root])

    # The queries: an edited copy of p2 (cropped, smaller, recompressed) and a file that is no image.
    from PIL import Image

    edited = tmp / "edited-p2.jpg"
    with Image.open(paths["p2"]) as img:
        img.crop((20, 30, 340, 450)).resize((240, 315)).save(edited, quality=70)
    junk = tmp / "notes.jpg"
    junk.write_bytes(b"these are notes, not a picture\n" * 20)
    return {"db": db, "root": root, "paths": {k: str(p.resolve()) for k, p in paths.items()},
            "edited": edited, "junk": junk}


@pytest.fixture(scope="module")
def server(library):
    from search import Searcher
    from search.service import create_app

    with Searcher(library["db"]) as searcher, Served(create_app(searcher)) as served:
        yield served


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the app; fails the test if it asked any other host for anything."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(server.url + "/")
    yield page
    context.close()
    foreign = [u for u in requested
               if not (u.startswith(server.url + "/") or u.startswith(("blob:", "data:")))]
    assert not foreign, f"the page asked other hosts: {foreign}"


def result_paths(page) -> list[str]:
    return page.get_by_test_id("result").evaluate_all("els => els.map(e => e.dataset.path)")


def test_header_shows_how_many_images_the_database_holds(page):
    expect(page.get_by_test_id("image-count")).to_have_text("6 images indexed")
    expect(page).to_have_title("lookalike")


def test_an_uploaded_edited_copy_finds_its_original_with_its_box_then_a_result_searches(
        page, library):
    paths = library["paths"]
    page.get_by_test_id("file").set_input_files(library["edited"])
    first = page.get_by_test_id("result").first
    expect(first).to_have_attribute("data-path", paths["p2"])
    expect(page.get_by_test_id("query-name")).to_have_text("edited-p2.jpg")
    expect(page.get_by_test_id("query-image")).to_be_visible()
    # Verified: inliers shown, and the region drawn over the thumbnail, inside its frame.
    expect(first.get_by_test_id("inliers")).to_have_text(re.compile(r"^\d+ inliers$"))
    expect(first.get_by_test_id("box")).to_be_visible()
    expect(first.locator("img")).to_have_attribute("src", re.compile(r"/thumbnail"))
    # The thumbnail may still be on its way: wait for it to load (or fail to).
    assert first.locator("img").evaluate(
        "img => img.complete ? img.naturalWidth > 0 : new Promise(done => {"
        " img.addEventListener('load', () => done(img.naturalWidth > 0));"
        " img.addEventListener('error', () => done(false)); })")
    assert_box_drawn_over_the_crop(first, crop=(20, 30, 340, 450))
    expect(page.get_by_test_id("error")).to_be_hidden()

    # Click p0 among the results: its byte-identical copy is the first result, p0 itself left out.
    page.locator(f'[data-testid="result"][data-path="{paths["p0"]}"] button').click()
    expect(page.get_by_test_id("query-name")).to_have_text(paths["p0"])
    expect(page.get_by_test_id("result").first).to_have_attribute("data-path", paths["copy"])
    assert paths["p0"] not in result_paths(page)
    expect(page.get_by_test_id("result").first.get_by_test_id("score")).to_have_text("1.000")


def assert_box_drawn_over_the_crop(result, crop) -> None:
    """The result's box is where the crop came from, and is drawn there over the thumbnail:
    its corners scaled by the thumbnail's size on screen over the image's (object-fit: contain)."""
    seen = result.evaluate("""li => {
        const img = li.querySelector("img"), polygon = li.querySelector("polygon");
        const f = img.getBoundingClientRect(), p = polygon.getBoundingClientRect();
        return {frame: [f.x, f.y, f.width, f.height], drawn: [p.left, p.top, p.right, p.bottom],
                points: polygon.getAttribute("points")};
    }""")
    corners = [tuple(map(float, p.split(","))) for p in seen["points"].split()]
    x0, y0, x1, y1 = crop
    for (x, y), (wx, wy) in zip(corners, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]):
        assert abs(x - wx) < 12 and abs(y - wy) < 12, corners
    fx, fy, fw, fh = seen["frame"]
    width, height = 360, 480  # the poster's pixels
    scale = min(fw / width, fh / height)
    left, top = fx + (fw - width * scale) / 2, fy + (fh - height * scale) / 2
    xs, ys = [x for x, _ in corners], [y for _, y in corners]
    want = [left + min(xs) * scale, top + min(ys) * scale, left + max(xs) * scale, top + max(ys) * scale]
    assert all(abs(a - b) < 2 for a, b in zip(seen["drawn"], want)), (seen["drawn"], want)


# Hands the page a File made of the given bytes, as a drop on the page or a paste would.
GIVE_FILE = """([kind, name, b64]) => {
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    const data = new DataTransfer();
    data.items.add(new File([bytes], name, {type: "image/jpeg"}));
    const event = kind === "drop"
        ? new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true})
        : new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true});
    document.body.dispatchEvent(event);
}"""


@pytest.mark.parametrize("kind", ["drop", "paste"])
def test_a_dropped_or_pasted_image_is_searched(page, library, kind):
    b64 = base64.b64encode(library["edited"].read_bytes()).decode()
    page.evaluate(GIVE_FILE, [kind, f"{kind}-query.jpg", b64])
    expect(page.get_by_test_id("query-name")).to_have_text(f"{kind}-query.jpg")
    expect(page.get_by_test_id("result").first).to_have_attribute("data-path", library["paths"]["p2"])


def test_k_and_the_folder_filter_narrow_the_search(page, library):
    page.get_by_test_id("k").select_option("5")
    page.get_by_test_id("file").set_input_files(library["edited"])
    expect(page.get_by_test_id("search-status")).to_have_text("5 results")
    # Enter in the folder field searches again, within folder b (three images).
    folder_b = str(library["root"].resolve() / "b")
    page.get_by_test_id("under").fill(folder_b)
    page.get_by_test_id("under").press("Enter")
    expect(page.get_by_test_id("search-status")).to_have_text("3 results")
    assert sorted(result_paths(page)) == sorted(
        library["paths"][name] for name in ("p3", "p4", "copy"))


def test_duplicates_view_shows_the_identical_pair_with_a_keeper(page, library):
    paths = library["paths"]
    page.get_by_test_id("tab-duplicates").click()
    expect(page.locator("#search-view")).to_be_hidden()
    page.get_by_test_id("dup-find").click()
    group = page.locator('[data-testid="dup-group"][data-kind="exact"]')
    expect(group).to_have_count(1)
    members = group.get_by_test_id("dup-member")
    expect(members).to_have_count(2)
    assert sorted(members.evaluate_all("els => els.map(e => e.dataset.path)")) == sorted(
        [paths["p0"], paths["copy"]])
    expect(group.get_by_test_id("keeper")).to_have_count(1)
    keeper = group.locator(".member.is-keeper").get_attribute("data-path")
    other = ({paths["p0"], paths["copy"]} - {keeper}).pop()

    # A member clicked is searched by: its twin comes first.
    group.locator(f'[data-testid="dup-member"][data-path="{other}"] button').click()
    expect(page.locator("#search-view")).to_be_visible()
    expect(page.get_by_test_id("query-name")).to_have_text(other)
    expect(page.get_by_test_id("result").first).to_have_attribute("data-path", keeper)


def test_a_file_that_is_no_image_shows_a_one_line_error(page, library):
    page.get_by_test_id("file").set_input_files(library["junk"])
    error = page.get_by_test_id("error")
    expect(error).to_be_visible()
    text = error.inner_text()
    assert text and "\n" not in text, text
    assert "image" in text.lower(), text
    expect(page.get_by_test_id("result")).to_have_count(0)

    # A good search afterwards clears it.
    page.get_by_test_id("file").set_input_files(library["edited"])
    expect(page.get_by_test_id("result").first).to_have_attribute("data-path", library["paths"]["p2"])
    expect(error).to_be_hidden()
