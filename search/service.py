"""The HTTP service of ``lookalike serve``: search, images, thumbnails and duplicates over one Searcher.

Every request shares one ``Searcher`` (thread-safe). Searches, thumbnails and
database reads run in the server's thread pool, so one slow query does not hold
up the others; only the reading of an upload runs on the event loop. Files are
opened only by database id: no path from a client ever reaches the file system
(the web page's own folder aside, which Starlette's StaticFiles keeps inside).
"""
from __future__ import annotations

import datetime as dt
import html
import logging
import mimetypes
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, AsyncIterator

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from indexer import BackboneError, RecipeMismatch, decode
from indexer.store import OK, StoreError

from .searcher import DEFAULT_QE, Searcher

log = logging.getLogger(__name__)

# Loopback only by default: the service hands out every indexed file to whoever asks.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024  # bytes of a request body
# Lower than the indexer's limit (179 MP): an upload is anyone's file, and decoding takes
# up to 16 bytes a pixel, so 64 MP (an 8000 x 8000 scan) caps one decode near 1 GB.
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_DECODE_TIMEOUT = 10.0  # seconds to decode an upload (see decode.open_upload)
DEFAULT_UPLOAD_TIMEOUT = 60.0  # seconds for an upload's body to arrive
# Threads running searches: more than the cores only queue inside the model, and each
# one may hold an upload's decoded pixels.
DEFAULT_THREADS = 8
DEFAULT_THUMBNAIL_CACHE = 64 * 1024 * 1024  # bytes of JPEG kept in memory
# Connections served at once (more get 503): each may hold an upload in memory while it waits.
DEFAULT_CONNECTIONS = 64
STATIC_DIR = Path(__file__).with_name("static")
MAX_FORM_FIELDS = 32
SIZES = ", ".join(map(str, decode.THUMBNAIL_SIZES))  # of thumbnails
MAX_ID = 2**63 - 1  # SQLite's largest integer: a bigger one is no id, not an overflow

ERROR_MEANINGS = {400: "bad input", 404: "unknown image, or its file is gone", 408: "upload too slow",
                  413: "upload too large", 422: "bad parameter"}


def _errors(*codes: int) -> dict:
    """The error responses of an endpoint, for its description."""
    return {c: {"description": ERROR_MEANINGS[c] + ': {"error": "<one line>"}'} for c in codes}



