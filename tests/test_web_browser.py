"""The labelling page in headless Chromium, against the real `raresift serve` process.

Every wait here is for a state (the page's action queue drained, a text or data attribute shown),
with a long deadline that only matters when the state never comes: no fixed sleeps, so a slow or
busy machine makes the tests slower, not flaky.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from raresift import Project

from test_web_server import running_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

WAIT_MS = 60_000  # deadline of every wait for a state; a busy 2-core machine may need many seconds

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (Path(CHROMIUM).exists() or shutil.which("chromium")), reason="needs Debian chromium"),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        exe = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
        b = pw.chromium.launch(executable_path=exe, args=ARGS, headless=True)
        yield b
        b.close()


def open_page(browser, url: str, path: str = "/"):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url.replace("/?", path + "?") if "?" in url else url.rstrip("/") + path)
    page.wait_for_selector('body[data-ready="1"]', timeout=WAIT_MS)
    page.errors = errors  # type: ignore[attr-defined]
    return page


def settle(page) -> None:
    """Wait until every key pressed has been handled (and its label committed)."""
    page.wait_for_function('document.body.dataset.busy === "0"', timeout=WAIT_MS)


def expect(locator):
    """Playwright's `expect`, waiting up to WAIT_MS for the state asserted."""
    from playwright.sync_api import expect as pw_expect

    pw_expect.set_options(timeout=WAIT_MS)
    return pw_expect(locator)


def newest_event(project: Path) -> int:
    with Project.open(project) as p:
        return p.db.execute("SELECT COALESCE(MAX(id), 0) FROM labels").fetchone()[0]


def settle_status(page) -> None:
    """Wait until every key has been handled and the status refresh that follows has landed too."""
    page.wait_for_function('document.body.dataset.busy === "0" && document.body.dataset.statusPending === "0"',
                           timeout=WAIT_MS)


def stale_replies(page) -> int:
    """How many replies the page left unapplied because it had applied a newer one."""
    return int(page.get_attribute("body", "data-stale"))


