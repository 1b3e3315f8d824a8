"""The local labelling web app: ``create_app(project_path)`` returns a FastAPI application.

Pages (``/``, ``/grid``, ``/evaluate``) are Jinja templates with a little plain JavaScript that
talks to the JSON API under ``/api`` (the same API scripts can use; OpenAPI at
``/api/openapi.json``, a readable list at ``/api/docs``). Every error, 404 and 422 included,
has one shape::

    {"error": {"code": "not_found", "message": "...", "details": {...}}}

Safety: photos are served only by their numeric id in the project's registry; static assets
only from a fixed list of names read at start-up; no route joins a URL into a file path. With a
``token``, every request must carry it (``X-Raresift-Token`` header, ``Authorization: Bearer``,
the ``raresift_token`` cookie, or ``?token=`` once, which sets the cookie). Request bodies over
``max_body`` bytes are refused.
"""

from __future__ import annotations

import errno
import hmac
import logging
import mimetypes
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import InputError, NotAProjectError, NotReadyError, RaresiftError
from ..project import Project
from ..store.labels import DEFAULT_CONCEPT, LabelConflict, LabelEvent, check_concept
from .. import labelling
from ..settings import default

__all__ = ["create_app", "MAX_BODY", "TOKEN_HEADER", "TOKEN_COOKIE"]

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
MAX_BODY = 256 * 1024  # labels and round requests are a few hundred bytes; nothing needs more
EXAMPLE_MAX_BODY = 24 * 1024 * 1024  # POST /api/examples only: an example photo, base64 in JSON
TOKEN_HEADER = "x-raresift-token"
TOKEN_COOKIE = "raresift_token"
SERVED_STATUSES = ("embedded", "new")  # photos that decoded fine, or not tried yet; never 'error'
PHOTO_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".bmp": "image/bmp", ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff"}


# ---------------------------------------------------------------------- errors
def _error(status: int, code: str, message: str, details: Any = None, headers: dict | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 410: "gone", 413: "too_large",
               415: "unsupported_media_type", 422: "invalid_request", 500: "internal_error",
               503: "unavailable"}


def _event_json(ev: LabelEvent | None) -> dict[str, Any] | None:
    if ev is None:
        return None
    return {"id": ev.id, "image_id": ev.image_id, "value": labelling.api_value(ev.value), "who": ev.who, "at": ev.at,
            "round": ev.round_id, "strategy": ev.strategy, "source": ev.source, "conflict": ev.conflict}


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable reason: not_found, invalid_request, label_conflict, ...")
    message: str = Field(description="what went wrong, for a person")
    details: Any | None = None


class ErrorOut(BaseModel):
    error: ErrorBody


ERRORS = {status: {"model": ErrorOut, "description": code} for status, code in _HTTP_CODES.items()
          if status in (400, 404, 409, 413, 422)}
ERRORS[503] = {"model": ErrorOut, "description": "disk_full, database_busy or database_error: the request failed; "
               "try again (after freeing disk space for disk_full)"}
FILE_ERRORS = {**ERRORS, 410: {"model": ErrorOut, "description": "unreadable_photo: the file did not decode"}}


LOW_DISK = 64 * 1024 * 1024  # below this much free space, an SQLite I/O error is taken for a full disk


def _free_space(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _storage_error(exc: Exception, project_path: Path) -> tuple[str, str]:
    """(code, message) for a database or disk error: disk full, database busy, or another I/O failure."""
    text = str(exc)
    lowered = text.lower()
    primary = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    free = _free_space(project_path)
    full = (
        (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))
        or primary == sqlite3.SQLITE_FULL
        or "disk is full" in lowered
        # SQLite reports some writes that ran out of space as a plain "disk I/O error".
        or ((primary == sqlite3.SQLITE_IOERR or "disk i/o error" in lowered) and free is not None and free < LOW_DISK)
    )
    if full:
        left = "" if free is None else f" ({free // 1024} KiB left)"
        return "disk_full", (f"the disk holding the project is full{left}: free some space, then try "
                             f"again ({text})")
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in lowered or "busy" in lowered:
        return "database_busy", (f"the project database is busy: another program (embed, a second server?) held "
                                 f"it too long; try again ({text})")
    return "database_error", f"the project database could not be read or written ({text}); try again"


