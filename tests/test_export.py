"""export(): ranked candidates and labelled positives as csv, jsonl, folder, Label Studio tasks."""

from __future__ import annotations

import csv
import json

import pytest
from test_learn_loop import oracle, vectors_project

from raresift import Project
from raresift.cli import main
from raresift.errors import InputError


@pytest.fixture
def trained(tmp_path):
    project, truth = vectors_project(tmp_path)
    oracle(project, project.next(60, strategy="random", seed=0), truth)
    yield project, truth
    project.close()


def test_csv_lists_positives_then_top_candidates(trained, tmp_path):
    project, truth = trained
    out = project.export(top=15, fmt="csv", out=tmp_path / "out" / "top.csv")
    rows = list(csv.DictReader(out.read_text().splitlines()))
    positives = [p for p, v in project.labels().items() if v == 1]
    assert [r["label"] for r in rows[: len(positives)]] == ["1"] * len(positives)
    assert {r["path"] for r in rows[: len(positives)]} == set(positives)
    cands = rows[len(positives):]
    assert len(cands) == 15 and all(r["label"] == "" for r in cands)
    assert [float(r["score"]) for r in cands] == sorted((float(r["score"]) for r in cands), reverse=True)
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    negatives = {p for p, v in project.labels().items() if v == 0}
    assert not negatives & {r["path"] for r in rows}
    assert sum(truth[r["path"]] for r in cands) >= 8  # the model ranks the cluster first