def cli_status(project: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "raresift", "status", str(project), "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def js_pct(x: float) -> str:
    """``x`` as the page's fmtPct shows it: JavaScript's toFixed rounds halves up (6.25 -> "6.3")."""
    places = Decimal("0.1") if x < 0.1 else Decimal("1")
    return f"{Decimal(100 * x).quantize(places, rounding=ROUND_HALF_UP)}%"


def shown_id(page) -> int:
    return int(page.get_attribute("#photo", "data-image-id"))


def test_keys_1_0_1_backspace_leave_two_labels_one_positive(browser, embedded_project):
    project, _, _ = embedded_project
    with running_server(project) as url:
        page = open_page(browser, url)
        first = shown_id(page)
        # the photo on screen has loaded (the browser fetches it after the page is ready)
        page.wait_for_function("(() => { const im = document.getElementById('photo'); "
                               "return im.complete && im.naturalWidth > 0; })()", timeout=WAIT_MS)
        for key in ("1", "0", "1", "Backspace"):
            page.keyboard.press(key)
        settle(page)
        status = cli_status(project)
        assert status["labels"] == 2
        assert status["positives"] == 1
        assert not page.errors
        with Project.open(project) as p:
            events = p.db.execute("SELECT image_id, value, who, source, round_id, strategy FROM labels ORDER BY id").fetchall()
        assert [e["value"] for e in events] == [1, 0, 1, None]
        assert events[0]["image_id"] == first
        assert events[2]["image_id"] == events[3]["image_id"]  # the undo withdrew the third label
        assert all(e["source"] == "web" and e["who"] for e in events)
        assert all(e["round_id"] is not None and e["strategy"] for e in events[:3])  # round, strategy recorded
        # after the undo the page shows the withdrawn photo again, ready to be labelled anew
        assert shown_id(page) == events[3]["image_id"]
        expect(page.locator("#n-labels")).to_have_text("2")
        # ... and still 2 once the status refresh that follows every label has landed: a status
        # reply read before the undo (3 labels) must not overwrite the undo's newer count
        settle_status(page)
        assert page.text_content("#n-labels") == "2"
        assert page.text_content("#n-positives") == "1"
        assert page.get_attribute("body", "data-seq") == str(newest_event(project))


def test_skip_then_label_and_counts(browser, embedded_project):
    project, _, _ = embedded_project
    with running_server(project) as url:
        page = open_page(browser, url)
        first = shown_id(page)
        page.keyboard.press("s")
        settle(page)
        second = shown_id(page)
        assert second != first
        page.keyboard.press("y")
        page.keyboard.press("n")
        settle(page)
        with Project.open(project) as p:
            labels = {r[0]: r[1] for r in p.db.execute("SELECT image_id, value FROM current_labels")}
        assert labels[second] == 1 and len(labels) == 2 and first not in labels
        expect(page.locator("#n-positives")).to_have_text("1")
        expect(page.locator("#n-labels")).to_have_text("2")
        settle_status(page)
        assert page.text_content("#n-positives") == "1" and page.text_content("#n-labels") == "2"


def test_grid_page_marks_and_submits(browser, embedded_project):
    project, _, _ = embedded_project
    with running_server(project) as url:
        page = open_page(browser, url, "/grid")
        tiles = page.locator(".tile")
        expect(tiles.nth(3)).to_be_visible()
        n = tiles.count()
        assert n >= 4
        ids = [int(tiles.nth(i).get_attribute("data-image-id")) for i in range(n)]
        tiles.nth(1).click()                        # click marks a positive
        page.keyboard.press("ArrowRight")           # cursor moves from tile 1 to tile 2
        page.keyboard.press("ArrowRight")
        page.keyboard.press(" ")                    # Space marks the focused tile (3)
        settle(page)
        expect(page.locator(".tile.marked")).to_have_count(2)
        page.keyboard.press("Enter")
        settle(page)
        with Project.open(project) as p:
            labels = {r[0]: r[1] for r in p.db.execute("SELECT image_id, value FROM current_labels")}
        assert {i: labels.get(i) for i in ids} == {i: int(k in (1, 3)) for k, i in enumerate(ids)}
        assert not page.errors


def test_more_like_this_queues_similar_photos(browser, embedded_project):
    project, _, _ = embedded_project
    with running_server(project) as url:
        page = open_page(browser, url)
        example = shown_id(page)
        page.keyboard.press("m")
        settle(page)
        with Project.open(project) as p:
            rounds = p.db.execute("SELECT params FROM rounds ORDER BY id").fetchall()
            assert len(rounds) == 2 and json.loads(rounds[-1][0])["examples"]
            assert p.db.execute("SELECT value FROM current_labels WHERE image_id = ?", (example,)).fetchone()[0] == 1
        assert shown_id(page) != example
        expect(page.locator("#banner")).to_contain_text("Queued")
        page.keyboard.press("u")  # the example's positive label can be undone like any other
        settle(page)
        assert shown_id(page) == example
        with Project.open(project) as p:
            assert p.status()["labels"] == 0
        assert not page.errors


def test_evaluation_view_queues_top_k_and_shows_precision(browser, embedded_project):
    project, _, truth = embedded_project
    # K = every test photo (one grid page): with no pool labels the model is cold and all test photos
    # tie, and the page's numbers then do not depend on how ties are broken (the round and `evaluate`
    # break them the same way, by row; tests/test_session.py checks that they score one ranking).
    with Project.open(project) as p:
        k = p.db.execute("SELECT COUNT(*) FROM images WHERE split = 'test' AND status = 'embedded'").fetchone()[0]
    assert 1 <= k <= 16, "the evaluation test wants every test photo on one grid page"
    with running_server(project) as url:
        page = open_page(browser, url, "/evaluate")
        page.fill("#eval-k", str(k))
        page.locator("#eval-k").blur()
        page.keyboard.press("e")  # queue the model's top-K test photos
        settle(page)
        tiles = page.locator(".tile")
        expect(tiles).to_have_count(k)
        with Project.open(project) as p:
            paths = {i: p.db.execute("SELECT path, split FROM images WHERE id = ?", (i,)).fetchone()
                     for i in (int(tiles.nth(j).get_attribute("data-image-id")) for j in range(k))}
        assert all(split == "test" for _, split in paths.values())
        for j in range(k):
            if truth[paths[int(tiles.nth(j).get_attribute("data-image-id"))][0]]:
                tiles.nth(j).click()
        page.keyboard.press("Enter")
        settle(page)
        # The page loads the evaluation after the page is submitted, beside its action queue.
        expect(page.locator("#eval-result svg.bars")).to_have_count(1)
        with Project.open(project) as p:
            assert {i: p.labels()[path] for i, (path, _) in paths.items()} == \
                {i: truth[path] for i, (path, _) in paths.items()}
            result = p.evaluate(k=k)
        prec = result["precision_at_k"]
        expect(page.locator("#eval-result")).to_contain_text(f"precision@{k} = {js_pct(prec)}")  # the library's
        assert not page.errors


def test_two_tabs_lose_nothing_and_conflicts_are_shown(browser, embedded_project):
    project, _, _ = embedded_project
    with running_server(project) as url:
        a = open_page(browser, url)
        b = open_page(browser, url)
        b.fill("#who", "bob")
        b.locator("#who").dispatch_event("change")
        b.locator("#who").blur()
        same = shown_id(a)
        assert shown_id(b) == same  # both tabs start on the first queued photo
        a.keyboard.press("1")
        settle(a)
        b.keyboard.press("0")       # bob has not seen a's label: shown as a conflict, not overwritten
        settle(b)
        banner = b.locator("#banner")
        expect(banner).to_be_visible()
        expect(banner).to_contain_text("Nothing was overwritten")
        assert "yes" in banner.text_content()
        with Project.open(project) as p:
            assert p.labels() and p.db.execute("SELECT value FROM current_labels WHERE image_id = ?",
                                               (same,)).fetchone()[0] == 1
        b.keyboard.press("r")       # bob decides: use mine
        settle(b)
        with Project.open(project) as p:
            rows = p.db.execute("SELECT value, who, conflict FROM labels WHERE image_id = ? ORDER BY id",
                                (same,)).fetchall()
        assert [(r[0], r[1]) for r in rows][-1] == (0, "bob") and rows[-1][2] == 1
        assert len(rows) == 2  # both labels kept as events


def test_page_works_through_the_token_url(browser, embedded_project):
    project, _, _ = embedded_project
    with running_server(project, "--token", "browser-token-42") as url:
        page = open_page(browser, url)  # the printed URL: ?token=... once, then a cookie
        page.wait_for_function("document.getElementById('photo').naturalWidth > 0", timeout=WAIT_MS)
        page.keyboard.press("1")
        settle(page)
        assert cli_status(project)["labels"] == 1
        stranger = browser.new_page()
        resp = stranger.goto(url.split("?")[0] + "api/status")
        assert resp.status == 401  # a browser without the token gets nothing
        stranger.close()


def test_a_late_status_reply_does_not_overwrite_newer_counts(browser, embedded_project):
    """A /api/status reply read before a label, delivered after the label's own reply, is not applied."""
    project, _, _ = embedded_project
    with running_server(project) as url:
        page = open_page(browser, url)
        page.keyboard.press("1")
        settle_status(page)
        assert page.get_attribute("body", "data-status-seq") == "1"
        old = page.evaluate("fetch('/api/status').then((r) => r.text())")  # read at 1 label, 1 positive
        assert json.loads(old)["seq"] == 1 and json.loads(old)["project"]["seq"] == 1
        # Every status request from now on gets that old reply, as if it had been read before the
        # next label and delivered after it.
        served = []

        def old_reply(route):
            served.append(route.request.url)
            route.fulfill(status=200, content_type="application/json", body=old)

        page.route("**/api/status", old_reply)
        before = stale_replies(page)
        page.keyboard.press("0")
        settle_status(page)  # the label's reply (2 labels), then the refresh that follows it
        assert len(served) == 1
        assert stale_replies(page) == before + 1  # the old reply was seen, and left unapplied
        assert page.text_content("#n-labels") == "2"
        assert page.text_content("#n-positives") == "1"
        assert page.get_attribute("body", "data-seq") == "2" == str(newest_event(project))
        page.unroute("**/api/status")
        assert not page.errors


def test_a_box_dragged_on_the_photo_searches_with_that_part(browser, embedded_project):
    project, _, truth = embedded_project
    with running_server(project) as url:
        page = open_page(browser, url)
        page.wait_for_function("(() => { const im = document.getElementById('photo'); "
                               "return im.complete && im.naturalWidth > 0; })()", timeout=WAIT_MS)
        box = page.locator("#photo").bounding_box()
        x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x + box["width"] * 0.3, y + box["height"] * 0.3, steps=5)
        page.mouse.up()
        page.wait_for_function("document.body.dataset.box && document.body.dataset.box.split(',').length === 4",
                               timeout=WAIT_MS)
        x0, y0, w, h = (int(v) for v in page.evaluate("document.body.dataset.box").split(","))
        assert w >= 4 and h >= 4
        page.keyboard.press("x")
        settle(page)
        assert (page.evaluate("document.body.dataset.example") or "").startswith("file:"), \
            page.text_content("#banner")
        key = page.evaluate("document.body.dataset.example")
        assert (project / "examples" / f"{key[5:]}.png").is_file()  # the crop, kept in the project
        from PIL import Image

        with Image.open(project / "examples" / f"{key[5:]}.png") as crop:
            assert abs(crop.width - w) <= 1 and abs(crop.height - h) <= 1  # in the original photo's pixels
        with Project.open(project) as p:
            params = json.loads(p.db.execute("SELECT params FROM rounds ORDER BY id DESC LIMIT 1").fetchone()[0])
            assert params["examples"] == [key]
            assert p.status()["images"] == len(truth)
        expect(page.locator("#banner")).to_contain_text("Queued")
        assert not page.errors


