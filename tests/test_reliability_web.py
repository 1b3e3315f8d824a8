"""The real `raresift serve` process under faults and load: SIGKILL while labels stream in, two labellers
at once, `embed` beside `serve`, hostile requests, the token off loopback, and the API fuzzed from its
own OpenAPI spec.

The promise checked everywhere: a label the API acknowledged (HTTP 200 with its event) is in the store,
and no label is silently overwritten.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import make_collection

TOKEN_HEADER = "X-Raresift-Token"


# ---------------------------------------------------------------------- helpers
class Server:
    """A `raresift serve` child process on a free port."""

    def __init__(self, project: Path, *extra: str):
        self.project = project
        self.log = project.parent / f"serve-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "raresift", "serve", str(project), "--no-browser", "--port", "0", *extra],
                stdout=subprocess.DEVNULL, stderr=err,
            )
        deadline = time.monotonic() + 60
        m = None
        while time.monotonic() < deadline and m is None:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()}")
            m = re.search(r"at http://([^/\s]+):(\d+)/(\S*)", self.log.read_text())
            if m is None:
                time.sleep(0.05)
        assert m, self.log.read_text()
        host = m.group(1).strip("[]")
        self.host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.port = int(m.group(2))
        self.token = (re.search(r"token=(\S+)", m.group(3)) or [None, None])[1]
        while time.monotonic() < deadline:
            try:
                status, _ = self.request("GET", "/static/app.css")
                if status:
                    break
            except OSError:
                time.sleep(0.05)

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=60)

    def request(self, method: str, path: str, body=None, headers: dict | None = None,
                conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
        own = conn is None
        c = conn or self.conn()
        try:
            h = dict(headers or {})
            if self.token and "X-Raresift-Token" not in h and "no-token" not in h:
                h[TOKEN_HEADER] = self.token
            h.pop("no-token", None)
            if body is not None and not isinstance(body, (bytes, str)):
                body = json.dumps(body)
                h.setdefault("Content-Type", "application/json")
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            if own:
                c.close()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def serving(project: Path, *extra: str) -> Iterator[Server]:
    s = Server(project, *extra)
    try:
        yield s
    finally:
        s.stop()


def label_body(image_id: int, value: int | None, who: str, **extra) -> dict:
    item = {"image_id": image_id, "value": value, **extra}
    return {"items": [item], "who": who}


def stored_events(project: Path) -> dict[int, tuple[int, int | None, str]]:
    conn = sqlite3.connect(project / "raresift.sqlite", timeout=30)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {r[0]: (r[1], r[2], r[3]) for r in conn.execute("SELECT id, image_id, value, who FROM labels")}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def vectors_template(tmp_path_factory) -> Path:
    """A project of 900 photos known only by URI, with random vectors (labels need no image files)."""
    from raresift import Project

    root = tmp_path_factory.mktemp("webrel")
    rng = np.random.default_rng(0)
    np.save(root / "emb.npy", rng.normal(size=(900, 16)).astype(np.float32))
    (root / "ids.txt").write_text("".join(f"https://example.org/photos/{i:04d}.jpg\n" for i in range(900)))
    with Project.create(root / "project") as p:
        p.import_embeddings(root / "emb.npy", root / "ids.txt")
    return root / "project"


@pytest.fixture
def vectors_project(vectors_template, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "project"
    shutil.copytree(vectors_template, dst)
    return dst


# ---------------------------------------------------------------------- SIGKILL while labels stream in
@pytest.mark.timeout(300)
def test_sigkill_server_while_labels_stream_in(vectors_project):
    """Three clients stream single labels; the server is SIGKILLed mid-stream, restarted, killed again.
    Every acknowledged label event must be in the store with its image, value and labeller."""
    project = vectors_project
    rng = np.random.default_rng(5)
    acked: dict[int, tuple[int, int | None, str]] = {}
    sent = 0
    kills = 0
    lock = threading.Lock()
    for cycle in range(5):
        server = Server(project)
        stop = threading.Event()

        def stream(who: str, seed: int) -> None:
            nonlocal sent
            r = np.random.default_rng(seed)
            try:
                c = server.conn()
                while not stop.is_set():
                    image_id = int(r.integers(1, 301))
                    value = [0, 1, None][int(r.integers(0, 3))]
                    with lock:
                        sent += 1
                    status, body = server.request("POST", "/api/labels", label_body(image_id, value, who), conn=c)
                    if status == 200:
                        for ev in json.loads(body)["events"]:
                            with lock:
                                acked[ev["id"]] = (ev["image_id"], ev["value"], ev["who"])
                    else:
                        assert status in (400, 409), body  # never a 500
            except (OSError, http.client.HTTPException):
                return  # the server died under us: that request was not acknowledged

        threads = [threading.Thread(target=stream, args=(f"labeller{k}", 100 * cycle + k)) for k in range(3)]
        for t in threads:
            t.start()
        time.sleep(float(rng.uniform(0.5, 2.0)))
        server.kill()
        kills += 1
        stop.set()
        for t in threads:
            t.join(timeout=30)
        stored = stored_events(project)
        missing = {k: v for k, v in acked.items() if stored.get(k) != v}
        assert not missing, f"{len(missing)} acknowledged labels missing or changed after kill {kills}"
    assert len(acked) > 50, f"too few labels got through to test anything ({len(acked)})"
    print(f"\nRELIABILITY server SIGKILLs: {kills}; label requests sent: {sent}; "
          f"acknowledged events: {len(acked)}; stored: {len(acked)} (all)")


# ---------------------------------------------------------------------- two labellers at once
def _labeller(server: Server, who: str, plan: list[tuple[int, int]], expected: bool, out: dict) -> None:
    c = server.conn()
    results = []
    for image_id, value in plan:
        extra = {"expected": None} if expected else {}
        status, body = server.request("POST", "/api/labels", label_body(image_id, value, who, **extra), conn=c)
        results.append((image_id, value, status, json.loads(body)))
    c.close()
    out[who] = results


@pytest.mark.timeout(300)
@pytest.mark.parametrize("check", [False, True], ids=["last-write-kept-with-conflict", "expected-event-409"])
def test_two_labellers_500_each(vectors_project, check):
    """Alice labels photos 1-500, Bob 401-900 (301-500 and 401-600 in the 409 case), at the same time;
    on the 100 shared photos they disagree half the time. Without `expected`, both labels are kept in the
    history and each disagreement is flagged as a conflict; with `expected` (the client saw no label), the
    second writer gets a 409 that shows the first label, and nothing is overwritten."""
    project = vectors_project
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, size=901)
    # 2 x 500 for the main case; the 409 case needs only the shared photos and a margin (2 x 200).
    lo, hi = (1, 901) if not check else (301, 601)
    alice = [(i, int(truth[i])) for i in range(lo, 501)]
    bob = [(i, int(truth[i]) if (i < 401 or i % 2) else 1 - int(truth[i])) for i in range(401, hi)]
    shared = set(range(401, 501))
    disagree = {i for i in shared if i % 2 == 0}
    out: dict = {}
    with serving(project) as server:
        ts = [threading.Thread(target=_labeller, args=(server, w, plan, check, out))
              for w, plan in (("alice", alice), ("bob", bob))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        status_code, body = server.request("GET", "/api/status")
        assert status_code == 200
        shown = json.loads(body)["project"]
        conflict_view = {i: json.loads(server.request("GET", f"/api/images/{i}")[1]) for i in sorted(disagree)[:5]}

    stored = stored_events(project)
    acked = 0
    for who in ("alice", "bob"):
        for image_id, value, status, body in out[who]:
            if status == 200:
                acked += 1
                for ev in body["events"]:
                    assert stored[ev["id"]] == (image_id, value, who)
            else:
                assert check and status == 409, (status, body)
                assert image_id in shared
                assert body["error"]["code"] == "label_conflict"
                other = body["error"]["details"]["current"]
                assert other["who"] != who and other["image_id"] == image_id
    by_image: dict[int, list[tuple[int | None, str]]] = {}
    for ev_id in sorted(stored):
        image_id, value, who = stored[ev_id]
        by_image.setdefault(image_id, []).append((value, who))
    sent = len(alice) + len(bob)
    assert len(by_image) == hi - lo, "every photo got its label"
    if not check:
        assert acked == sent == 1000
        for i in shared:
            assert {w for _, w in by_image[i]} == {"alice", "bob"}, "both labels kept in the history"
        assert shown["conflicts"] == len(disagree), "each disagreement recorded once as a conflict"
        for i, item in conflict_view.items():
            assert item["labelled_by"] in ("alice", "bob")
    else:
        n409 = sum(1 for w in out for *_, s, _ in out[w] if s == 409)
        assert acked + n409 == sent
        assert n409 == len(shared), "exactly one of the two writers of each shared photo is told of the conflict"
        for i in shared:
            assert len(by_image[i]) == 1, "the first label stands; nothing overwritten"
        assert shown["conflicts"] == 0
    print(f"\nRELIABILITY two labellers ({'expected' if check else 'no expected'}): sent {sent}, acknowledged "
          f"{acked}, stored {sum(len(v) for v in by_image.values())} events on {len(by_image)} photos, "
          f"conflicts flagged {shown['conflicts']}")


# ---------------------------------------------------------------------- embed and serve at once
@pytest.mark.timeout(300)
def test_embed_and_serve_on_one_project(tmp_path):
    from raresift import Project

    images = tmp_path / "images"
    make_collection(images, n=80, n_rare=6, seed=8)
    project = tmp_path / "project"
    with Project.create(project, images=images) as p:
        p.add_images()
    with serving(project) as server:
        embed = subprocess.Popen(
            [sys.executable, "-m", "raresift", "embed", str(project), "--tiles", "0", "--batch-size", "4",
             "--no-progress"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        codes: dict[str, list[int]] = {}
        slowest: dict[str, float] = {}
        acked = []
        k = 0
        c = server.conn()
        while embed.poll() is None or k < 10:
            k += 1
            image_id = 1 + k % 80
            for name, method, path, body in (
                ("label", "POST", "/api/labels", label_body(image_id, k % 2, "carol")),
                ("status", "GET", "/api/status", None),
                ("file", "GET", f"/api/images/{image_id}/file", None),
                ("queue", "GET", "/api/queue", None),
                ("round", "POST", "/api/rounds", {"n": 3}) if k % 5 == 0 else (None, None, None, None),
            ):
                if name is None:
                    continue
                t0 = time.monotonic()
                status, payload = server.request(method, path, body, conn=c)
                slowest[name] = max(slowest.get(name, 0.0), time.monotonic() - t0)
                codes.setdefault(name, []).append(status)
                assert status < 500, f"{name} -> {status}: {payload[:300]!r}"
                if name == "label" and status == 200:
                    acked += json.loads(payload)["events"]
        c.close()
        _, err = embed.communicate(timeout=300)
        assert embed.returncode == 0, err
    assert set(codes["label"]) == {200} and set(codes["status"]) == {200} and set(codes["file"]) == {200}
    assert set(codes["round"]) <= {200, 409}
    stored = stored_events(project)
    for ev in acked:
        assert stored[ev["id"]] == (ev["image_id"], ev["value"], "carol")
    with Project.open(project) as p:
        assert p.status()["embedded"] == 80
    print(f"\nRELIABILITY embed beside serve: {sum(len(v) for v in codes.values())} requests during the run, "
          f"none 5xx; {len(acked)} labels acknowledged and stored; slowest (s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in slowest.items()))


# ---------------------------------------------------------------------- hostile requests
TRAVERSALS = [
    "..", "../raresift.sqlite", "%2e%2e%2fraresift.sqlite", "%252e%252e%252f", "..%c0%af", "%c0%ae%c0%ae/",
    "\uff0e\uff0e/raresift.sqlite", "..\\raresift.sqlite", "..%5craresift.sqlite", "....//", ".%2e/", "%2e./",
    "..%00.css", "app.css%00", "app.css/..", "%2fetc%2fpasswd", "/etc/passwd", "..;/", "~root", "$HOME",
]
ROUTES = ["/static/", "/api/images/", "/api/images/1/", "/", "/api/"]


def test_path_traversal_variants_never_leak(embedded_project):
    project, images, _ = embedded_project
    marker = b"RARESIFT-SECRET-MARKER"
    (project / "secret.txt").write_bytes(marker)
    (images / "secret.txt").write_bytes(marker)
    db = (project / "raresift.sqlite").read_bytes()[:16]
    tried = 0
    with serving(project) as server:
        c = server.conn()
        for route in ROUTES:
            for t in TRAVERSALS:
                for path in (route + t + "/secret.txt", route + t + "/raresift.sqlite"):
                    raw = "".join(ch if ord(ch) < 128 else "".join(f"%{b:02X}" for b in ch.encode()) for ch in path)
                    c.putrequest("GET", raw, skip_accept_encoding=True)
                    c.endheaders()
                    r = c.getresponse()
                    body = r.read()
                    tried += 1
                    assert r.status < 500 or r.status == 400, (path, r.status)
                    assert marker not in body and db not in body, f"{path} leaked a file"
                    assert b"root:x:0:0" not in body, f"{path} leaked /etc/passwd"
                    if r.will_close:
                        c.close()
                        c = server.conn()
        c.close()
    print(f"\nRELIABILITY path traversal requests tried: {tried}, none leaked")


def test_oversized_and_malformed_bodies(embedded_project):
    project, _, _ = embedded_project
    with serving(project) as server:
        big = json.dumps({"items": [{"image_id": 1, "value": 1}] * 20000, "who": "x"})
        assert server.request("POST", "/api/labels", big, {"Content-Type": "application/json"})[0] == 413
        huge_header = {"Content-Type": "application/json", "Content-Length": str(10**12)}
        c = server.conn()
        c.putrequest("POST", "/api/labels")
        for k, v in huge_header.items():
            c.putheader(k, v)
        c.endheaders()
        c.send(b"{}")
        assert c.getresponse().status == 413
        c.close()
        # Deeply nested JSON that fits the size limit: refused as invalid, not a server error.
        deep = '{"items": ' + "[" * 50000 + "]" * 50000 + "}"
        status, body = server.request("POST", "/api/labels", deep, {"Content-Type": "application/json"})
        assert status in (400, 422), (status, body[:200])
        assert server.request("POST", "/api/labels", "{\"items\": [", {"Content-Type": "application/json"})[0] == 422
        too_many = {"items": [{"image_id": 1, "value": 1}] * 1001}
        assert server.request("POST", "/api/labels", too_many)[0] == 422
        long_who = label_body(1, 1, "w" * 10_000)
        assert server.request("POST", "/api/labels", long_who)[0] == 422
        status, _ = server.request("GET", "/api/queue?limit=" + "9" * 5000)
        assert status == 422
    stored = stored_events(project)
    assert stored == {}, "no refused request stored a label"


def test_token_required_off_loopback(embedded_project):
    project, _, _ = embedded_project
    with serving(project, "--host", "0.0.0.0") as server:
        assert server.token and len(server.token) >= 16, "a token is generated and printed"
        for path in ("/", "/api/status", "/api/openapi.json", "/api/images/1/file", "/static/app.css", "/grid"):
            status, body = server.request("GET", path, headers={"no-token": "1"})
            assert status == 401, path
            status, _ = server.request("GET", path, headers={TOKEN_HEADER: "wrong-token-123456"})
            assert status == 401, path
            status, _ = server.request("GET", path)
            assert status == 200, path
        status, _ = server.request("POST", "/api/labels", label_body(1, 1, "eve"), headers={"no-token": "1"})
        assert status == 401
        status, _ = server.request("GET", "/api/status", headers={"no-token": "1",
                                                                  "Authorization": f"Bearer {server.token}"})
        assert status == 200
    assert stored_events(project) == {}, "an unauthenticated request stored a label"
    r = subprocess.run([sys.executable, "-m", "raresift", "serve", str(project), "--host", "0.0.0.0",
                        "--token", "short", "--no-browser"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------- out-of-range numbers
# Found by the fuzz test below (500 OverflowError from sqlite3, ValueError from numpy), fixed in the web app.
HUGE = 2**63


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", f"/api/images/{10**20}", None),
        ("GET", f"/api/images/{10**20}/file", None),
        ("POST", "/api/labels", {"items": [{"image_id": HUGE, "value": 1}]}),
        ("POST", "/api/undo", {"image_id": HUGE}),
        ("POST", "/api/rounds", {"n": 3, "examples": [HUGE]}),
        ("POST", "/api/rounds", {"n": 3, "seed": HUGE}),
        ("POST", "/api/rounds", {"n": 3, "seed": -1}),
    ],
    ids=["image", "image-file", "label", "undo", "round-examples", "round-seed-huge", "round-seed-negative"],
)
def test_out_of_range_integers_are_client_errors(embedded_project, method, path, body):
    import warnings

    from raresift.web import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    project, _, _ = embedded_project
    with TestClient(create_app(project, who="t"), raise_server_exceptions=False) as client:
        r = client.request(method, path, json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert stored_events(project) == {}


# ---------------------------------------------------------------------- fuzzing from the OpenAPI spec
@pytest.mark.timeout(600)
def test_openapi_fuzz_no_server_errors(embedded_project):
    """schemathesis generates requests for every operation of /api/openapi.json: never a 5xx."""
    import warnings

    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error

    from raresift.web import create_app

    project, _, _ = embedded_project
    app = create_app(project, who="fuzzer")
    schema = schemathesis.openapi.from_asgi("/api/openapi.json", app)
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy()

        @hypothesis.settings(max_examples=15, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=strategy)
        def run(case):
            nonlocal calls
            calls += 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    response = case.call()
                except Exception as exc:  # the app raised: the client would have got a 500
                    failures.append(f"{case.method} {case.formatted_path} query={case.query!r:.100} "
                                    f"body={case.body!r:.200} -> {type(exc).__name__}: {exc}")
                    return
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.body!r:.200} -> "
                                f"{response.status_code} {response.text[:300]}")

        run()
    assert calls > 50
    assert not failures, "\n".join(failures[:10])
    assert not_a_server_error  # the check this loop performs by hand
    print(f"\nRELIABILITY OpenAPI fuzz: {calls} generated requests, 0 server errors")