def test_jsonl_and_label_studio(trained, tmp_path):
    project, _ = trained
    lines = project.export(top=5, fmt="jsonl", out=tmp_path / "a.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert {"rank", "path", "score", "label", "split"} <= set(first)
    tasks = json.loads(project.export(top=5, fmt="label-studio", out=tmp_path / "ls.json",
                              url_prefix="http://host/img/").read_text())
    assert len(tasks) == len(lines)
    t = tasks[-1]
    assert t["data"]["image"] == "http://host/img/" + t["data"]["raresift_path"]
    pred = t["predictions"][0]
    assert pred["result"][0]["type"] == "choices" and pred["result"][0]["from_name"] == "class"
    assert pred["result"][0]["value"]["choices"][0] in ("positive", "negative")
    assert 0 <= pred["score"] <= 1


def test_bad_export_requests(trained, tmp_path):
    project, _ = trained
    with pytest.raises(InputError, match="valid: csv"):
        project.export(top=5, fmt="xml", out=tmp_path / "x")
    with pytest.raises(InputError):
        project.export(top=5, fmt="csv", out=tmp_path)  # a folder
    with pytest.raises(InputError, match="no file"):
        project.export(top=5, fmt="folder", out=tmp_path / "f")  # external vectors: no photo files
    with pytest.raises(InputError):
        project.export(top=-1, fmt="csv", out=tmp_path / "y.csv")


def test_folder_export_copies_or_links_photos(embedded_project, tmp_path):
    project_dir, images, truth = embedded_project
    with Project.open(project_dir) as project:
        project.label([(p, v) for p, v in truth.items() if v], who="t")
        project.label([(p, 0) for p in list(truth)[:10] if not truth[p]], who="t")
    assert main(["export", str(project_dir), "--top", "4", "--format", "folder", "--out", str(tmp_path / "f")]) == 0
    pos = sorted((tmp_path / "f" / "positive").iterdir())
    cand = sorted((tmp_path / "f" / "candidate").iterdir())
    n_pos_pool = sum(truth.values())
    assert len(pos) == n_pos_pool and len(cand) == 4
    assert pos[0].read_bytes()[:2] == b"\xff\xd8" and not pos[0].is_symlink()
    ranking = list(csv.DictReader((tmp_path / "f" / "ranking.csv").read_text().splitlines()))
    assert len(ranking) == n_pos_pool + 4
    src = images / ranking[0]["path"]
    assert (tmp_path / "f" / ranking[0]["file"]).read_bytes() == src.read_bytes()
    assert main(["export", str(project_dir), "--top", "2", "--format", "folder", "--link",
                 "--out", str(tmp_path / "g")]) == 0
    linked = next((tmp_path / "g" / "candidate").iterdir())
    assert linked.is_symlink() and linked.resolve().is_file()
    assert main(["export", str(project_dir), "--top", "2", "--format", "folder", "--out", str(tmp_path / "g")]) == 2


def test_imagefolder_export_loads_with_the_datasets_package(embedded_project, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    project_dir, _images, truth = embedded_project
    with Project(project_dir) as p:
        pool = [path for path, s in zip(p.image_ids(), p.splits()) if s == "pool"][:12]
        p.label([(path, truth[path]) for path in pool], who="ann")
        n_pos = sum(truth[path] for path in pool)
        out = p.export(top=5, fmt="imagefolder", out=tmp_path / "ds")
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 12 + 5
    assert sum(m["label"] == "positive" for m in meta) == n_pos and sum(m["label"] == "candidate" for m in meta) == 5
    assert all(m["labelled_by"] == "ann" for m in meta if m["verified"]) and all((out / m["file_name"]).is_file()
                                                                                for m in meta)
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert ds.num_rows == 17
    assert sorted(ds["label"]) == sorted(m["label"] for m in meta)
    assert ds[0]["image"].size[0] > 0


def test_exports_carry_the_region(embedded_project, tmp_path):
    """A tiled project with a model: csv columns, a jsonl object and a Label Studio rectangle per photo, the
    rectangle in percent of the photo's own size; vectors without tiles or files give none."""
    project_dir, images, truth = embedded_project
    with Project.open(project_dir) as project:
        project.label([(p, v) for p, v in truth.items()], who="t")
        rows = list(csv.DictReader(project.export(top=3, fmt="csv", out=tmp_path / "r.csv").read_text().splitlines()))
        assert list(rows[0])[-4:] == ["region_x", "region_y", "region_width", "region_height"]
        assert all(int(r["region_width"]) == 80 and int(r["region_height"]) == 60 for r in rows)  # 160 x 120 photos
        first = json.loads(project.export(top=3, fmt="jsonl", out=tmp_path / "r.jsonl").read_text().splitlines()[0])
        assert set(first["region"]) == {"x", "y", "width", "height"}
        assert first["region"] == {k[7:]: int(rows[0][k]) for k in ("region_x", "region_y", "region_width", "region_height")}
        tasks = json.loads(project.export(top=3, fmt="label-studio", out=tmp_path / "ls.json").read_text())
        rect = [r for r in tasks[0]["predictions"][0]["result"] if r["type"] == "rectanglelabels"]
        assert len(rect) == 1 and rect[0]["from_name"] == "region" and rect[0]["to_name"] == "image"
        assert rect[0]["original_width"] == 160 and rect[0]["original_height"] == 120
        assert rect[0]["value"]["width"] == pytest.approx(50) and rect[0]["value"]["height"] == pytest.approx(50)
        assert rect[0]["value"]["x"] == pytest.approx(100 * first["region"]["x"] / 160)


def test_no_region_without_tiles(trained, tmp_path):
    project, _ = trained
    rows = list(csv.DictReader(project.export(top=3, fmt="csv", out=tmp_path / "r.csv").read_text().splitlines()))
    assert all(r["region_x"] == "" for r in rows)
    tasks = json.loads(project.export(top=3, fmt="label-studio", out=tmp_path / "ls.json").read_text())
    assert all(len(t["predictions"][0]["result"]) == 1 for t in tasks)


def test_coco_export_holds_images_category_and_region_boxes(embedded_project, tmp_path):
    project_dir, images, truth = embedded_project
    half = dict(list(truth.items())[:20])
    assert main(["import-labels", str(project_dir), str(_truth_csv(tmp_path, half))]) == 0
    assert main(["export", str(project_dir), "--top", "4", "--format", "coco", "--out", str(tmp_path / "c.json")]) == 0
    coco = json.loads((tmp_path / "c.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "default", "supercategory": "raresift"}]
    n_pos = sum(half.values())
    assert len(coco["images"]) == n_pos + 4
    assert all((im["width"], im["height"]) == (160, 120) for im in coco["images"])
    assert all((images / im["file_name"]).is_file() for im in coco["images"])
    ids = {im["id"] for im in coco["images"]}
    assert len(coco["annotations"]) == len(coco["images"])  # every photo of a tiled project has a region
    for a in coco["annotations"]:
        assert a["image_id"] in ids and a["category_id"] == 1 and a["verified"] is False
        x, y, w, h = a["bbox"]
        assert (w, h) == (80, 60) and 0 <= x <= 80 and 0 <= y <= 60 and a["area"] == w * h


def _truth_csv(tmp_path, truth):
    out = tmp_path / "truth.csv"
    out.write_text("path,label\n" + "".join(f"{p},{v}\n" for p, v in truth.items()) + "")
    return out


def test_label_studio_urls_escape_the_file_name(tmp_path):
    """'+', '&', '#' and '%' in a file name survive the query string of a local-files URL."""
    from urllib.parse import parse_qs, urlsplit

    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    names = ["a+b.jpg", "x&y=1.jpg", "hash#1.jpg", "p%20q.jpg", "é space.jpg"]
    for name in names:
        Image.new("RGB", (8, 8), (200, 10, 10)).save(images / name)
    with Project.create(tmp_path / "p", images=images) as p:
        p.add_images()
        p.embed(batch_size=8)
        p.label([(name, 1) for name in names])
        tasks = json.loads(p.export(top=0, fmt="label-studio", out=tmp_path / "ls.json").read_text())
    got = set()
    for t in tasks:
        url = urlsplit(t["data"]["image"])
        assert url.path == "/data/local-files/" and not url.fragment
        got.add("/" + parse_qs(url.query)["d"][0])
    assert got == {str((images / name).resolve()) for name in names}