class SearchOptions(BaseModel):
    """The options of ``lookalike query``."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1, le=1000, description="results wanted")
    qe: int = Field(DEFAULT_QE, ge=0, le=100, description="query expansion with that many top results")
    verify: int | None = Field(None, ge=0, le=1000,
                               description="results verified by local features (default 100; 0: none)")
    rotations: bool = Field(False, description="also try the query turned by 90, 180 and 270 degrees")
    flip: bool = Field(False, description="also try the query mirrored")
    box: str | None = Field(None, description="X0,Y0,X1,Y1: search for this region (upright pixels)")
    under: list[str] = Field([], description="only images under this folder (repeatable)")

    @field_validator("box")
    @classmethod
    def _box_is_four_numbers(cls, value: str | None) -> str | None:
        if value is not None:
            _parse_box(value)
        return value

    def search_args(self) -> dict:
        """Keyword arguments of Searcher.search."""
        return {"k": self.k, "qe": self.qe, "verify": self.verify, "rotations": self.rotations,
                "flip": self.flip, "box": _parse_box(self.box) if self.box else None,
                "under": self.under or None}


class SimilarOptions(SearchOptions):
    include_self: bool = Field(False, description="keep the image itself in its results")


def _parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not all(map(_finite, box)):
        raise ValueError(f"must be X0,Y0,X1,Y1 (four numbers), not {text!r}")
    return box


def _finite(v: float) -> bool:
    return v - v == 0


class ThumbnailCache:
    """JPEG thumbnails in memory, least recently used first out, within ``max_bytes``.

    Keyed by (id, size, mtime_ns, file size): a file changed on disk gets a new
    thumbnail; its stale one ages out.
    """

    def __init__(self, max_bytes: int = DEFAULT_THUMBNAIL_CACHE):
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple, data: bytes) -> None:
        with self._lock:
            if key in self._items or len(data) > self.max_bytes:
                return
            self._items[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= len(old)

    def __len__(self) -> int:
        return len(self._items)


def create_app(searcher: Searcher, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               max_pixels: int = DEFAULT_MAX_PIXELS, decode_timeout: float | None = DEFAULT_DECODE_TIMEOUT,
               threads: int = DEFAULT_THREADS, thumbnail_cache: int = DEFAULT_THUMBNAIL_CACHE,
               static_dir: str | os.PathLike = STATIC_DIR) -> FastAPI:
    """The web service over ``searcher``, which stays the caller's to close.

    ``max_upload_bytes`` bounds a request body, ``max_pixels`` and ``decode_timeout``
    (seconds) an upload's decoding; ``threads`` run the searches (set when the server
    starts); ``thumbnail_cache`` is the thumbnails' memory in bytes.
    """
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        yield

    app = FastAPI(title="lookalike", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Which indexed images look like this one? Errors are "
                              '{"error": "<one line>"}.')
    app.state.searcher, app.state.thumbnails = searcher, ThumbnailCache(thumbnail_cache)
    app.state.duplicates = DuplicatesCache(searcher)
    app.state.limits = {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels,
                        "decode_timeout": decode_timeout}
    _add_error_handlers(app)
    _add_search_routes(app)
    _add_image_routes(app)
    _add_collection_routes(app)
    _add_page_routes(app, Path(static_dir))
    return app


# --- errors ------------------------------------------------------------------------------


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": _one_line(message)}, status_code=status)


def _validation_message(errors) -> str:
    """The first validation error as '<field>: <reason>'."""
    first = errors[0]
    field = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{field or 'request'}: {msg}{more}"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"not found: {request.url.path}"
        return JSONResponse({"error": _one_line(detail)}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return _error(422, _validation_message(exc.errors()))

    async def cannot_serve(request: Request, exc: Exception) -> Response:
        # The database or the model, not the request: the service cannot answer now.
        log.error("%s", exc)
        return _error(503, str(exc))

    for kind in (StoreError, RecipeMismatch, BackboneError):
        app.add_exception_handler(kind, cannot_serve)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")


# --- search ------------------------------------------------------------------------------


def _thumbnail_url(image_id: int) -> str:
    return f"/api/images/{image_id}/thumbnail"


def _result(match) -> dict:
    return {**match.to_dict(), "thumbnail": _thumbnail_url(match.id)}


def _search(searcher: Searcher, query, options: SearchOptions, what: str, exclude=()) -> list[dict]:
    """Searcher.search, with a bad image or option turned into a 4xx naming ``what``."""
    try:
        return [_result(m) for m in searcher.search(query, exclude=exclude, **options.search_args())]
    except decode.DecodeError as exc:
        raise HTTPException(400, f"{what}: {exc}") from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "the query image; the options may also come as form fields"}},
}}}}}


def _add_search_routes(app: FastAPI) -> None:
    searcher: Searcher = app.state.searcher
    limits = app.state.limits

    @app.post("/api/search", summary="Search by an uploaded image", openapi_extra=UPLOAD_BODY,
              responses=_errors(400, 408, 413, 422))
    async def search_upload(request: Request, options: Annotated[SearchOptions, Query()]) -> dict:
        """The indexed images most like the uploaded one (multipart field ``file``)."""
        name, data, fields = await _read_upload(request, limits["max_upload_bytes"])
        if fields:
            options = _merged(options, fields)
        # Decoding and the model are CPU work: off the event loop, in the thread pool.
        return await run_in_threadpool(_search_upload, searcher, name, data, options, limits)

    @app.get("/api/images/{image_id:int}/similar", summary="Search by an indexed image",
             responses=_errors(400, 404, 422))
    def similar(image_id: int, options: Annotated[SimilarOptions, Query()]) -> dict:
        """The indexed images most like image ``image_id`` (itself left out unless include_self)."""
        record = _record(searcher, image_id)
        path = _existing_file(record)
        results = _search(searcher, path, options, f"image {image_id}",
                          exclude=() if options.include_self else (image_id,))
        return {"query": record.path, "id": image_id, "results": results}


def _search_upload(searcher: Searcher, name: str, data: bytes, options: SearchOptions,
                   limits: dict) -> dict:
    try:
        image = decode.open_upload(data, limits["max_pixels"], limits["decode_timeout"])
    except decode.DecodeError as exc:
        raise HTTPException(400, f"file {name}: {exc}") from None
    try:
        return {"query": name, "results": _search(searcher, image, options, f"file {name}")}
    finally:
        image.close()


def _merged(options: SearchOptions, fields: list[tuple[str, str]]) -> SearchOptions:
    """The query string's options with the form's on top (``under`` from both)."""
    given = options.model_dump(exclude_unset=True)
    under = list(given.pop("under", []))
    for key, value in fields:
        if key == "under":
            under.append(value)
        else:
            given[key] = value
    try:
        return SearchOptions.model_validate({**given, "under": under})
    except ValidationError as exc:
        raise HTTPException(422, _validation_message(exc.errors())) from None


async def _read_upload(request: Request, limit: int) -> tuple[str, bytes, list[tuple[str, str]]]:
    """(file name, bytes, other form fields) of a multipart upload, held in memory.

    The body is refused with 413 as soon as it is known to pass ``limit``: from its
    Content-Length before anything is read, else while it is read.
    """
    import anyio
    from starlette.formparsers import MultiPartException, MultiPartParser

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(400, "the body must be multipart/form-data with the image in the field 'file'")
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise HTTPException(400, f"bad Content-Length: {declared[:40]!r}")
    if declared is not None and int(declared) > limit:
        raise HTTPException(413, f"the upload is larger than the limit of {limit} bytes")
    parser = MultiPartParser(request.headers, _counted(request, limit), max_files=1,
                             max_fields=MAX_FORM_FIELDS, max_part_size=4096)
    parser.spool_max_size = limit + 1  # kept in memory: an upload never touches the disk
    try:
        with anyio.fail_after(DEFAULT_UPLOAD_TIMEOUT):
            form = await parser.parse()
    except MultiPartException as exc:
        raise HTTPException(400, f"bad multipart body: {exc.message}") from None
    except TimeoutError:
        raise HTTPException(408, f"the upload took longer than {DEFAULT_UPLOAD_TIMEOUT:g} s") from None
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(422, "file: an image is required (the multipart field 'file')")
        fields = [(k, v) for k, v in form.multi_items() if k != "file" and isinstance(v, str)]
        return upload.filename or "upload", await upload.read(), fields
    finally:
        await form.close()


async def _counted(request: Request, limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise HTTPException(413, f"the upload is larger than the limit of {limit} bytes")
        yield chunk


# --- images ------------------------------------------------------------------------------


def _record(searcher: Searcher, image_id: int):
    """The indexed image ``image_id`` (indexer.store.ImageRecord), else 404."""
    record = searcher.store.records([image_id]).get(image_id) if 0 < image_id <= MAX_ID else None
    if record is None:
        raise HTTPException(404, f"no indexed image with id {image_id}")
    return record


def _existing_file(record) -> str:
    if not os.path.isfile(record.path):
        raise HTTPException(404, f"image {record.id}: its file is gone: {record.path}")
    return record.path


def _add_image_routes(app: FastAPI) -> None:
    searcher: Searcher = app.state.searcher
    cache: ThumbnailCache = app.state.thumbnails
    max_pixels = decode.DEFAULT_MAX_PIXELS  # an indexed file passed the indexer's limit

    @app.get("/api/images/{image_id:int}", summary="An indexed image's metadata", responses=_errors(404))
    def image_info(image_id: int) -> dict:
        r = _record(searcher, image_id)
        indexed = r.indexed_at.replace(tzinfo=r.indexed_at.tzinfo or dt.timezone.utc) if r.indexed_at else None
        return {"id": r.id, "path": r.path, "width": r.width, "height": r.height, "bytes": r.size,
                "mtime": r.modified, "sha256": r.sha256,
                "indexed_at": indexed.isoformat(timespec="seconds") if indexed else None,
                "thumbnail": _thumbnail_url(r.id), "file": f"/api/images/{r.id}/file"}

    @app.get("/api/images/{image_id:int}/thumbnail", summary="A JPEG thumbnail, upright",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}, **_errors(404, 422)})
    def thumbnail(request: Request, image_id: int,
                  size: Annotated[int, Query(description=f"longest side: one of {SIZES}")]
                  = decode.DEFAULT_THUMBNAIL) -> Response:
        if size not in decode.THUMBNAIL_SIZES:
            raise HTTPException(422, f"size: must be one of {SIZES}, not {size}")
        path = _existing_file(_record(searcher, image_id))
        st = os.stat(path)
        key = (image_id, size, st.st_mtime_ns, st.st_size)
        etag = '"%d-%d-%d-%d"' % key
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        data = cache.get(key)
        if data is None:
            try:
                data = decode.thumbnail(path, size, max_pixels)
            except decode.DecodeError as exc:
                raise HTTPException(422, f"image {image_id}: {path}: {exc}") from None
            cache.put(key, data)
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.get("/api/images/{image_id:int}/file", summary="The original file", response_class=FileResponse,
             responses=_errors(404))
    def original(image_id: int) -> FileResponse:
        # The path comes from the database, never from the request.
        path = _existing_file(_record(searcher, image_id))
        media = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, filename=os.path.basename(path),
                            content_disposition_type="inline")


# --- collection --------------------------------------------------------------------------


class DuplicatesCache:
    """The last duplicate groups found, per options, while the database is unchanged: a scan
    takes seconds to minutes, and a page asks again on every visit. One scan at a time."""

    def __init__(self, searcher: Searcher):
        self.searcher = searcher
        self._lock = threading.Lock()
        self._answers: dict[tuple, dict] = {}

    def get(self, threshold: float | None, under: list[str], exact_only: bool) -> dict:
        from . import duplicates

        key = (self.searcher.store.generation(), threshold, tuple(sorted(under)), exact_only)
        with self._lock:
            if key not in self._answers:
                found = duplicates.find(self.searcher, threshold=threshold, under=under or None,
                                        exact_only=exact_only)
                groups = [g.to_dict() for g in found]
                for group in groups:
                    for member in group["members"]:
                        member["thumbnail"] = _thumbnail_url(member["id"])
                self._answers = {k: v for k, v in self._answers.items() if k[0] == key[0]}
                self._answers[key] = {"groups": groups}
            return self._answers[key]


def _add_collection_routes(app: FastAPI) -> None:
    searcher: Searcher = app.state.searcher

    @app.get("/api/health", summary="Whether the service is up, and the images indexed")
    def health() -> dict:
        # From the database, not the loaded index: an index run in another process shows at once.
        store = searcher.store
        return {"status": "ok", "images": store.count(OK), "generation": store.generation()}

    @app.get("/api/info", summary="What the database holds (lookalike info --json)")
    def info() -> dict:
        from indexer.info import describe

        return describe(searcher.store.where)

    @app.get("/api/duplicates", summary="Groups of copies of one picture", responses=_errors(422))
    def duplicates(threshold: Annotated[float | None, Query(ge=-1, le=1, description=(
                       "the similarity a near pair needs (default: search.duplicates')"))] = None,
                   under: Annotated[list[str], Query(description="only images under this folder "
                                                                 "(repeatable)")] = [],  # noqa: B006
                   exact_only: Annotated[bool, Query(description="only byte-identical files")] = False
                   ) -> dict:
        try:
            return app.state.duplicates.get(threshold, under, exact_only)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None


# --- the page and its description ---------------------------------------------------------


def _add_page_routes(app: FastAPI, static_dir: Path) -> None:
    app.mount("/static", StaticFiles(directory=static_dir, check_dir=False), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        index = static_dir / "index.html"
        if not index.is_file():
            raise HTTPException(404, f"the web page is missing: {index}")
        return FileResponse(index, media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        # FastAPI's own /docs loads Swagger UI from a CDN; this page works offline.
        return HTMLResponse(api_page(app.openapi()))


def api_page(schema: dict) -> str:
    """A plain HTML description of an OpenAPI schema: each endpoint with its parameters."""
    esc = html.escape
    parts = [f"<!doctype html><meta charset=utf-8><title>{esc(schema['info']['title'])} API</title>",
             "<style>body{font:15px/1.4 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "code{background:#eee;padding:0 .2em}td,th{text-align:left;padding:.1em .6em}</style>",
             f"<h1>{esc(schema['info']['title'])} API</h1><p>{esc(schema['info'].get('description', ''))}",
             ' The machine-readable description is <a href="/openapi.json">/openapi.json</a>.</p>']
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            parts.append(f"<h2><code>{method.upper()} {esc(path)}</code></h2><p>{esc(op.get('summary', ''))}"
                         f"{'. ' + esc(op['description']) if op.get('description') else ''}</p>")
            rows = [(p["name"], p["in"], _type_name(p.get("schema", {})), p.get("description", ""))
                    for p in op.get("parameters", [])]
            body = op.get("requestBody", {}).get("content", {})
            for kind, spec in body.items():
                for name, prop in spec.get("schema", {}).get("properties", {}).items():
                    rows.append((name, kind, _type_name(prop), prop.get("description", "")))
            if rows:
                parts.append("<table><tr><th>parameter<th>in<th>type<th>meaning")
                parts += [f"<tr><td><code>{esc(n)}</code><td>{esc(w)}<td>{esc(t)}<td>{esc(d)}" for n, w, t, d in rows]
                parts.append("</table>")
            codes = ", ".join(f"{c} {esc(r.get('description', ''))}" for c, r in op.get("responses", {}).items())
            parts.append(f"<p>Responses: {codes}</p>")
    return "\n".join(parts)


def _type_name(schema: dict) -> str:
    if "anyOf" in schema:
        return " or ".join(_type_name(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list of {_type_name(schema.get('items', {}))}"
    text = schema.get("format") or schema.get("type", "")
    return text + (f" (default {schema['default']})" if "default" in schema else "")


# --- running ------------------------------------------------------------------------------


def run(db: str | os.PathLike | None = None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
        device: str = "auto", weights: str | os.PathLike | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD, max_pixels: int = DEFAULT_MAX_PIXELS,
        threads: int = DEFAULT_THREADS, log_level: str = "info") -> None:
    """Serve the database ``db`` on http://host:port until interrupted (Ctrl-C)."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach it can search and download every indexed "
                    "file", host)
    import warnings

    from PIL import Image

    # Pillow warns of images over 89 MP before our own, lower, limit refuses them: the
    # refusal is the client's answer, the warning only noise in the server's log.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    _check_address(host, port)  # before the model loads: a taken port fails at once, in one line
    with Searcher(db, device=device, weights=weights) as searcher:
        searcher.encoder  # load the model now, not on the first request  # noqa: B018
        app = create_app(searcher, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels,
                         threads=threads)
        uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False,
                    limit_concurrency=DEFAULT_CONNECTIONS)


def _check_address(host: str, port: int) -> None:
    """OSError, with the address in its message, if ``host:port`` cannot be listened on."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {reason}") from None