def test_region_overlay_zoom_and_grid_crops(browser, embedded_project):
    """h shows / hides where the score comes from; z swaps in the region decoded from the original file
    and back; the grid shows the zoomed regions, w the whole photos."""
    project, _, truth = embedded_project
    with Project.open(project) as p:
        p.label([(path, value) for path, value in truth.items() if p.splits()[p.image_id(path) - 1] == "pool"][:20])
        if not any(v for path, v in truth.items()):
            pytest.skip("no rare photo")
        p.label([(path, 1) for path, v in truth.items() if v][:3])
        p.next(8, strategy="default", seed=0)  # fits and saves a head: the queue's photos get regions
    with running_server(project) as url:
        page = open_page(browser, url)
        page.wait_for_function("(() => { const im = document.getElementById('photo'); "
                               "return im.complete && im.naturalWidth > 0; })()", timeout=WAIT_MS)
        page.wait_for_function('document.body.dataset.region === "1"', timeout=WAIT_MS)
        region = page.locator("#region").bounding_box()
        photo = page.locator("#photo").bounding_box()
        assert region["width"] > 0 and region["height"] > 0
        assert region["width"] < photo["width"]  # a tile, not the whole photo
        page.keyboard.press("h")
        settle(page)
        assert page.evaluate("document.body.dataset.region") == "0" and page.locator("#region").is_hidden()
        page.keyboard.press("h")
        settle(page)
        assert page.evaluate("document.body.dataset.region") == "1"
        item = page.evaluate("fetch('/api/queue').then(r => r.json()).then(j => j.items[0])")
        assert item["region"] and len(item["tiles"]) == 9
        page.keyboard.press("z")
        settle(page)
        assert page.evaluate("document.body.dataset.zoom") == "1"
        assert "/crop?" in page.get_attribute("#photo", "src")
        page.wait_for_function("(() => { const im = document.getElementById('photo'); "
                               "return im.complete && im.naturalWidth > 0 && im.src.includes('/crop?'); })()",
                               timeout=WAIT_MS)
        size = page.evaluate("[document.getElementById('photo').naturalWidth, document.getElementById('photo').naturalHeight]")
        assert abs(size[0] / size[1] - item["region"]["width"] / item["region"]["height"]) < 0.05
        # cut from the original and resampled for the screen: twice the box's size on screen, or as much as the
        # 8x limit on enlarging allows (these generated photos are tiny: 160 x 120)
        assert size[0] >= min(2 * region["width"], 8 * item["region"]["width"]) - 1
        page.keyboard.press("z")
        settle(page)
        assert page.evaluate("document.body.dataset.zoom") == "0"
        assert page.get_attribute("#photo", "src").endswith("/file")
        assert not page.errors
        grid = open_page(browser, url, "/grid")
        grid.wait_for_selector(".tile", timeout=WAIT_MS)
        assert grid.locator(".tile.zoomed").count() > 0
        assert "/crop?" in grid.locator(".tile.zoomed img").first.get_attribute("src")
        grid.keyboard.press("w")
        settle(grid)
        assert grid.evaluate("document.body.dataset.whole") == "1" and grid.locator(".tile.zoomed").count() == 0
        assert not grid.errors


