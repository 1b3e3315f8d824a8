"""The labelling page in headless Chromium, against the real `raresift serve` process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raresift import Project

from test_web_server import running_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

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
    page.wait_for_selector('body[data-ready="1"]', timeout=60_000)
    page.errors = errors  # type: ignore[attr-defined]
    return page


def settle(page) -> None:
    """Wait until every key pressed has been handled (and its label committed)."""
    page.wait_for_function('document.body.dataset.busy === "0"', timeout=60_000)


def cli_status(project: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "raresift", "status", str(project), "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def shown_id(page) -> int:
    return int(page.get_attribute("#photo", "data-image-id"))


def test_keys_1_0_1_backspace_leave_two_labels_one_positive(browser, embedded_project):
    project, _, _ = embedded_project
    with running_server(project) as url:
        page = open_page(browser, url)
        first = shown_id(page)
        assert page.evaluate("document.getElementById('photo').complete")
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
        assert page.text_content("#n-labels") == "2"


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
        assert page.text_content("#n-positives") == "1"


def test_grid_page_marks_and_submits(browser, embedded_project):
    project, _, _ = embedded_project
    with running_server(project) as url:
        page = open_page(browser, url, "/grid")
        tiles = page.locator(".tile")
        n = tiles.count()
        assert n >= 4
        ids = [int(tiles.nth(i).get_attribute("data-image-id")) for i in range(n)]
        tiles.nth(1).click()                        # click marks a positive
        page.keyboard.press("ArrowRight")           # cursor moves from tile 1 to tile 2
        page.keyboard.press("ArrowRight")
        page.keyboard.press(" ")                    # Space marks the focused tile (3)
        settle(page)
        assert page.locator(".tile.marked").count() == 2
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
        assert "Queued" in page.text_content("#banner")
        page.keyboard.press("u")  # the example's positive label can be undone like any other
        settle(page)
        assert shown_id(page) == example
        with Project.open(project) as p:
            assert p.status()["labels"] == 0
        assert not page.errors


def test_evaluation_view_queues_top_k_and_shows_precision(browser, embedded_project):
    project, _, truth = embedded_project
    with running_server(project) as url:
        page = open_page(browser, url, "/evaluate")
        page.fill("#eval-k", "4")
        page.locator("#eval-k").blur()
        page.keyboard.press("e")  # queue the model's top-4 test photos
        settle(page)
        tiles = page.locator(".tile")
        assert tiles.count() == 4
        with Project.open(project) as p:
            paths = {i: p.db.execute("SELECT path, split FROM images WHERE id = ?", (i,)).fetchone()
                     for i in (int(tiles.nth(k).get_attribute("data-image-id")) for k in range(4))}
        assert all(split == "test" for _, split in paths.values())
        for k in range(4):
            if truth[paths[int(tiles.nth(k).get_attribute("data-image-id"))][0]]:
                tiles.nth(k).click()
        page.keyboard.press("Enter")
        settle(page)
        page.wait_for_selector("#eval-result svg.bars")
        from raresift.evaluate import evaluate

        with Project.open(project) as p:
            assert {i: p.labels()[path] for i, (path, _) in paths.items()} == \
                {i: truth[path] for i, (path, _) in paths.items()}
            result = evaluate(p, k=4)
        shown = page.text_content("#eval-result")
        prec = result["precision_at_k"]
        assert f"precision@4 = {100 * prec:.{1 if prec < 0.1 else 0}f}%" in shown  # what the library computes
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
        assert banner.is_visible()
        assert "yes" in banner.text_content() and "Nothing was overwritten" in banner.text_content()
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
        page.wait_for_function("document.getElementById('photo').naturalWidth > 0")
        page.keyboard.press("1")
        settle(page)
        assert cli_status(project)["labels"] == 1
        stranger = browser.new_page()
        resp = stranger.goto(url.split("?")[0] + "api/status")
        assert resp.status == 401  # a browser without the token gets nothing
        stranger.close()
