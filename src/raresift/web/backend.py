"""What the web app and the notebook labeller need from a project, in one place.

The queue, rounds, evaluation and export come from ``raresift.learn``, ``raresift.evaluate`` and
``raresift.export``. Where one of those is not installed (an older or partial build), the
labelling still works: photos are then drawn at random from the unlabelled pool, and the
features that need the missing part raise :class:`NotReadyError` with a clear message.
"""

from __future__ import annotations

import getpass
import importlib
import logging
import math
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, NotReadyError
from ..project import Project
from ..store import labels as _labels

__all__ = [
    "default_who",
    "warm_up",
    "strategies",
    "queue",
    "new_round",
    "item",
    "label_items",
    "undo",
    "history",
    "estimates",
    "evaluation",
    "export",
    "wilson",
]

log = logging.getLogger(__name__)

FALLBACK_STRATEGY = "random"
# What the first round imports: the learning loop, SciPy's optimiser (training the head) and
# scikit-learn's k-means (exploring a cold project). Together 1,000+ modules (scikit-learn pulls in
# pandas and pyarrow), one to several seconds that the first `/api/rounds` would otherwise wait for.
WARM_MODULES = ("raresift.learn.loop", "raresift.evaluate", "raresift.export", "scipy.optimize", "sklearn.cluster")


def warm_up(modules: Iterable[str] = WARM_MODULES) -> threading.Thread:
    """Import what rounds need in a background thread (started at once; returned for joining).

    A request that needs one of the modules meanwhile waits for that import, never imports twice.
    """

    def run() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as exc:  # a missing optional part: the request that needs it says so
                log.debug("warm-up: cannot import %s: %s", name, exc)

    thread = threading.Thread(target=run, name="raresift-warm-up", daemon=True)
    thread.start()
    return thread


def default_who() -> str:
    """The name recorded with labels when the person gives none."""
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return "unknown"


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _loop():
    return _module("raresift.learn.loop")


def strategies() -> list[str]:
    """Names of the strategies a round can use ("default" first)."""
    learn = _module("raresift.learn")
    names = list(getattr(learn, "STRATEGIES", None) or []) if learn is not None else []
    names = [str(n) for n in names]
    if not names:
        return ["default", FALLBACK_STRATEGY]
    if "default" in names:
        names.remove("default")
    return ["default"] + names


# ---------------------------------------------------------------------- queue
def _get(row: Any, key: str, default: Any = None) -> Any:
    if isinstance(row, dict):
        return row.get(key, default)
    return getattr(row, key, default)


def _normalise(project: Project, rows: Iterable[Any], purpose: str) -> list[dict[str, Any]]:
    """Queue rows from the learning loop -> the item dicts the page shows."""
    out = []
    for row in rows:
        image_id = _get(row, "image_id")
        path = _get(row, "path")
        if image_id is None:
            image_id = project.image_id(path)
        image_id = int(image_id)
        score = _get(row, "score")
        out.append(
            {
                "image_id": image_id,
                "path": path,
                "score": None if score is None or not math.isfinite(float(score)) else float(score),
                "strategy": _get(row, "strategy"),
                "round": _get(row, "round", _get(row, "round_id")),
                "split": _get(row, "split"),
                "purpose": purpose,
            }
        )
    return _decorate(project, out)