def test_unsure_key_and_a_second_concept(browser, embedded_project):
    """? stores "unsure" (not counted as a label, not asked again); the page of another concept labels into that
    concept only, and its switcher lists both."""
    project, _, _ = embedded_project
    with running_server(project) as url:
        page = open_page(browser, url)
        first = shown_id(page)
        page.keyboard.press("?")
        settle(page)
        assert shown_id(page) != first
        with Project.open(project) as p:
            assert p.review()[0]["image_id"] == first and p.status()["labels"] == 0
        page.keyboard.press("1")
        settle_status(page)
        assert page.text_content("#n-labels") == "1"
        other = open_page(browser, url.replace("/?", "/?concept=spiders&") if "?" in url else url + "?concept=spiders")
        assert other.evaluate("document.body.dataset.concept") == "spiders"
        other.wait_for_function("(document.body.dataset.concepts || '').split(',').includes('spiders')", timeout=WAIT_MS)
        assert other.text_content("#n-labels") == "0"  # the default concept's label is not this one's
        other.keyboard.press("0")
        settle_status(other)
        assert other.text_content("#n-labels") == "1"
        assert "concept=spiders" in other.get_attribute("header nav a[data-page='/grid']", "href")
        with Project(project, concept="spiders") as p:
            assert p.status()["labels"] == 1 and p.status()["positives"] == 0
        with Project(project) as p:
            assert p.status()["labels"] == 1 and p.status()["positives"] == 1
        opts = other.eval_on_selector_all("#concept option", "els => els.map(e => e.textContent)")
        assert "default" in opts and "spiders" in opts
        assert not page.errors and not other.errors


