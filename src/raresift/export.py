"""Export the ranked subset: CSV, JSONL, a folder of class subfolders, or Label Studio tasks.

What is exported: every photo labelled positive, then the top N unlabelled photos of the current
ranking (pool and test alike), each with its rank, score, label and split, and the region the
score comes from (the box of the photo's strongest tile, in the original file's pixels; see
:mod:`raresift.learn.evidence`). Photos labelled negative are left out.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from urllib.parse import quote
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .learn.evidence import evidence, photo_sizes
from .learn.loop import current_model
from .store.store import Store

__all__ = ["FORMATS", "LABEL_STUDIO_CONFIG", "export", "ranked"]

FORMATS = ("csv", "jsonl", "folder", "label-studio", "imagefolder", "coco")
POSITIVE_DIR = "positive"
CANDIDATE_DIR = "candidate"
# The labelling config the Label Studio tasks fit (paste it into the project's Labeling Setup).
LABEL_STUDIO_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="class" toName="image" choice="single">
    <Choice value="positive"/>
    <Choice value="negative"/>
  </Choices>
  <RectangleLabels name="region" toName="image">
    <Label value="positive"/>
  </RectangleLabels>
</View>
"""


def ranked(store: Store, *, top: int, negatives: bool = False) -> list[dict[str, Any]]:
    """The exported rows: labelled positives first (by score), then the top ``top`` unlabelled photos
    (and, with ``negatives``, the photos labelled negative last); each with its ``region`` (or None)."""
    if not isinstance(top, int) or isinstance(top, bool) or top < 0:
        raise InputError(f"--top must be a whole number >= 0, got {top!r}")
    model = current_model(store)
    s = model.probabilities()
    head = model.head
    labels = store.label_array()[: len(s)]
    splits = store.splits()[: len(s)]
    ok = np.isfinite(s)
    key = np.where(ok, s, -np.inf)
    positives = np.flatnonzero(labels == 1)
    positives = positives[np.lexsort((positives, -key[positives]))]
    unl = np.flatnonzero(ok & (labels < 0))
    if top < len(unl):
        part = unl[np.argpartition(-key[unl], top)[:top]] if top else unl[:0]
    else:
        part = unl
    part = part[np.lexsort((part, -key[part]))]
    neg = np.flatnonzero(labels == 0) if negatives else np.zeros(0, dtype=np.int64)
    neg = neg[np.lexsort((neg, -key[neg]))]
    rows = np.concatenate([positives, part, neg]).astype(np.int64)
    paths = store.paths_of(rows + 1)
    where = evidence(store, head, [int(r) + 1 for r in rows])
    out = []
    for rank, r in enumerate(rows, 1):
        out.append({
            "rank": rank,
            "path": paths[int(r) + 1],
            "image_id": int(r) + 1,
            "score": None if not np.isfinite(s[r]) else round(float(s[r]), 6),
            "label": int(labels[r]) if labels[r] >= 0 else None,
            "split": str(splits[r]),
            "region": where[int(r) + 1]["region"],
        })
    return out


def export(store: Store, *, top: int, fmt: str, out: str | os.PathLike, link: bool = False,
           url_prefix: str | None = None) -> Path:
    """Write the ranked subset to ``out`` in format ``fmt`` (csv, jsonl, folder, label-studio); returns ``out``.

    ``folder`` writes ``positive/`` (labelled) and ``candidate/`` (unlabelled, rank in the file name)
    subfolders with copies of the photos, or symbolic links with ``link``, plus ``ranking.csv``.
    ``csv`` and ``jsonl`` carry the region (``region_x/_y/_width/_height`` columns; a ``region`` object).
    ``label-studio`` writes a JSON list of tasks with the score as a prediction (a choice, and the region
    as a rectangle in percent of the photo, for :data:`LABEL_STUDIO_CONFIG`); images are given as
    ``url_prefix`` + path (default: Label Studio's local-files URL of the absolute file path).
    ``coco`` writes a COCO-style JSON (images with their size, the concept as the category, each photo's
    region as an unverified box annotation with its score) for detection work that starts from these photos.
    ``imagefolder`` writes the Hugging Face ``imagefolder`` layout, a dataset to train on: one folder
    per class (``positive/``, ``negative/``: the labelled photos; ``candidate/``: the top unlabelled
    ones, unverified) and ``metadata.jsonl`` (file_name, label, verified, score, split, region, labelled_by),
    loadable with ``datasets.load_dataset("imagefolder", data_dir=out)``.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    out = Path(out)
    rows = ranked(store, top=top, negatives=fmt == "imagefolder")
    if fmt == "folder":
        return _folder(store, rows, out, link)
    if fmt == "imagefolder":
        return _imagefolder(store, rows, out, link)
    if out.exists() and out.is_dir():
        raise InputError(f"{out} is a folder; give a file name for --format {fmt}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        if fmt == "csv":
            box = ["region_x", "region_y", "region_width", "region_height"]
            w = csv.DictWriter(fh, fieldnames=["rank", "path", "score", "label", "split", *box], extrasaction="ignore")
            w.writeheader()
            for r in rows:
                reg = r["region"] or {}
                w.writerow({**r, "score": "" if r["score"] is None else r["score"],
                            "label": "" if r["label"] is None else r["label"],
                            **{b: reg.get(b[7:], "") for b in box}})
        elif fmt == "jsonl":
            for r in rows:
                fh.write(json.dumps(r) + "\n")
        elif fmt == "coco":
            json.dump(_coco(store, rows), fh, indent=1)
        else:
            sizes = photo_sizes(store, [r["image_id"] for r in rows if r["region"]])
            json.dump([_task(store, r, url_prefix, sizes.get(r["image_id"])) for r in rows], fh, indent=1)
    os.replace(tmp, out)
    return out


def _coco(store: Store, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A COCO-style detection dataset: every exported photo, the concept as the one category, and each
    photo's region as an (unverified) box annotation with its score."""
    sizes = photo_sizes(store, [r["image_id"] for r in rows])
    images, annotations = [], []
    for r in rows:
        wh = sizes.get(r["image_id"])
        images.append({"id": r["image_id"], "file_name": r["path"], "width": wh[0] if wh else None,
                       "height": wh[1] if wh else None, "raresift_rank": r["rank"], "raresift_score": r["score"],
                       "raresift_label": r["label"], "raresift_split": r["split"]})
        reg = r["region"]
        if reg:
            annotations.append({
                "id": len(annotations) + 1, "image_id": r["image_id"], "category_id": 1,
                "bbox": [reg["x"], reg["y"], reg["width"], reg["height"]], "area": reg["width"] * reg["height"],
                "iscrowd": 0, "score": r["score"],
                # the photo's label is a person's (verified) or none; the box is always the model's guess
                "verified": False, "image_verified": r["label"] is not None,
            })
    return {
        "info": {"description": f"raresift export of {store.root.name}, concept {store.concept}",
                 "version": "1.0", "date_created": time.strftime("%Y-%m-%dT%H:%M:%S")},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": store.concept, "supercategory": "raresift"}],
    }


