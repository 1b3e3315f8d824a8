"""Does the region point at the insect? Evidence on the flower photos, measured and shown in Chromium.

Data: the flower photos (``../shared/datasets/flowers-daisy-dandelion``), the insect key
``benchmarks/data/flowers_insects.csv`` and, for 40 insect photos with small insects (median 2% of
the photo), a box drawn by eye around the insect: ``benchmarks/data/flowers_insect_boxes.csv``.

Part 1, measured through ``Project.next`` and ``Project.evidence`` (the code behind ``next --json``'s
``region`` and the page's overlay): a copy of an embedded project (default tiles, 3 x 3) gets
``--labels`` labels of random pool photos from the key (the 40 boxed photos never among them), one
round is run (it fits and saves the head), and the region of each boxed photo is compared with its
insect box. Reported per repeat (``--repeats`` label draws) and as means:

* hit: the region (one tile, a quarter of the photo) holds the centre of the insect box;
* coverage: the share of the insect box inside the region;
* chance: the same for a tile drawn at random (the mean over the photo's 9 tiles), the baseline.

Part 2 (``--browser``), on the first repeat's project: ``raresift serve`` in headless Chromium; the
label page is moved on (``s``) until a boxed photo whose region holds the insect is shown (boxed photos
passed over with a miss are listed; part 1 gives the rate); the overlay must be visible there; ``z`` must show the region at least twice as wide (natural pixels) as the overlay on
screen. Screenshots: the label page with the overlay, the zoom, and the grid with zoomed regions
(``--screenshots DIR``, default ``docs/screenshots``).

``--from-pooled`` computes the regions from each photo's feature and the tile each value of its max
part comes from (``learn.evidence.contributions_from_pooled``), what compact storage would keep
instead of every view.

Usage:
    python benchmarks/evidence_flowers.py --project /work/devdata/flowers --browser
    python benchmarks/evidence_flowers.py --project /work/devdata/flowers --from-pooled
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from raresift import Project
from raresift.learn.evidence import tile_boxes

HERE = Path(__file__).resolve().parent
KEY = HERE / "data" / "flowers_insects.csv"
BOXES = HERE / "data" / "flowers_insect_boxes.csv"


def read_boxes() -> dict[str, dict]:
    with open(BOXES, newline="") as fh:
        return {r["path"]: {k: (int(v) if k not in ("path", "note") else v) for k, v in r.items()} for r in csv.DictReader(fh)}


def read_key() -> dict[str, int]:
    with open(KEY, newline="") as fh:
        return {r["path"]: int(r["label"]) for r in csv.DictReader(fh)}


def inside(px: float, py: float, r: dict) -> bool:
    return r["x"] <= px <= r["x"] + r["width"] and r["y"] <= py <= r["y"] + r["height"]


def overlap(b: dict, r: dict) -> float:
    """Share of the insect box ``b`` inside the region ``r``."""
    w = max(0.0, min(b["x"] + b["box_width"], r["x"] + r["width"]) - max(b["x"], r["x"]))
    h = max(0.0, min(b["y"] + b["box_height"], r["y"] + r["height"]) - max(b["y"], r["y"]))
    return w * h / (b["box_width"] * b["box_height"])


def score_regions(found: dict[int, dict], ids: dict[str, int], boxes: dict[str, dict]) -> dict:
    hits, cover, chance_hit, chance_cover, missing = [], [], [], [], 0
    for path, b in boxes.items():
        e = found[ids[path]]
        if e["region"] is None:
            missing += 1
            continue
        cx, cy = b["x"] + b["box_width"] / 2, b["y"] + b["box_height"] / 2
        hits.append(inside(cx, cy, e["region"]))
        cover.append(overlap(b, e["region"]))
        tiles = [dict(zip(("x", "y", "width", "height"), t)) for t in tile_boxes(b["width"], b["height"], 3)]
        chance_hit.append(np.mean([inside(cx, cy, t) for t in tiles]))
        chance_cover.append(np.mean([overlap(b, t) for t in tiles]))
    return {"photos": len(hits), "no_region": missing, "hit": float(np.mean(hits)), "coverage": float(np.mean(cover)),
            "chance_hit": float(np.mean(chance_hit)), "chance_coverage": float(np.mean(chance_cover))}


def prepared_copy(src: Path, dst: Path, key: dict[str, int], boxes: dict[str, dict], n_labels: int, seed: int) -> Path:
    """A copy of the embedded project with ``n_labels`` random pool photos labelled from the key (never a
    boxed photo) and one round run, so a head is fitted and saved."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("learn", "exports", "*.lock"))
    with Project(dst) as p:
        splits = p.splits()
        pool = [path for path in key if path not in boxes and splits[p.image_id(path) - 1] == "pool"]
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(pool), size=min(n_labels, len(pool)), replace=False)
        labels_csv = dst / "labels.csv"
        labels_csv.write_text("path,label\n" + "".join(f"{pool[i]},{key[pool[i]]}\n" for i in sorted(chosen)))
        p.import_labels(labels_csv, who="key")
        p.next(25, strategy="top", seed=seed, who="benchmark")
    return dst