def _decorate(project: Project, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each photo's path, split and newest label event (the client sends it back as ``expected``)."""
    for it in items:
        row = project.db.execute(
            "SELECT path, split, fs_path, status FROM images WHERE id = ?", (it["image_id"],)).fetchone()
        if row is None:
            raise InputError(f"no image with database id {it['image_id']} in this project")
        it["path"] = it.get("path") or row["path"]
        it["split"] = it.get("split") or row["split"]
        it["has_file"] = row["fs_path"] is not None and row["status"] != "error"  # unreadable files are not served
        ev = _labels.latest(project.db, it["image_id"])
        it["event"] = ev.id if ev else None
        it["label"] = ev.value if ev else None
        it["labelled_by"] = ev.who if ev and ev.value is not None else None
    return items


def queue(project: Project, *, purpose: str = "label", limit: int = 50) -> list[dict[str, Any]]:
    """Photos waiting for a label, in the order the learning loop chose them."""
    loop = _loop()
    if loop is None or not hasattr(loop, "pending"):
        return []
    rows = loop.pending(project, purpose=purpose)
    items = _normalise(project, list(rows)[: max(limit, 0)], purpose)
    return [it for it in items if it["label"] is None]


def new_round(
    project: Project,
    *,
    n: int,
    strategy: str = "default",
    query: str | None = None,
    examples: list[int] | None = None,
    evaluate: bool = False,
    seed: int | None = None,
    who: str | None = None,
) -> list[dict[str, Any]]:
    """Train on the labels so far and choose the next batch; returns its items."""
    if n < 1:
        raise InputError(f"a round needs at least 1 photo, got n={n}")
    purpose = "evaluate" if evaluate else "label"
    loop = _loop()
    if loop is None or not hasattr(loop, "next_batch"):
        if evaluate or query or examples:
            raise NotReadyError("rounds with a query, example photos or evaluation need raresift.learn (not installed)")
        return _random_batch(project, n, seed)
    example_paths = None
    if examples:
        example_paths = []
        for image_id in examples:
            row = project.db.execute("SELECT path FROM images WHERE id = ?", (int(image_id),)).fetchone()
            if row is None:
                raise InputError(f"no image with database id {image_id} in this project")
            example_paths.append(row[0])
    rows = loop.next_batch(
        project, n, strategy=strategy, query=query or None, examples=example_paths,
        evaluate=evaluate, seed=seed, who=who,
    )
    return [it for it in _normalise(project, rows, purpose) if it["label"] is None]


def _random_batch(project: Project, n: int, seed: int | None) -> list[dict[str, Any]]:
    """Stand-in for the learning loop: unlabelled pool photos in random order (nothing recorded)."""
    ids = [
        r[0]
        for r in project.db.execute(
            "SELECT id FROM images WHERE split = 'pool' AND status != 'error' "
            "AND id NOT IN (SELECT image_id FROM current_labels) ORDER BY id"
        )
    ]
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(ids))[:n] if ids else []
    items = [
        {"image_id": int(ids[i]), "path": None, "score": None, "strategy": FALLBACK_STRATEGY, "round": None,
         "split": None, "purpose": "label"}
        for i in chosen
    ]
    return _decorate(project, items)


def item(project: Project, image_id: int) -> dict[str, Any]:
    """One photo with its newest label event and, where the photo is queued, its round and score."""
    row = project.db.execute(
        "SELECT q.round_id, q.strategy, q.score, r.purpose FROM queue q JOIN rounds r ON r.id = q.round_id "
        "WHERE q.image_id = ? ORDER BY q.round_id DESC LIMIT 1",
        (image_id,),
    ).fetchone()
    it = {
        "image_id": int(image_id), "path": None, "score": None, "strategy": None, "round": None,
        "split": None, "purpose": "label",
    }
    if row is not None:
        it.update(round=row[0], strategy=row[1], score=row[2], purpose=row[3])
    return _decorate(project, [it])[0]


# ---------------------------------------------------------------------- labels
def _round_of(project: Project, image_id: int) -> tuple[int | None, str | None]:
    """The newest round that queued the photo, and the strategy that picked it there."""
    row = project.db.execute(
        "SELECT round_id, strategy FROM queue WHERE image_id = ? ORDER BY round_id DESC LIMIT 1", (image_id,)
    ).fetchone()
    return (row[0], row[1]) if row else (None, None)


def label_items(
    project: Project,
    items: list[tuple[int, int | None, bool, int | None]],
    *,
    who: str,
    source: str = "web",
) -> list[_labels.LabelEvent]:
    """Record ``(image_id, value, check, expected_event)`` items with the round / strategy that queued each.

    All items are written in one transaction, whichever rounds queued them: where ``check`` is
    true and someone else labelled the photo since ``expected_event``,
    :class:`raresift.store.labels.LabelConflict` is raised and nothing at all is written.
    Items are validated before anything is written.
    """
    rows = []
    expected: dict[int, int | None] = {}
    for image_id, value, check, exp in items:
        if project.db.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone() is None:
            raise InputError(f"no image with database id {image_id} in this project")
        if value not in (0, 1, None):
            raise InputError(f"label must be 1, 0 or null (withdraw), got {value!r}")
        rows.append((int(image_id), None if value is None else int(value), *_round_of(project, image_id)))
        if check:
            expected[int(image_id)] = exp
    return _labels.append(project.db, rows, who=who, source=source, expected=expected or None)