# ---------------------------------------------------------------------- models
MAX_ID = 2**62  # SQLite integers are 64-bit; anything larger is no id of ours
ImageId = Annotated[int, Field(ge=1, le=MAX_ID, description="database id of a photo")]
EventId = Annotated[int, Field(ge=1, le=MAX_ID, description="id of a label event")]
ImageIdPath = Annotated[int, PathParam(ge=1, le=MAX_ID, description="database id of a photo")]


class Box(BaseModel):
    x: int
    y: int
    width: int
    height: int


class Tile(Box):
    score: float = Field(description="the tile's share of the head's log-odds")


class Item(BaseModel):
    image_id: int = Field(description="database id of the photo (its URL is /api/images/{image_id}/file)")
    path: str = Field(description="the photo's id in the project (path relative to the images folder)")
    score: float | None = Field(None, description="the model's positive probability when the photo was chosen")
    strategy: str | None = Field(None, description="the strategy that picked the photo")
    round: int | None = Field(None, description="the round that queued the photo")
    split: str | None = Field(None, description="pool or test")
    purpose: str = "label"
    has_file: bool = True
    event: int | None = Field(None, description="id of the newest label event; send it back as `expected`")
    label: int | Literal["unsure"] | None = Field(None, description="current label: 1, 0, \"unsure\", or null")
    labelled_by: str | None = None
    region: Box | None = Field(None, description="where in the photo the score comes from: the box of the tile "
                               "that adds most to it, in the original file's pixels (null before a model, or "
                               "without tiles)")
    tiles: list[Tile] = Field(default_factory=list, description="every tile's box and its share of the score")


class ItemsOut(BaseModel):
    items: list[Item]


class LabelIn(BaseModel):
    image_id: ImageId
    value: Literal[0, 1, "unsure"] | None = Field(
        description="1 = shows the class, 0 = does not, \"unsure\" = cannot tell (stored and listed for review, "
        "never trained on), null = withdraw the label")
    expected: EventId | None = Field(
        None, description="id of the newest label event the client saw (null: it saw none). When given, a label "
        "made by someone else since then is reported as a 409 label_conflict instead of being replaced. "
        "Leave the field out to skip the check.")


class LabelsIn(BaseModel):
    items: list[LabelIn] = Field(min_length=1, max_length=1000)
    who: str | None = Field(None, max_length=200, description="name recorded with the labels")


class EventOut(BaseModel):
    id: int
    image_id: int
    value: int | Literal["unsure"] | None
    who: str
    at: float
    round: int | None
    strategy: str | None
    source: str
    conflict: bool


SEQ_DESCRIPTION = ("id of the newest label event when the counts were read (0: no label yet), read in the same "
                   "statement or read transaction as the counts; it never decreases, so of two replies the one "
                   "with the higher `seq` holds the newer counts")


class LabelsOut(BaseModel):
    events: list[EventOut]
    status: dict[str, Any] = Field(description="labels, positives, negatives after this request, and `seq`: "
                                   + SEQ_DESCRIPTION)


class UndoIn(BaseModel):
    who: str | None = Field(None, max_length=200)
    image_id: ImageId | None = Field(None, description="photo whose label to withdraw (default: your newest label)")
    expected: EventId | None = Field(None, description="the label event you are undoing (conflict check)")


class UndoOut(BaseModel):
    event: EventOut
    item: Item
    status: dict[str, Any] = Field(description="labels, positives, negatives after the undo, and `seq`: "
                                   + SEQ_DESCRIPTION)


