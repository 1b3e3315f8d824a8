"""Export the ranked subset: CSV, JSONL, a folder of class subfolders, or Label Studio tasks.

What is exported: every photo labelled positive, then the top N unlabelled photos of the current
ranking (pool and test alike), each with its rank, score, label and split. Photos labelled
negative are left out.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError

if TYPE_CHECKING:
    from .project import Project

__all__ = ["FORMATS", "LABEL_STUDIO_CONFIG", "export", "ranked"]

FORMATS = ("csv", "jsonl", "folder", "label-studio")
POSITIVE_DIR = "positive"
CANDIDATE_DIR = "candidate"
# The labelling config the Label Studio tasks fit (paste it into the project's Labeling Setup).
LABEL_STUDIO_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="class" toName="image" choice="single">
    <Choice value="positive"/>
    <Choice value="negative"/>
  </Choices>
</View>
"""


def ranked(project: Project, *, top: int) -> list[dict[str, Any]]:
    """The exported rows: labelled positives first (by score), then the top ``top`` unlabelled photos."""
    from .learn.loop import scores

    if not isinstance(top, int) or isinstance(top, bool) or top < 0:
        raise InputError(f"--top must be a whole number >= 0, got {top!r}")
    s = scores(project)
    labels = project.label_array()[: len(s)]
    splits = project.splits()[: len(s)]
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
    rows = np.concatenate([positives, part]).astype(np.int64)
    paths = dict(project.db.execute("SELECT id, path FROM images").fetchall()) if len(rows) else {}
    out = []
    for rank, r in enumerate(rows, 1):
        out.append({
            "rank": rank,
            "path": paths[int(r) + 1],
            "image_id": int(r) + 1,
            "score": None if not np.isfinite(s[r]) else round(float(s[r]), 6),
            "label": 1 if labels[r] == 1 else None,
            "split": str(splits[r]),
        })
    return out


def export(project: Project, *, top: int, fmt: str, out: str | os.PathLike, link: bool = False,
           url_prefix: str | None = None) -> Path:
    """Write the ranked subset to ``out`` in format ``fmt`` (csv, jsonl, folder, label-studio); returns ``out``.

    ``folder`` writes ``positive/`` (labelled) and ``candidate/`` (unlabelled, rank in the file name)
    subfolders with copies of the photos, or symbolic links with ``link``, plus ``ranking.csv``.
    ``label-studio`` writes a JSON list of tasks with the score as a prediction; images are given as
    ``url_prefix`` + path (default: Label Studio's local-files URL of the absolute file path).
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    out = Path(out)
    rows = ranked(project, top=top)
    if fmt == "folder":
        return _folder(project, rows, out, link)
    if out.exists() and out.is_dir():
        raise InputError(f"{out} is a folder; give a file name for --format {fmt}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        if fmt == "csv":
            w = csv.DictWriter(fh, fieldnames=["rank", "path", "score", "label", "split"], extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({**r, "score": "" if r["score"] is None else r["score"],
                            "label": "" if r["label"] is None else r["label"]})
        elif fmt == "jsonl":
            for r in rows:
                fh.write(json.dumps(r) + "\n")
        else:
            json.dump([_task(project, r, url_prefix) for r in rows], fh, indent=1)
    os.replace(tmp, out)
    return out


def _task(project: Project, row: dict[str, Any], url_prefix: str | None) -> dict[str, Any]:
    if url_prefix is not None:
        image = url_prefix + row["path"]
    else:
        f = project.file_path(row["image_id"])
        image = f"/data/local-files/?d={str(f.resolve()).lstrip('/')}" if f is not None else row["path"]
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
    return task


def _folder(project: Project, rows: list[dict[str, Any]], out: Path, link: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder; give a new folder for --format folder")
    missing = [r["path"] for r in rows if project.file_path(r["image_id"]) is None]
    if missing:
        raise InputError(f"{len(missing)} photos have no file on disk (e.g. {missing[0]!r}); use --format csv or jsonl")
    for sub in (POSITIVE_DIR, CANDIDATE_DIR):
        (out / sub).mkdir(parents=True, exist_ok=True)
    with open(out / "ranking.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "file", "path", "score", "label"])
        for r in rows:
            src = project.file_path(r["image_id"])
            sub = POSITIVE_DIR if r["label"] == 1 else CANDIDATE_DIR
            # Rank first keeps the folder in ranking order; the id's folders are kept in the name.
            name = f"{r['rank']:06d}_{r['path'].replace('/', '__')}"
            dst = out / sub / name
            if link:
                os.symlink(src.resolve(), dst)
            else:
                shutil.copy2(src, dst)
            w.writerow([r["rank"], f"{sub}/{name}", r["path"], "" if r["score"] is None else r["score"],
                        "" if r["label"] is None else r["label"]])
    return out
