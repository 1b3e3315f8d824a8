"""The real `raresift serve` process: no URL reads a file outside the registered photos; tokens; binding."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from raresift import Project

SECRET = "TOP-SECRET-MARKER-7f3a"


@contextlib.contextmanager
def running_server(project: Path, *extra: str, env: dict | None = None) -> Iterator[str]:
    """Start `raresift serve PROJECT --no-browser --port 0` and yield its base URL (as printed)."""
    log = project.parent / f"serve-{time.monotonic_ns()}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raresift", "serve", str(project), "--no-browser", "--port", "0", *extra],
            stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})},
        )
    try:
        url = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and url is None:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {log.read_text()}")
            m = re.search(r"at (http://\S+)", log.read_text())
            if m:
                url = m.group(1)
            else:
                time.sleep(0.1)
        assert url, f"server printed no URL: {log.read_text()}"
        host, port = re.match(r"http://([^/]+):(\d+)/", url).groups()
        while time.monotonic() < deadline:  # the URL is printed just before uvicorn starts serving
            try:
                with contextlib.closing(http.client.HTTPConnection(host.strip("[]"), int(port), timeout=2)) as c:
                    c.request("GET", "/static/app.css")
                    c.getresponse().read()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def raw_get(url: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no client-side normalisation of `..` or `%2e`)."""
    host, port = re.match(r"http://([^/]+):(\d+)/", url).groups()
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("GET", path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def served(embedded_project) -> Iterator[tuple[str, Path, Path]]:
    project, images, _ = embedded_project
    # Files a traversal could reach: beside the photos, in the project, above both.
    (images / "secret.txt").write_text(SECRET)
    (images.parent / "secret.txt").write_text(SECRET)
    (project / "secret.txt").write_text(SECRET)
    with running_server(project) as url:
        yield url, project, images


TRAVERSALS = [
    "../secret.txt", "../../secret.txt", "..%2fsecret.txt", "%2e%2e/secret.txt", "%2e%2e%2fsecret.txt",
    "%2E%2E%2F%2E%2E%2Fsecret.txt", "..%5csecret.txt", "%252e%252e%252fsecret.txt", "....//secret.txt",
    "/secret.txt", "//secret.txt", "..//..//secret.txt", "a/../../secret.txt", "secret.txt",
    "..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd", "../../../../../../etc/passwd", "%2fetc%2fpasswd",
    "raresift.sqlite", "..%2fraresift.sqlite", "..%2f..%2fproject%2fraresift.sqlite", "%00", "1%00.jpg",
    "1/../../secret.txt", "1%2f..%2f..%2fsecret.txt", "..;/secret.txt", "b/img_0000.jpg",
]
PREFIXES = ["/", "/static/", "/api/", "/api/images/", "/api/images/1/", "/api/images/1/file/", "/grid/",
            "/evaluate/", "/api/docs/", "/api/queue/", "//", "/static//", "/api//images//"]


def test_no_url_reads_a_file_outside_the_registered_photos(served):
    url, project, images = served
    with Project.open(project) as p:
        n = p.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        photos = {p.file_path(i).read_bytes() for i in range(1, n + 1)}
    forbidden = [SECRET.encode(), b"root:x:0:0", b"SQLite format 3"]
    seen = 0
    for prefix in PREFIXES:
        for t in TRAVERSALS:
            for path in (prefix + t, prefix + t + "?token=x", prefix + t.replace("secret.txt", "file")):
                status, body = raw_get(url, path)
                seen += 1
                for marker in forbidden:
                    assert marker not in body, f"{path} returned a file outside the registry ({status})"
                if status == 200 and body[:3] in (b"\xff\xd8\xff", b"\x89PN"):
                    assert body in photos, f"{path} returned an image that is not a registered photo"
    assert seen == len(PREFIXES) * len(TRAVERSALS) * 3
    # The photo route itself serves registered photos by id, and nothing else.
    status, body = raw_get(url, "/api/images/1/file")
    assert status == 200 and body in photos
    for bad in ("/api/images/0/file", f"/api/images/{n + 1}/file", "/api/images/-1/file", "/api/images/1.0/file",
                "/api/images/%31/file/..", "/api/images/1%2f..%2f..%2fsecret.txt/file"):
        status, body = raw_get(url, bad)
        assert status in (400, 404, 422), bad
        assert json.loads(body)["error"]["code"], bad


def test_every_error_has_one_json_shape(served):
    url, _, _ = served
    for path in ("/nope", "/api/nope", "/api/images/abc", "/api/queue?limit=-1", "/api/queue?purpose=x",
                 "/static/../app.js", "/api/images/99999"):
        status, body = raw_get(url, path)
        assert status >= 400, path
        err = json.loads(body)["error"]
        assert set(err) >= {"code", "message"} and err["message"], path


def test_token_is_checked_on_every_request(embedded_project):
    project, _, _ = embedded_project
    with running_server(project, "--token", "s3cret-token-123") as url:
        assert url.endswith("?token=s3cret-token-123")
        for path in ("/", "/grid", "/api/status", "/api/images/1/file", "/static/app.js", "/api/openapi.json"):
            status, body = raw_get(url, path)
            assert status == 401, path
            assert json.loads(body)["error"]["code"] == "unauthorized"
            assert raw_get(url, path, {"X-Raresift-Token": "wrong-token-0000"})[0] == 401
            assert raw_get(url, path, {"X-Raresift-Token": "s3cret-token-123"})[0] == 200, path
            assert raw_get(url, path, {"Cookie": "raresift_token=s3cret-token-123"})[0] == 200, path
            assert raw_get(url, path + "?token=s3cret-token-123")[0] == 200, path


def test_binding_another_address_generates_a_token(embedded_project):
    project, _, _ = embedded_project
    with running_server(project, "--host", "0.0.0.0") as url:
        m = re.search(r"\?token=(\S+)$", url)
        assert m, url
        assert raw_get(url, "/api/status")[0] == 401
        assert raw_get(url, "/api/status", {"X-Raresift-Token": m.group(1)})[0] == 200


def test_local_server_refuses_foreign_host_names(served):
    url, _, _ = served
    assert raw_get(url, "/api/status", {"Host": "evil.example:8765"})[0] == 400
    assert raw_get(url, "/api/status")[0] == 200


def test_serve_help_matches_what_the_page_and_server_do():
    import argparse

    from raresift.commands import web

    parser = argparse.ArgumentParser(prog="raresift")
    web.register(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["serve"]  # the parser built just above
    text = " ".join(sub.format_help().split())
    js = (Path(web.__file__).parents[1] / "web" / "static" / "app.js").read_text()
    handled = set(re.findall(r'"([^"]+)"', re.search(r"const HANDLED = new Set\(\[(.*?)\]\)", js, re.DOTALL).group(1)))
    # Every key the help names is one the page handles, and the grid size is the page's.
    for keys in re.findall(r"((?:[\w]+/)*[\w]+) = ", text.split("Keys:")[1].split(". /grid")[0]):
        for key in keys.split("/"):
            assert key in handled, (key, handled)
    # the page's grid size is the settings' (the server writes it into the page; app.js reads it there)
    from raresift.settings import default

    assert web.GRID == default("grid_page") and "body.dataset.grid" in js
    assert f"/grid shows {web.GRID} photos" in text and "Enter saves the page" in text and "Enter" in handled
    assert 'if (!saved && MODE === "grid" && names.includes("top")) pick = "top";' in js  # the grid's rounds: top
    assert f"default {web.DEFAULT_PORT}" in text and f"default {web.DEFAULT_HOST}" in text
    args = parser.parse_args(["serve", "p"])
    assert (args.host, args.port, args.no_browser, args.token) == (web.DEFAULT_HOST, web.DEFAULT_PORT, False, None)