class RoundIn(BaseModel):
    n: int = Field(default("batch"), ge=1, le=1000, description="photos in the batch")
    strategy: str = Field("default", max_length=100)
    query: str | None = Field(None, max_length=500, description="text query for a cold start")
    examples: list[ImageId | Annotated[str, Field(pattern=r"^file:[0-9a-f]{64}$")]] | None = Field(
        None, max_length=100, description="image ids, or keys of example photos (POST /api/examples): find more like these")
    counter_examples: list[ImageId] | None = Field(
        None, max_length=1000, description="with strategy `similar`: photos the new ones should not look like")
    evaluate: bool = Field(False, description="queue the top-K test photos for evaluation instead")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="seed of the round's random draws")
    who: str | None = Field(None, max_length=200)


class ExampleIn(BaseModel):
    image_id: ImageId | None = Field(None, description="a photo of the project to crop (with `box`)")
    box: list[float] | None = Field(None, min_length=4, max_length=4,
                                    description="x, y, width, height in the photo's original pixels")
    data: str | None = Field(None, max_length=EXAMPLE_MAX_BODY, description="an image file, base64 (dropped or pasted)")
    name: str | None = Field(None, max_length=300, description="the dropped file's name")


class ExampleOut(BaseModel):
    key: str = Field(description="the example's key (file:HASH); send it in `examples` of POST /api/rounds")


class ExportIn(BaseModel):
    top: int = Field(100, ge=1, le=10_000_000)
    fmt: str = Field("csv", max_length=40, description="csv, jsonl, folder, label-studio, imagefolder, coco (see `raresift export`)")


class StatusOut(BaseModel):
    seq: int = Field(description=SEQ_DESCRIPTION + "; also in `project.seq`")
    project: dict[str, Any]
    estimates: dict[str, Any]
    history: list[list[int]] = Field(description="[labels spent, positives found] after each label event")
    strategies: list[str]
    who: str
    version: str