def test_grid_more_like_the_marked_photos(browser, embedded_project):
    """m in the grid: the marked photos become positives and a `similar` round queues photos like them, each
    showing its similarity."""
    project, _, truth = embedded_project
    with running_server(project) as url:
        page = open_page(browser, url, "/grid")
        tiles = page.locator(".tile")
        expect(tiles.nth(3)).to_be_visible()
        marked = [int(tiles.nth(i).get_attribute("data-image-id")) for i in (0, 2)]
        tiles.nth(0).click()
        tiles.nth(2).click()
        settle(page)
        page.keyboard.press("m")
        settle(page)
        page.wait_for_function("Number(document.body.dataset.similar || 0) > 0", timeout=WAIT_MS)
        expect(page.locator("#banner")).to_contain_text("like the 2 marked")
        shown = [int(tiles.nth(i).get_attribute("data-image-id")) for i in range(tiles.count())]
        assert not set(marked) & set(shown)  # the examples are labelled now
        with Project.open(project) as p:
            row = p.db.execute("SELECT strategy, params FROM rounds ORDER BY id DESC LIMIT 1").fetchone()
            assert row[0] == "similar" and len(json.loads(row[1])["examples"]) == 2
            labels = {r[0]: r[1] for r in p.db.execute("SELECT image_id, value FROM current_labels")}
            queued = [r[0] for r in p.db.execute("SELECT image_id FROM queue WHERE round_id = "
                                                 "(SELECT MAX(id) FROM rounds) ORDER BY position")]
        assert all(labels.get(i) == 1 for i in marked if i in labels)
        assert shown[: len(queued)] == queued[: len(shown)]  # the similar photos come first
        caption = page.locator(".tile figcaption").first.text_content()
        assert "similar" in caption and float(caption.split()[0]) <= 1
        assert not page.errors
