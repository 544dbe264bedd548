#!/usr/bin/env python
"""A screenshot of the page of `lookalike serve` after a search, for the README.

    python bench/screenshot.py /tmp/copies.db /tmp/copies/copies/crop70/0511.jpg

Serves the real app over DB on a loopback port, opens the page in headless
Chromium (Debian's /usr/bin/chromium, driven by Playwright), searches by QUERY
and saves the window (1200 px wide by default) to bench/page.png, reduced to
256 colours when the full-colour PNG is larger than --max-kb.
"""
from __future__ import annotations

import argparse
import io
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def serve(app):
    """Run ``app`` with uvicorn in a thread on a free loopback port; (server, base url)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def shoot(url: str, query: Path, width: int, height: int, k: int, chromium: str) -> bytes:
    """The page at ``url`` after searching by ``query``, once every thumbnail has loaded."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url + "/")
        page.get_by_test_id("k").select_option(str(k))
        page.get_by_test_id("file").set_input_files(query)
        expect(page.get_by_test_id("result").first).to_be_visible(timeout=120_000)
        page.wait_for_function("[...document.images].every(i => i.complete)", timeout=60_000)
        png = page.screenshot()
        browser.close()
    return png


def small_png(png: bytes, max_kb: int) -> bytes:
    """``png`` itself when it fits in ``max_kb``, else the same picture in 256 colours."""
    if len(png) <= max_kb * 1024:
        return png
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        out = io.BytesIO()
        img.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(out, "PNG", optimize=True)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", type=Path)
    parser.add_argument("query", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("page.png"))
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=760)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--max-kb", type=int, default=300)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    from search import Searcher
    from search.service import create_app

    with Searcher(args.db) as searcher:
        server, url = serve(create_app(searcher))
        try:
            png = small_png(shoot(url, args.query, args.width, args.height, args.k, args.chromium),
                            args.max_kb)
        finally:
            server.should_exit = True
    args.out.write_bytes(png)
    print(f"{args.out}: {len(png) // 1024} KB")


if __name__ == "__main__":
    main()