# ---------------------------------------------------------------------- guard
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class _Guard:
    """ASGI middleware: host and token checks, body size limit, no `..` in paths."""

    def __init__(self, app, *, token: str | None, allowed_hosts: list[str] | None, max_body: int):
        self.app = app
        self.token = token
        self.allowed_hosts = [h.lower() for h in allowed_hosts] if allowed_hosts else None
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope.get("path", "")
        raw = scope.get("raw_path") or path.encode()
        segments = path.split("/")
        if ".." in segments or "\\" in path or "\x00" in path or b"%00" in raw.lower():
            return await _error(404, "not_found", "no such page")(scope, receive, send)
        if self.allowed_hosts is not None:
            host = headers.get("host", "").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.allowed_hosts:
                # A page on another site that resolves its name to 127.0.0.1 (DNS rebinding) lands here.
                return await _error(400, "bad_host", f"requests for host {host!r} are not served")(scope, receive, send)
        set_cookie = False
        if self.token is not None:
            given = headers.get(TOKEN_HEADER)
            auth = headers.get("authorization", "")
            if given is None and auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if given is None and "cookie" in headers:
                jar = SimpleCookie()
                try:
                    jar.load(headers["cookie"])
                except Exception:  # malformed cookie header: treat as absent
                    jar = SimpleCookie()
                if TOKEN_COOKIE in jar:
                    given = jar[TOKEN_COOKIE].value
            if given is None:
                qs = parse_qs(scope.get("query_string", b"").decode("latin-1"))
                if "token" in qs:
                    given = qs["token"][0]
                    set_cookie = True
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                return await _error(401, "unauthorized", "this server needs its access token: open the URL that "
                                    "`raresift serve` printed, or send the X-Raresift-Token header")(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            # Another web site may make the browser send a request here, but it cannot set a JSON
            # content type without the browser asking first (CORS), nor fake the Origin header.
            origin = headers.get("origin")
            if origin is not None and origin != "null" and origin.split("://", 1)[-1].lower() != headers.get("host", "").lower():
                return await _error(403, "forbidden", f"requests from {origin} are not accepted")(scope, receive, send)
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype and ctype != "application/json":
                return await _error(415, "unsupported_media_type", "send the request body as application/json")(
                    scope, receive, send)
            limit = EXAMPLE_MAX_BODY if path == "/api/examples" else self.max_body  # a photo, base64
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                return await _error(413, "too_large", f"request body over {limit} bytes")(scope, receive, send)
            chunks, total, more = [], 0, True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunk = msg.get("body", b"")
                total += len(chunk)
                if total > limit:
                    return await _error(413, "too_large", f"request body over {limit} bytes")(scope, receive, send)
                chunks.append(chunk)
                more = msg.get("more_body", False)
            body = b"".join(chunks)
            sent = False

            async def receive():  # noqa: F811 - replay the body we read
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return {"type": "http.disconnect"}

        if set_cookie:
            inner_send = send

            async def send(message):  # noqa: F811 - add the cookie so later requests carry the token
                if message["type"] == "http.response.start":
                    cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                    message = dict(message)
                    message["headers"] = list(message.get("headers", [])) + [(b"set-cookie", cookie.encode())]
                await inner_send(message)

        return await self.app(scope, receive, send)


# ---------------------------------------------------------------------- app
def _concept_of(request: Request) -> str:
    """The concept a request works on: its ``concept`` query parameter, else the server's ``--concept``."""
    return check_concept(request.query_params.get("concept") or request.app.state.concept)


def _open_project(request: Request) -> Iterator[Project]:
    # One connection per request: SQLite (WAL) lets readers run beside the one writer.
    project = Project.open(request.app.state.project_path, concept=_concept_of(request))
    try:
        yield project
    finally:
        project.close()


ProjectDep = Annotated[Project, Depends(_open_project)]


def create_app(
    project_path: str | os.PathLike,
    *,
    token: str | None = None,
    who: str | None = None,
    allowed_hosts: list[str] | None = None,
    max_body: int = MAX_BODY,
    warm: bool = True,
    concept: str = DEFAULT_CONCEPT,
) -> FastAPI:
    """The labelling app for the project at ``project_path``.

    ``token``: when given, every request must carry it. ``who``: the name recorded with labels
    when the page sends none (default: the user name). ``allowed_hosts``: when given, requests
    whose ``Host`` header names another host are refused (use it for a server bound to
    127.0.0.1 without a token, against DNS rebinding). ``max_body``: largest request body, bytes.
    ``warm``: on start-up, import what rounds need in the background (see :func:`raresift.labelling.warm_up`),
    so that the page's first round does not wait for it. ``concept``: the concept (rare class) requests work
    on unless they name another (``?concept=NAME``; the page has a switcher).
    """
    check_concept(concept)
    path = Path(project_path)
    with Project.open(path) as project:  # fail now, not on the first request
        title = project.path.resolve().name
    default_who = who or labelling.default_who()
    static_files = {p.name: p for p in sorted((HERE / "static").iterdir()) if p.is_file()}
    templates = Jinja2Templates(directory=str(HERE / "templates"))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.warm_up = labelling.warm_up() if warm else None
        yield

    app = FastAPI(
        lifespan=lifespan,
        title="raresift labelling API",
        version=__version__,
        description="The JSON API the raresift labelling page uses. Every error has the shape "
        '`{"error": {"code": ..., "message": ..., "details": ...}}`.',
        openapi_url="/api/openapi.json",
        docs_url=None,  # the stock docs page loads its assets from a CDN; /api/docs is local
        redoc_url=None,
    )
    app.add_middleware(_Guard, token=token, allowed_hosts=allowed_hosts, max_body=max_body)
    app.state.project_path = path
    app.state.concept = concept
    app.state.evaluations = {}

    # ---------------------------------------------------------------- errors
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such page or resource: {request.url.path}"
        return _error(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                   for e in exc.errors()]
        first = details[0] if details else {"loc": [], "msg": "invalid"}
        where = ".".join(str(x) for x in first["loc"])
        return _error(422, "invalid_request", f"{where}: {first['msg']}", details)

    @app.exception_handler(LabelConflict)
    async def _conflict(request: Request, exc: LabelConflict):
        cur = exc.current
        if cur is None or cur.value is None:
            what = "had its label withdrawn"
        else:
            what = f"was labelled {'yes' if cur.value else 'no'}"
        who_ = f" by {cur.who}" if cur is not None else ""
        return _error(409, "label_conflict",
                      f"photo {exc.image_id} {what}{who_} since you loaded it; nothing was overwritten",
                      {"image_id": exc.image_id, "current": _event_json(cur)})

    @app.exception_handler(RaresiftError)
    async def _library_error(request: Request, exc: RaresiftError):
        if isinstance(exc, NotReadyError):
            return _error(409, "not_ready", str(exc))
        if isinstance(exc, NotAProjectError):
            return _error(500, "project_missing", str(exc))
        if isinstance(exc, InputError):
            return _error(400, "bad_request", str(exc))
        return _error(400, "bad_request", str(exc))

    @app.exception_handler(sqlite3.OperationalError)
    async def _database_error(request: Request, exc: sqlite3.OperationalError):
        log.warning("database error: %s", exc)
        code, message = _storage_error(exc, request.app.state.project_path)
        return _error(503, code, message)

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.warning("disk full: %s", exc)
            code, message = _storage_error(exc, request.app.state.project_path)
            return _error(503, code, message)
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    # ---------------------------------------------------------------- pages
    def _page(request: Request, mode: str) -> HTMLResponse:
        return templates.TemplateResponse(
            request, "label.html",
            {"mode": mode, "title": title, "who": default_who, "version": __version__,
             "batch": default("batch"), "grid": default("grid_page"), "k": default("k"),
             "concept": _concept_of(request)},
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page_label(request: Request):
        return _page(request, "label")

    @app.get("/grid", response_class=HTMLResponse, include_in_schema=False)
    def page_grid(request: Request):
        return _page(request, "grid")

    @app.get("/evaluate", response_class=HTMLResponse, include_in_schema=False)
    def page_evaluate(request: Request):
        return _page(request, "evaluate")

    @app.get("/api/docs", response_class=HTMLResponse, include_in_schema=False)
    def page_docs(request: Request):
        spec = app.openapi()
        routes = [
            {"method": method.upper(), "path": p, "summary": op.get("summary", ""),
             "description": op.get("description", "")}
            for p, ops in spec["paths"].items() for method, op in ops.items()
        ]
        return templates.TemplateResponse(request, "docs.html", {"routes": routes, "title": title,
                                                                 "version": __version__})

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        # Only names found in the static folder at start-up; nothing from the URL touches a path.
        file = static_files.get(name)
        if file is None:
            return _error(404, "not_found", f"no static file {name!r}")
        media = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        return FileResponse(file, media_type=media, headers={"Cache-Control": "no-cache"})

    # ---------------------------------------------------------------- api
    def _status(project: Project) -> dict[str, Any]:
        return project.status()

    def _counts(project: Project) -> dict[str, Any]:
        # On the path of every label: only what the page's header shows, with `seq` (the newest label
        # event), read in one statement.
        return project.store.label_counts()

    @app.get("/api/status", response_model=StatusOut, summary="Counts, estimates and the labels-vs-positives curve")
    def api_status(project: ProjectDep):
        # One read transaction: every number below, and `seq`, come from the same snapshot of the
        # database (WAL: writers carry on meanwhile), so a page can order this reply among the
        # replies to its label requests by `seq`.
        with project.store.snapshot():
            seq = project.store.label_counts()["seq"]
            return {
                "seq": seq,
                "project": {**_status(project), "seq": seq},
                "estimates": labelling.estimates(project),
                "history": [list(p) for p in labelling.history(project)],
                "strategies": labelling.strategies(),
                "who": default_who,
                "version": __version__,
            }

    @app.get("/api/queue", response_model=ItemsOut, responses=ERRORS,
             summary="Photos waiting for a label, in order",
             description="Only photos without a label. `purpose=evaluate` lists the test photos queued for evaluation.")
    def api_queue(project: ProjectDep, purpose: Literal["label", "evaluate"] = "label",
                  limit: Annotated[int, Query(ge=1, le=1000)] = 50):
        return {"items": labelling.queue(project, purpose=purpose, limit=limit)}

    @app.post("/api/rounds", response_model=ItemsOut, responses=ERRORS,
              summary="Train on the labels so far and queue the next batch",
              description="`strategy` picks the photos; `query` (text) and `examples` (image ids) start a cold "
              "project; strategy `similar` queues the photos most like `examples` (less like `counter_examples`), "
              "each with its similarity as `score`; `evaluate` queues the top-K test photos instead.")
    def api_rounds(project: ProjectDep, body: RoundIn):
        items = labelling.new_round(
            project, n=body.n, strategy=body.strategy, query=body.query, examples=body.examples,
            evaluate=body.evaluate, seed=body.seed, who=body.who or default_who, counter_examples=body.counter_examples,
        )
        return {"items": items}

    @app.post("/api/labels", response_model=LabelsOut, responses=ERRORS,
              summary="Record labels (committed before the reply)",
              description="Each label is stored as a new event with who / when / round / strategy; nothing "
              "is overwritten. Send `expected` to be told (409 label_conflict) when someone else labelled "
              "the photo since you loaded it.")
    def api_labels(project: ProjectDep, body: LabelsIn):
        items = [(it.image_id, it.value, "expected" in it.model_fields_set, it.expected) for it in body.items]
        events = labelling.label_items(project, items, who=body.who or default_who, source="web")
        return {"events": [_event_json(e) for e in events], "status": _counts(project)}

    @app.post("/api/undo", response_model=UndoOut, responses=ERRORS,
              summary="Withdraw a label (yours by default)",
              description="Without `image_id`, withdraws the newest label given by `who`.")
    def api_undo(project: ProjectDep, body: Annotated[UndoIn, Body()] = UndoIn()):
        ev = labelling.undo(project, who=body.who or default_who, image_id=body.image_id,
                          event_id=body.expected if "expected" in body.model_fields_set else None)
        return {"event": _event_json(ev), "item": labelling.item(project, ev.image_id), "status": _counts(project)}

    @app.post("/api/examples", response_model=ExampleOut, responses=ERRORS,
              summary="Add an example photo: an image file (base64) or a box of a photo of the project",
              description="The image is copied into PROJECT/examples/, embedded with the project's model, and "
              "never counted as a photo of the collection. Send its key in `examples` of POST /api/rounds.")
    def api_examples(project: ProjectDep, body: ExampleIn):
        if body.data is not None:
            import base64
            import binascii

            try:
                raw = base64.b64decode(body.data.split(",", 1)[-1], validate=True)
            except (binascii.Error, ValueError):
                raise InputError("data must be an image file in base64") from None
            return {"key": project.add_example(raw)}
        if body.image_id is None or body.box is None:
            raise InputError("give `data` (an image file, base64) or `image_id` with `box` (x, y, width, height)")
        return {"key": project.add_example_crop(body.image_id, tuple(body.box))}

    @app.get("/api/images/{image_id:int}", response_model=Item, responses=ERRORS, summary="One photo and its label")
    def api_image(project: ProjectDep, image_id: ImageIdPath):
        if project.store.image_row(image_id) is None:
            return _error(404, "not_found", f"no photo with id {image_id}")
        return labelling.item(project, image_id)

    @app.get("/api/images/{image_id:int}/file", responses={200: {"content": {"image/jpeg": {}}}, **FILE_ERRORS},
             summary="The photo file (registered photos that decoded, by id)",
             description="410 unreadable_photo for a photo recorded as unreadable (status 'error').")
    def api_image_file(project: ProjectDep, image_id: ImageIdPath):
        row = project.store.image_row(image_id)
        if row is None:
            return _error(404, "not_found", f"no photo with id {image_id}")
        if row["status"] not in SERVED_STATUSES:
            # A file raresift could not decode (corrupt, truncated, a decompression bomb) is not
            # handed to the browser either: it would only fail there, or worse.
            reason = project.store.error_reason(image_id)
            return _error(410, "unreadable_photo",
                          f"photo {image_id} could not be read when it was added, so it is not served"
                          + (f" ({reason})" if reason else ""),
                          {"image_id": image_id, "status": row["status"]})
        file = project.file_path(image_id)
        if file is None or not file.is_file():
            return _error(404, "not_found", f"photo {image_id} has no readable file")
        media = PHOTO_TYPES.get(file.suffix.lower(), "application/octet-stream")
        return FileResponse(file, media_type=media, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/images/{image_id:int}/crop", responses={200: {"content": {"image/jpeg": {}}}, **FILE_ERRORS},
             summary="A box of the photo, decoded from the original file at its own resolution",
             description="x, y, width, height in the original file's pixels (after its EXIF orientation), as "
             "`region` gives them. The box is cut from the file at its full resolution and resampled (Lanczos) "
             "to `size` pixels on its longer side: down where the file has more pixels, up (at most 8x) where it "
             "has fewer, so the page shows it at screen size without upscaling a thumbnail.")
    def api_image_crop(project: ProjectDep, image_id: ImageIdPath, x: Annotated[int, Query(ge=0)],
                       y: Annotated[int, Query(ge=0)], width: Annotated[int, Query(ge=1)],
                       height: Annotated[int, Query(ge=1)], size: Annotated[int, Query(ge=16, le=4096)] = 1024):
        row = project.store.image_row(image_id)
        if row is None:
            return _error(404, "not_found", f"no photo with id {image_id}")
        if row["status"] not in SERVED_STATUSES:
            return _error(410, "unreadable_photo", f"photo {image_id} could not be read when it was added",
                          {"image_id": image_id, "status": row["status"]})
        file = project.file_path(image_id)
        if file is None or not file.is_file():
            return _error(404, "not_found", f"photo {image_id} has no readable file")
        from ..embed.decode import DecodeError, crop_jpeg

        try:
            data = crop_jpeg(file, (x, y, width, height), size=size)
        except DecodeError as exc:
            return _error(410, "unreadable_photo", f"photo {image_id} cannot be read: {exc}", {"image_id": image_id})
        except ValueError as exc:
            raise InputError(str(exc)) from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/evaluation", responses=ERRORS, summary="precision@K on the test split against random")
    def api_evaluation(project: ProjectDep, k: Annotated[int, Query(ge=1, le=100_000)] = default("k")
                       ) -> dict[str, Any]:
        # Retraining is the slow part: the same labels, rounds, vectors and cold start give the same
        # report, so it is kept until one of them changes.
        key = (k, *labelling.evaluation_state(project))
        cached = app.state.evaluations.get(key)
        if cached is None:
            cached = labelling.evaluation(project, k=k)
            app.state.evaluations = {key: cached}  # only the newest state is worth keeping
        return cached

    @app.post("/api/export", responses=ERRORS, summary="Export the top of the ranking into PROJECT/exports/")
    def api_export(project: ProjectDep, body: ExportIn) -> dict[str, Any]:
        out = labelling.export(project, top=body.top, fmt=body.fmt)
        return {"path": str(out)}

    @app.get("/api/concepts", summary="The project's concepts (rare classes) with their label counts",
             description="Every request works on one concept: `?concept=NAME` (default: the server's --concept). "
             "A concept comes into being with its first label or round.")
    def api_concepts(project: ProjectDep) -> dict[str, Any]:
        return {"concepts": project.concepts(), "current": project.concept}

    @app.get("/api/strategies", summary="Strategy names a round can use")
    def api_strategies() -> dict[str, Any]:
        return {"strategies": labelling.strategies()}

    return app