def undo(project: Project, *, who: str, image_id: int | None = None, event_id: int | None = None,
         source: str = "web") -> _labels.LabelEvent:
    """Withdraw a label: the given photo's (if its newest event is still ``event_id``), else the newest by ``who``."""
    if image_id is None:
        row = project.db.execute(
            "SELECT l.image_id, l.id FROM labels l WHERE l.who = ? AND l.value IS NOT NULL "
            "AND l.id = (SELECT MAX(id) FROM labels m WHERE m.image_id = l.image_id) ORDER BY l.id DESC LIMIT 1",
            (who,),
        ).fetchone()
        if row is None:
            raise InputError(f"{who} has no label left to undo")
        image_id, event_id = row[0], row[1]
    ev = label_items(project, [(int(image_id), None, event_id is not None, event_id)], who=who, source=source)
    return ev[0]


# ---------------------------------------------------------------------- numbers
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (95 % by default); (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def history(project: Project, *, max_points: int = 400) -> list[tuple[int, int]]:
    """(labels spent, positives found) after each label event, thinned to at most ``max_points``."""
    current: dict[int, int] = {}
    pos = 0
    points = [(0, 0)]
    for image_id, value in project.db.execute("SELECT image_id, value FROM labels ORDER BY id"):
        old = current.pop(image_id, None)
        if old == 1:
            pos -= 1
        if value is not None:
            current[image_id] = value
            pos += value
        points.append((len(current), pos))
    if len(points) > max_points:
        step = len(points) / max_points
        points = [points[int(i * step)] for i in range(max_points)] + [points[-1]]
    return points


def estimates(project: Project) -> dict[str, Any]:
    """Quick numbers for the page: round progress, hit rates per strategy, a prevalence estimate.

    The prevalence estimate uses only labels of photos picked at random (strategy ``random``),
    the only unbiased sample; the other strategies show their hit rate (share of positives).
    """
    q = project.db.execute
    per_strategy = {}
    for strategy, n, k in q(
        "SELECT COALESCE(strategy, 'manual'), COUNT(*), SUM(value) FROM current_labels GROUP BY 1 ORDER BY 2 DESC"
    ):
        lo, hi = wilson(k, n)
        per_strategy[strategy] = {"labels": n, "positives": k, "rate": k / n if n else None, "interval": [lo, hi]}
    rnd = per_strategy.get("random")
    prevalence = None
    if rnd and rnd["labels"]:
        prevalence = {"estimate": rnd["rate"], "interval": rnd["interval"], "labels": rnd["labels"]}
    rnd_row = q("SELECT id, strategy, n, purpose, started_at FROM rounds ORDER BY id DESC LIMIT 1").fetchone()
    current_round = None
    if rnd_row is not None:
        n_q, n_lab, n_pos = q(
            "SELECT COUNT(*), COUNT(c.image_id), COALESCE(SUM(c.value), 0) FROM queue qu "
            "LEFT JOIN current_labels c ON c.image_id = qu.image_id WHERE qu.round_id = ?",
            (rnd_row[0],),
        ).fetchone()
        current_round = {
            "id": rnd_row[0], "strategy": rnd_row[1], "purpose": rnd_row[3], "size": n_q,
            "labelled": n_lab, "positives": n_pos, "left": n_q - n_lab,
        }
    return {"strategies": per_strategy, "prevalence": prevalence, "round": current_round}


def evaluation(project: Project, *, k: int = 50) -> dict[str, Any]:
    """precision@K on the test split against random sampling; see :func:`raresift.evaluate.evaluate`."""
    mod = _module("raresift.evaluate")
    if mod is None or not hasattr(mod, "evaluate"):
        raise NotReadyError("evaluation needs raresift.evaluate, which is not installed in this build")
    result = mod.evaluate(project, k=k)
    return _jsonable(result)


def export(project: Project, *, top: int, fmt: str) -> Path:
    """Write the top of the ranking into ``PROJECT/exports/`` and return the written path."""
    mod = _module("raresift.export")
    if mod is None or not hasattr(mod, "export"):
        raise NotReadyError("export needs raresift.export, which is not installed in this build")
    folder = project.path / "exports"
    folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = {"csv": ".csv", "jsonl": ".jsonl", "label-studio": ".json"}.get(fmt, "")
    out = folder / f"top{top}-{stamp}{suffix}"
    return Path(mod.export(project, top=top, fmt=fmt, out=out))


def _jsonable(value: Any) -> Any:
    """numpy scalars / arrays, tuples and dataclasses -> plain JSON values (NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
