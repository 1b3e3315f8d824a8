"""The JSON API under /api, in process (the same app `raresift serve` runs)."""

from __future__ import annotations

import errno
import sqlite3
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from raresift import Project
from raresift.web import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.fixture
def client(embedded_project):
    project, images, truth = embedded_project
    with TestClient(create_app(project, who="tester")) as c:
        c.project_path = project
        c.truth = truth
        yield c


def assert_error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    if code:
        assert err["code"] == code
    return err


def first_items(client, n: int = 5) -> list[dict]:
    items = client.get("/api/queue").json()["items"]
    if not items:
        items = client.post("/api/rounds", json={"n": n}).json()["items"]
    return items


def test_pages_and_assets_are_local(client):
    for path, mode in (("/", "label"), ("/grid", "grid"), ("/evaluate", "evaluate")):
        r = client.get(path)
        assert r.status_code == 200 and f'data-mode="{mode}"' in r.text
        assert "http://" not in r.text and "https://" not in r.text  # no CDN, nothing remote
    for name in ("app.js", "app.css", "favicon.svg"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.content
        content = r.content.replace(b'xmlns="http://www.w3.org/2000/svg"', b"")  # a name, not a download
        assert b"https://" not in content and b"http://" not in content
    docs = client.get("/api/docs")
    assert docs.status_code == 200 and "/api/labels" in docs.text and "cdn" not in docs.text.lower()


def test_openapi_documents_every_api_route_and_the_error_shape(client):
    spec = client.get("/api/openapi.json").json()
    paths = set(spec["paths"])
    assert {"/api/status", "/api/queue", "/api/rounds", "/api/labels", "/api/undo", "/api/images/{image_id}",
            "/api/images/{image_id}/file", "/api/evaluation", "/api/export", "/api/strategies"} <= paths
    api_routes = {r.path.replace(":int", "") for r in client.app.routes if getattr(r, "path", "").startswith("/api/")}
    assert api_routes - {"/api/openapi.json", "/api/docs"} <= paths
    assert "ErrorOut" in spec["components"]["schemas"]
    assert "409" in spec["paths"]["/api/labels"]["post"]["responses"]


def test_first_visit_queues_a_batch_and_labels_record_who_round_strategy(client):
    assert client.get("/api/queue").json()["items"] == []
    items = client.post("/api/rounds", json={"n": 6, "seed": 1}).json()["items"]
    assert len(items) == 6 and all(it["label"] is None and it["event"] is None for it in items)
    assert [it["image_id"] for it in client.get("/api/queue").json()["items"]] == [it["image_id"] for it in items]
    it = items[0]
    r = client.post("/api/labels", json={"items": [{"image_id": it["image_id"], "value": 1, "expected": None}],
                                         "who": "ann"})
    assert r.status_code == 200, r.text
    ev = r.json()["events"][0]
    assert (ev["value"], ev["who"], ev["source"], ev["round"], ev["strategy"]) == \
        (1, "ann", "web", it["round"], it["strategy"])
    assert r.json()["status"]["labels"] == 1
    assert it["image_id"] not in [x["image_id"] for x in client.get("/api/queue").json()["items"]]
    status = client.get("/api/status").json()
    assert status["project"]["positives"] == 1
    assert status["history"][-1] == [1, 1]
    assert status["estimates"]["round"]["left"] == 5
    with Project.open(client.project_path) as p:
        row = p.db.execute("SELECT who, round_id, strategy, at FROM labels").fetchone()
        assert row["who"] == "ann" and row["round_id"] == it["round"] and row["at"] > 0


def test_conflicting_label_is_refused_and_shown(client):
    it = first_items(client)[0]
    ok = client.post("/api/labels", json={"items": [{"image_id": it["image_id"], "value": 1, "expected": None}],
                                          "who": "ann"})
    assert ok.status_code == 200
    late = client.post("/api/labels", json={"items": [{"image_id": it["image_id"], "value": 0, "expected": None}],
                                            "who": "bob"})
    err = assert_error(late, 409, "label_conflict")
    assert err["details"]["current"]["who"] == "ann" and err["details"]["current"]["value"] == 1
    assert "ann" in err["message"]
    with Project.open(client.project_path) as p:
        assert p.db.execute("SELECT value FROM current_labels WHERE image_id = ?", (it["image_id"],)).fetchone()[0] == 1
    # bob saw ann's label and decides to change it: recorded as a new event marked as a conflict
    fixed = client.post("/api/labels", json={"items": [{"image_id": it["image_id"], "value": 0,
                                                         "expected": err["details"]["current"]["id"]}], "who": "bob"})
    assert fixed.status_code == 200 and fixed.json()["events"][0]["conflict"] is True


def test_a_grid_page_with_one_conflict_writes_nothing(client):
    items = first_items(client, 6)[:4]
    with Project.open(client.project_path) as p:
        p.label([(items[2]["image_id"], 1)], who="bob")
    page = [{"image_id": it["image_id"], "value": 0, "expected": it["event"]} for it in items]
    assert_error(client.post("/api/labels", json={"items": page, "who": "ann"}), 409, "label_conflict")
    with Project.open(client.project_path) as p:
        assert p.status()["labels"] == 1


def test_undo_withdraws_only_what_it_names(client):
    items = first_items(client)
    a, b = items[0], items[1]
    ev_a = client.post("/api/labels", json={"items": [{"image_id": a["image_id"], "value": 1}], "who": "ann"}).json()
    client.post("/api/labels", json={"items": [{"image_id": b["image_id"], "value": 0}], "who": "ann"})
    r = client.post("/api/undo", json={"who": "ann"})  # ann's newest label
    assert r.status_code == 200 and r.json()["item"]["image_id"] == b["image_id"] and r.json()["event"]["value"] is None
    r = client.post("/api/undo", json={"who": "ann", "image_id": a["image_id"], "expected": ev_a["events"][0]["id"]})
    assert r.status_code == 200
    with Project.open(client.project_path) as p:
        assert p.status()["labels"] == 0
        assert p.db.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 4  # nothing deleted, all events kept
    assert_error(client.post("/api/undo", json={"who": "ann"}), 400)  # nothing left to undo


def test_errors_have_one_shape(client):
    assert_error(client.get("/api/nope"), 404, "not_found")
    assert_error(client.get("/api/images/999"), 404, "not_found")
    assert_error(client.get("/api/images/999/file"), 404, "not_found")
    assert_error(client.get("/api/queue?limit=0"), 422, "invalid_request")
    assert_error(client.post("/api/labels", json={"items": []}), 422, "invalid_request")
    assert_error(client.post("/api/labels", json={"items": [{"image_id": 1, "value": 2}]}), 422, "invalid_request")
    assert_error(client.post("/api/labels", content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert_error(client.post("/api/labels", json={"items": [{"image_id": 9999, "value": 1}]}), 400, "bad_request")
    err = assert_error(client.post("/api/rounds", json={"n": 3, "strategy": "nonsense"}), 400, "bad_request")
    assert "random" in err["message"]  # lists the valid names
    assert_error(client.delete("/api/labels"), 405, "method_not_allowed")


def test_oversized_bodies_are_refused(client):
    big = b'{"items": [' + b'{"image_id": 1, "value": 1},' * 20000 + b'{"image_id": 1, "value": 1}]}'
    assert len(big) > 256 * 1024
    assert_error(client.post("/api/labels", content=big, headers={"content-type": "application/json"}), 413,
                 "too_large")

    def chunks():  # no Content-Length: the limit holds for streamed bodies too
        for _ in range(40):
            yield b"x" * 10_000

    assert_error(client.post("/api/labels", content=chunks(), headers={"content-type": "application/json"}), 413)
    with Project.open(client.project_path) as p:
        assert p.status()["labels"] == 0


def test_requests_from_other_sites_are_refused(client):
    item = {"items": [{"image_id": 1, "value": 1}]}
    assert_error(client.post("/api/labels", json=item, headers={"Origin": "https://evil.example"}), 403, "forbidden")
    form = client.post("/api/labels", content=b'{"items": [{"image_id": 1, "value": 1}]}',
                       headers={"content-type": "text/plain"})  # what a cross-site form can send
    assert_error(form, 415, "unsupported_media_type")
    with Project.open(client.project_path) as p:
        assert p.status()["labels"] == 0
    ok = client.post("/api/labels", json=item, headers={"Origin": "http://testserver"})
    assert ok.status_code == 200


def test_photos_are_served_by_registry_id(client):
    with Project.open(client.project_path) as p:
        expected = p.file_path(3).read_bytes()
    r = client.get("/api/images/3/file")
    assert r.status_code == 200 and r.content == expected and r.headers["content-type"] == "image/jpeg"
    meta = client.get("/api/images/3").json()
    assert meta["image_id"] == 3 and meta["path"].endswith(".jpg")


def test_concurrent_labels_from_many_clients_are_all_kept(client):
    with Project.open(client.project_path) as p:
        ids = [r[0] for r in p.db.execute("SELECT id FROM images ORDER BY id")]

    def post(i):
        return client.post("/api/labels", json={"items": [{"image_id": i, "value": i % 2, "expected": None}],
                                                "who": f"tab{i % 3}"}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(post, ids))
    assert codes == [200] * len(ids)
    with Project.open(client.project_path) as p:
        assert p.status()["labels"] == len(ids)
        assert p.status()["positives"] == sum(i % 2 for i in ids)


def test_cold_start_rounds_query_and_more_like_this(client):
    truth = client.truth
    items = client.post("/api/rounds", json={"n": 4, "query": "bee"}).json()["items"]
    assert len(items) == 4 and all(it["round"] for it in items)
    with Project.open(client.project_path) as p:
        rare = next(p.image_id(path) for path, v in truth.items() if v and p.splits()[p.image_id(path) - 1] == "pool")
    more = client.post("/api/rounds", json={"n": 4, "examples": [rare]})
    assert more.status_code == 200, more.text
    assert rare not in [it["image_id"] for it in more.json()["items"]]
    assert_error(client.post("/api/rounds", json={"n": 4, "examples": [99999]}), 400)


def test_evaluation_and_export_from_the_page(client):
    items = client.post("/api/rounds", json={"n": 5, "evaluate": True}).json()["items"]
    assert items and all(it["split"] == "test" for it in items)
    assert [it["image_id"] for it in client.get("/api/queue?purpose=evaluate").json()["items"]] == \
        [it["image_id"] for it in items]
    truth = client.truth
    page = [{"image_id": it["image_id"], "value": truth[it["path"]]} for it in items]
    assert client.post("/api/labels", json={"items": page}).status_code == 200
    ev = client.get("/api/evaluation?k=5").json()

    with Project.open(client.project_path) as p:
        assert ev == p.evaluate(k=5)  # the page shows exactly what the library computes
    assert ev["k"] == 5 and ev["labels"] == 5
    assert_error(client.get("/api/evaluation?k=0"), 422)
    out = client.post("/api/export", json={"top": 10, "fmt": "csv"})
    assert out.status_code == 200, out.text
    path = out.json()["path"]
    assert path.startswith(str(client.project_path)) and open(path).read().startswith("rank,path")
    assert_error(client.post("/api/export", json={"top": 10, "fmt": "xls"}), 400)


def test_a_project_not_embedded_yet_says_what_to_run(tmp_path):
    from conftest import make_collection

    make_collection(tmp_path / "photos", n=6, n_rare=1)
    with Project.create(tmp_path / "p", images=tmp_path / "photos") as p:
        p.add_images()
    with TestClient(create_app(tmp_path / "p")) as c:
        assert c.get("/").status_code == 200
        err = assert_error(c.post("/api/rounds", json={"n": 3}), 409, "not_ready")
        assert "raresift embed" in err["message"]


def test_create_app_refuses_a_folder_that_is_no_project(tmp_path):
    from raresift import NotAProjectError

    with pytest.raises(NotAProjectError):
        create_app(tmp_path / "nothing")


def test_a_grid_page_spanning_two_rounds_is_one_transaction(client, monkeypatch):
    # Photos of two rounds on one page; bob labels a photo of the second round just before the
    # write. The reply is a 409, and none of ann's labels (of either round) may be committed.
    first = client.post("/api/rounds", json={"n": 3, "seed": 1}).json()["items"]
    second = client.post("/api/rounds", json={"n": 3, "seed": 2}).json()["items"]
    again = {it["image_id"] for it in second}
    only_first = [it for it in first if it["image_id"] not in again]  # photos the second round did not take again
    assert only_first and len(second) >= 2 and only_first[0]["round"] != second[0]["round"]
    page = only_first[:2] + second[:2]
    victim = page[-1]["image_id"]
    from raresift.store import labels as store_labels

    original = store_labels.append
    calls = []

    def append_after_bob(conn, items, **kw):
        items = list(items)
        calls.append(items)
        if len(calls) == 1:  # bob's own write below comes through here too
            with Project.open(client.project_path) as p:
                p.label([(victim, 1)], who="bob")
        return original(conn, items, **kw)

    monkeypatch.setattr(store_labels, "append", append_after_bob)
    body = {"items": [{"image_id": it["image_id"], "value": 1, "expected": it["event"]} for it in page],
            "who": "ann"}
    err = assert_error(client.post("/api/labels", json=body), 409, "label_conflict")
    assert err["details"]["image_id"] == victim
    monkeypatch.setattr(store_labels, "append", original)
    with Project.open(client.project_path) as p:
        assert p.db.execute("SELECT COUNT(*) FROM labels WHERE who = 'ann'").fetchone()[0] == 0
        assert p.status()["labels"] == 1
    # Sent again without the stale photo, the page is written whole, each label with its own round.
    r = client.post("/api/labels", json={"items": body["items"][:-1], "who": "ann"})
    assert r.status_code == 200, r.text
    got = {(ev["image_id"], ev["round"], ev["strategy"]) for ev in r.json()["events"]}
    assert got == {(it["image_id"], it["round"], it["strategy"]) for it in page[:-1]}


def test_photos_recorded_as_unreadable_are_not_served(tmp_path):
    from conftest import make_collection
    from corpus import write_png_bomb

    images = tmp_path / "images"
    make_collection(images, n=4, n_rare=1)
    write_png_bomb(images / "bomb.png")  # 40000 x 40000 pixels in 190 kB
    (images / "cut.jpg").write_bytes((images / "a" / "img_0001.jpg").read_bytes()[:300])
    with Project.create(tmp_path / "project", images=images) as p:
        p.add_images()
        ids = {r["path"]: r["id"] for r in p.db.execute("SELECT id, path FROM images")}
        # Not decoded yet ('new'): served, so a project can be labelled while it embeds.
        with TestClient(create_app(p.path)) as c:
            assert c.get(f"/api/images/{ids['bomb.png']}/file").status_code == 200
        p.embed(batch_size=16)
        status = dict(p.db.execute("SELECT path, status FROM images").fetchall())
        reasons = dict(p.db.execute("SELECT path, reason FROM errors").fetchall())
    assert status["bomb.png"] == status["cut.jpg"] == "error" and status["a/img_0001.jpg"] == "embedded"
    with TestClient(create_app(tmp_path / "project")) as c:
        for name in ("bomb.png", "cut.jpg"):
            r = c.get(f"/api/images/{ids[name]}/file")
            err = assert_error(r, 410, "unreadable_photo")
            assert "could not be read" in err["message"] and reasons[name] in err["message"]
            assert err["details"]["status"] == "error"
            assert not r.headers["content-type"].startswith("image/")
            assert c.get(f"/api/images/{ids[name]}").json()["has_file"] is False
        ok = c.get(f"/api/images/{ids['a/img_0001.jpg']}/file")
        assert ok.status_code == 200 and ok.content == (images / "a" / "img_0001.jpg").read_bytes()
        assert c.get(f"/api/images/{ids['a/img_0001.jpg']}").json()["has_file"] is True


def _sqlite_error(message: str, code: int) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError(message)
    exc.sqlite_errorcode = code  # as the sqlite3 module sets it
    return exc


@pytest.mark.parametrize("exc, free, code, words", [
    (_sqlite_error("database or disk is full", sqlite3.SQLITE_FULL), 10**9, "disk_full", "disk holding the project is full"),
    (OSError(errno.ENOSPC, "No space left on device"), 0, "disk_full", "disk holding the project is full"),
    (_sqlite_error("disk I/O error", sqlite3.SQLITE_IOERR_WRITE), 4096, "disk_full", "4 KiB left"),
    (_sqlite_error("disk I/O error", sqlite3.SQLITE_IOERR_WRITE), 10**11, "database_error", "could not be read or written"),
    (_sqlite_error("database is locked", sqlite3.SQLITE_BUSY), 0, "database_busy", "busy"),
])
def test_a_full_disk_is_not_reported_as_a_busy_database(client, monkeypatch, exc, free, code, words):
    from raresift.web import app as web_app
    from raresift import labelling as backend

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(backend, "label_items", fail)
    monkeypatch.setattr(web_app, "_free_space", lambda path: free)
    r = client.post("/api/labels", json={"items": [{"image_id": 1, "value": 1}]})
    err = assert_error(r, 503, code)
    assert words in err["message"]
    assert ("busy" in err["message"]) == (code == "database_busy")
    assert ("full" in err["message"]) == (code == "disk_full")


def test_export_onto_a_full_disk_says_so(client, monkeypatch):
    from raresift import labelling as backend

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(backend, "export", fail)
    err = assert_error(client.post("/api/export", json={"top": 5}), 503, "disk_full")
    assert "No space left on device" in err["message"]


def test_start_up_imports_what_the_first_round_needs(embedded_project):
    # In a fresh interpreter: scikit-learn's k-means and SciPy's optimiser (seconds of imports on the
    # first round) are loaded in the background when the app starts, before any round is asked for.
    import subprocess
    import sys

    project = embedded_project[0]
    code = f"""
import sys, warnings
warnings.simplefilter("ignore")
from fastapi.testclient import TestClient
from raresift.web import create_app
from raresift.labelling import WARM_MODULES
app = create_app({str(project)!r})
assert "sklearn.cluster" not in sys.modules and "scipy.optimize" not in sys.modules
with TestClient(app) as c:
    app.state.warm_up.join(120)
    print(sorted(m for m in WARM_MODULES if m in sys.modules))
    print(c.get("/api/status").status_code)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    loaded, status = r.stdout.split("\n")[:2]
    from raresift.labelling import WARM_MODULES

    assert loaded == str(sorted(WARM_MODULES)) and status == "200"


def test_examples_from_a_dropped_file_and_from_a_box(client, tmp_path):
    import base64
    import io

    import numpy as np
    from conftest import make_photo

    buf = io.BytesIO()
    make_photo(np.random.default_rng(5), rare=True).save(buf, format="PNG")
    r = client.post("/api/examples", json={"data": base64.b64encode(buf.getvalue()).decode(), "name": "phone.png"})
    assert r.status_code == 200, r.text
    key = r.json()["key"]
    assert key.startswith("file:")
    items = client.post("/api/rounds", json={"n": 4, "examples": [key]}).json()["items"]
    assert len(items) == 4
    truth = client.truth
    assert sum(truth[it["path"]] for it in items) >= 2  # photos like a rare one come first
    box = client.post("/api/examples", json={"image_id": items[0]["image_id"], "box": [5, 5, 60, 40]})
    assert box.status_code == 200 and box.json()["key"] != key
    assert_error(client.post("/api/examples", json={"image_id": 1}), 400)
    assert_error(client.post("/api/examples", json={"data": "not base64 !!"}), 400)
    assert_error(client.post("/api/rounds", json={"n": 2, "examples": ["file:nothex"]}), 422)
    with Project.open(client.project_path) as p:
        assert p.status()["images"] == len(truth)  # examples never become photos of the collection