def browser_check(project: Path, boxes: dict[str, dict], shots: Path) -> dict:
    """The page on a boxed insect photo: overlay, zoom and grid, with screenshots."""
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_web_server import running_server

    shots.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    with running_server(project) as url, sync_playwright() as pw:
        exe = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"], headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        page.wait_for_selector('body[data-ready="1"]', timeout=120_000)
        with Project(project) as p:
            boxed_ids = {p.image_id(path): path for path in boxes}
        missed = []  # boxed photos shown before, whose region missed the insect (the table gives the rate)
        for _ in range(60):
            page.wait_for_function("(() => { const im = document.getElementById('photo'); "
                                   "return im.complete && im.naturalWidth > 0; })()", timeout=120_000)
            shown = int(page.get_attribute("#photo", "data-image-id") or 0)
            if shown in boxed_ids:
                b = boxes[boxed_ids[shown]]
                region = page.evaluate(f"fetch('/api/images/{shown}').then(r => r.json())")["region"]
                cx, cy = b["x"] + b["box_width"] / 2, b["y"] + b["box_height"] / 2
                if region and inside(cx, cy, region):
                    break
                missed.append(boxed_ids[shown])
            page.keyboard.press("s")
            page.wait_for_function('document.body.dataset.busy === "0"', timeout=120_000)
        else:
            raise SystemExit("no boxed insect photo with its region on the insect in the first 60 photos of the queue")
        path = boxed_ids[shown]
        page.wait_for_function('document.body.dataset.region === "1"', timeout=120_000)
        overlay = page.locator("#region").bounding_box()
        page.screenshot(path=str(shots / "label-region.png"))
        page.keyboard.press("z")
        page.wait_for_function("(() => { const im = document.getElementById('photo'); "
                               "return im.complete && im.naturalWidth > 0 && im.src.includes('/crop?'); })()",
                               timeout=120_000)
        natural = page.evaluate("document.getElementById('photo').naturalWidth")
        page.screenshot(path=str(shots / "label-zoom.png"))
        grid = browser.new_page(viewport={"width": 1280, "height": 800})
        grid.goto(re.sub(r"/(\?|$)", r"/grid\1", url, count=1))
        grid.wait_for_selector(".tile img", timeout=120_000)
        grid.wait_for_function("[...document.querySelectorAll('.tile img')].every(im => im.complete)", timeout=120_000)
        out = {
            "photo": path, "insect": b["note"], "region": region, "boxed_photos_passed_with_a_miss": missed,
            "region_holds_insect_centre": inside(cx, cy, region),
            "overlay_visible": overlay is not None and overlay["width"] > 0,
            "overlay_width_on_screen": round(overlay["width"], 1) if overlay else None,
            "zoom_natural_width": natural,
            "zoom_ratio": round(natural / overlay["width"], 2) if overlay else None,
            "grid_cells_zoomed": grid.locator(".tile.zoomed").count(),
            "grid_cells": grid.locator(".tile").count(),
        }
        grid.screenshot(path=str(shots / "grid-regions.png"))
        browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, required=True, help="an embedded flower project (default tiles)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the copies (default: a temporary one)")
    ap.add_argument("--labels", type=int, default=200, help="labels from the key per repeat (default 200)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--browser", action="store_true", help="also check the page in headless Chromium")
    ap.add_argument("--from-pooled", action="store_true",
                    help="place the score from each photo's feature and the tile of each max value only (what "
                         "compact storage would keep), not from every view (learn.evidence.contributions_from_pooled)")
    ap.add_argument("--screenshots", type=Path, default=HERE.parent / "docs" / "screenshots")
    args = ap.parse_args(argv)
    key, boxes = read_key(), read_boxes()
    work = args.work or Path(tempfile.mkdtemp(prefix="evidence-"))
    t0 = time.time()
    rows = []
    first = None
    for r in range(args.repeats):
        dst = prepared_copy(args.project, work / f"copy{r}", key, boxes, args.labels, seed=r)
        first = first or dst
        with Project(dst) as p:
            ids = {path: p.image_id(path) for path in boxes}
            if args.from_pooled:
                from raresift.learn.evidence import evidence
                from raresift.learn.loop import current_model

                found = evidence(p.store, current_model(p.store).head, list(ids.values()), from_pooled=True)
            else:
                found = p.evidence(list(ids.values()))
        rows.append(score_regions(found, ids, boxes))
        print(f"repeat {r}: " + json.dumps(rows[-1]), file=sys.stderr)
    areas = [b["box_width"] * b["box_height"] / (b["width"] * b["height"]) for b in boxes.values()]
    print(f"# Evidence on the flower photos: {len(boxes)} insect photos with a box drawn by eye "
          f"(median {100 * statistics.median(areas):.1f}% of the photo)\n")
    how = ("`learn.evidence.evidence(from_pooled=True)` (each photo's feature and the tile of each max value "
           "only)") if args.from_pooled else "`Project.evidence`"
    print(f"{args.labels} labels from the key per repeat (random pool photos, never a boxed one), one round, then "
          f"{how}; {args.repeats} repeats. Region = the photo's strongest tile (3 x 3 grid, a quarter of "
          "the photo).\n")
    print("| repeat | photos | region holds the insect's centre | chance (a random tile) | insect box inside the region "
          "| chance |\n|---|---:|---:|---:|---:|---:|")
    for r, row in enumerate(rows):
        print(f"| {r} | {row['photos']} | {row['hit']:.2f} | {row['chance_hit']:.2f} | {row['coverage']:.2f} | "
              f"{row['chance_coverage']:.2f} |")
    mean = {k: float(np.mean([row[k] for row in rows])) for k in ("hit", "chance_hit", "coverage", "chance_coverage")}
    print(f"| mean | | **{mean['hit']:.2f}** | {mean['chance_hit']:.2f} | **{mean['coverage']:.2f}** | "
          f"{mean['chance_coverage']:.2f} |")
    if args.browser:
        shown = browser_check(first, boxes, args.screenshots)
        print("\nIn headless Chromium (repeat 0's project): " + json.dumps(shown))
        ok = shown["overlay_visible"] and shown["region_holds_insect_centre"] and shown["zoom_ratio"] >= 2
        print(f"overlay visible and on the insect, zoom >= 2x the overlay's on-screen width: {'yes' if ok else 'NO'}")
    print(f"\n_{time.time() - t0:.0f} s_")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