def _task(store: Store, row: dict[str, Any], url_prefix: str | None, size: tuple[int, int] | None = None
          ) -> dict[str, Any]:
    if url_prefix is not None:
        image = url_prefix + row["path"]
    else:
        f = store.file_path(row["image_id"])
        # Escaped as Label Studio escapes its own local-files URLs (only "/" kept): a '+', '&' or '#' in a
        # file name would otherwise end or change the query (measured: those photos answered 404).
        image = f"/data/local-files/?d={quote(str(f.resolve()).lstrip('/'), safe='/')}" if f is not None else row["path"]
    score = row["score"] if row["score"] is not None else 0.0
    choice = "positive" if (row["label"] == 1 or score >= 0.5) else "negative"
    task: dict[str, Any] = {
        "data": {"image": image, "raresift_path": row["path"], "raresift_rank": row["rank"],
                 "raresift_score": row["score"]},
        "predictions": [{
            "model_version": "raresift",
            "score": score,
            "result": [{"from_name": "class", "to_name": "image", "type": "choices",
                        "value": {"choices": [choice]}}],
        }],
    }
    reg = row.get("region")
    if reg and size:  # the region as a box to start from (Label Studio wants percentages of the image)
        W, H = size
        task["predictions"][0]["result"].append({
            "id": f"region{row['image_id']}", "from_name": "region", "to_name": "image", "type": "rectanglelabels",
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": 100 * reg["x"] / W, "y": 100 * reg["y"] / H, "width": 100 * reg["width"] / W,
                      "height": 100 * reg["height"] / H, "rotation": 0, "rectanglelabels": ["positive"]},
        })
    return task


def _imagefolder(store: Store, rows: list[dict[str, Any]], out: Path, link: bool) -> Path:
    _check_new_folder(store, rows, out)
    who = store.labellers()
    names = {1: "positive", 0: "negative", None: "candidate"}
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as fh:
        for r in rows:
            cls = names[r["label"]]
            (out / cls).mkdir(exist_ok=True)
            name = f"{r['rank']:06d}_{r['path'].replace('/', '__')}"
            _place(store.file_path(r["image_id"]), out / cls / name, link)
            fh.write(json.dumps({"file_name": f"{cls}/{name}", "label": cls, "verified": r["label"] is not None,
                                 "score": r["score"], "split": r["split"], "path": r["path"], "region": r["region"],
                                 "labelled_by": who.get(r["image_id"])}) + "\n")
    return out


def _check_new_folder(store: Store, rows: list[dict[str, Any]], out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder; give a new folder")
    missing = [r["path"] for r in rows if store.file_path(r["image_id"]) is None]
    if missing:
        raise InputError(f"{len(missing)} photos have no file on disk (e.g. {missing[0]!r}); use --format csv or jsonl")
    out.mkdir(parents=True, exist_ok=True)


def _place(src: Path, dst: Path, link: bool) -> None:
    if link:
        os.symlink(src.resolve(), dst)
    else:
        shutil.copy2(src, dst)


def _folder(store: Store, rows: list[dict[str, Any]], out: Path, link: bool) -> Path:
    _check_new_folder(store, rows, out)
    for sub in (POSITIVE_DIR, CANDIDATE_DIR):
        (out / sub).mkdir(parents=True, exist_ok=True)
    with open(out / "ranking.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "file", "path", "score", "label"])
        for r in rows:
            src = store.file_path(r["image_id"])
            sub = POSITIVE_DIR if r["label"] == 1 else CANDIDATE_DIR
            # Rank first keeps the folder in ranking order; the id's folders are kept in the name.
            name = f"{r['rank']:06d}_{r['path'].replace('/', '__')}"
            dst = out / sub / name
            _place(src, dst, link)
            w.writerow([r["rank"], f"{sub}/{name}", r["path"], "" if r["score"] is None else r["score"],
                        "" if r["label"] is None else r["label"]])
    return out
