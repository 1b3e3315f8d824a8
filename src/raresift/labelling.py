"""Labelling by a person, shared by the web page and the notebook labeller: the queue, labels, undo,
rounds, the numbers the side panel shows, evaluation and export.

Everything here goes through :class:`raresift.Project` (and its store); the surfaces only render.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

from .errors import InputError
from .learn.strategies import STRATEGIES
from .project import Project
from .settings import default
from .store.labels import UNSURE, LabelEvent, default_who

__all__ = [
    "WARM_MODULES",
    "default_who",
    "estimates",
    "evaluation",
    "evaluation_state",
    "export",
    "history",
    "item",
    "label_items",
    "new_round",
    "queue",
    "strategies",
    "undo",
    "warm_up",
    "wilson",
]


# What warm_up() imports (for checking it; the imports themselves are written out in warm_up).
WARM_MODULES = ("raresift.evaluate", "raresift.export", "raresift.learn.loop", "scipy.optimize", "sklearn.cluster")


def warm_up() -> threading.Thread:
    """Import what rounds need (the learning loop, evaluation, export, SciPy's optimiser, scikit-learn's k-means)
    in a background thread, so the page's first round does not wait for 1,000+ modules. A request
    that needs one of them meanwhile waits for that import, never imports twice."""

    def run() -> None:
        from . import evaluate, export  # noqa: F401
        from .learn import loop  # noqa: F401

        try:
            import scipy.optimize  # noqa: F401  (the head's solver)
            import sklearn.cluster  # noqa: F401  (exploring a cold project)
        except ImportError:  # the request that needs it reports it
            pass

    thread = threading.Thread(target=run, name="raresift-warm-up", daemon=True)
    thread.start()
    return thread


def api_value(value: int | None) -> int | str | None:
    """A stored label value as the API and exports say it: 1, 0, "unsure" or None."""
    return "unsure" if value == UNSURE else value


def strategies() -> list[str]:
    """Names of the strategies a round can use ("default" first; "mixed" is the same strategy)."""
    return ["default"] + [n for n in STRATEGIES if n not in ("default", "mixed")]


# ---------------------------------------------------------------------- queue
def _decorate(project: Project, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each photo's path, split, whether its file is served, and newest label event (sent back as ``expected``)."""
    for it in items:
        row = project.store.image_row(it["image_id"])
        if row is None:
            raise InputError(f"no image with database id {it['image_id']} in this project")
        it["path"] = it.get("path") or row["path"]
        it["split"] = it.get("split") or row["split"]
        it["has_file"] = row["fs_path"] is not None and row["status"] != "error"  # unreadable files are not served
        ev = project.store.latest_label(it["image_id"])
        it["event"] = ev.id if ev else None
        it["label"] = api_value(ev.value) if ev else None
        it["labelled_by"] = ev.who if ev and ev.value is not None else None
    return items


def _items(project: Project, rows: list[dict[str, Any]], purpose: str) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        score = row.get("score")
        out.append({
            "image_id": int(row["image_id"]), "path": row.get("path"),
            "score": None if score is None or not math.isfinite(float(score)) else float(score),
            "strategy": row.get("strategy"), "round": row.get("round"), "split": row.get("split"), "purpose": purpose,
            "region": row.get("region"), "tiles": row.get("tiles"),
        })
    _add_evidence(project, [it for it in out if it["tiles"] is None])
    return _decorate(project, out)


def _add_evidence(project: Project, items: list[dict[str, Any]]) -> None:
    """Where in each photo the last round's head found the class (``region``, ``tiles``)."""
    if not items:
        return
    from .learn.evidence import evidence
    from .learn.loop import saved_head

    where = evidence(project.store, saved_head(project.store), [it["image_id"] for it in items])
    for it in items:
        it.update(where[it["image_id"]])


def queue(project: Project, *, purpose: str = "label", limit: int = 50) -> list[dict[str, Any]]:
    """Photos waiting for a label, in the order the learning loop chose them."""
    rows = project.pending(purpose=purpose)[: max(limit, 0)]
    return [it for it in _items(project, rows, purpose) if it["label"] is None]


def new_round(project: Project, *, n: int = default("batch"), strategy: str = default("strategy"),
              query: str | None = None, examples: list[int | str] | None = None, evaluate: bool = False,
              seed: int | None = None, who: str | None = None,
              counter_examples: list[int] | None = None) -> list[dict[str, Any]]:
    """Train on the labels so far and choose the next batch (a recorded round); returns its items."""
    if n < 1:
        raise InputError(f"a round needs at least 1 photo, got n={n}")
    keys: list[str | int] = []
    for e in examples or ():
        if isinstance(e, str) and e.startswith("file:"):
            keys.append(e)  # an example photo from outside the collection, added before
        elif project.store.image_row(int(e)) is None:
            raise InputError(f"no image with database id {e} in this project")
        else:
            keys.append(int(e))
    for i in counter_examples or ():
        if project.store.image_row(int(i)) is None:
            raise InputError(f"no image with database id {i} in this project")
    extra = {"counter_examples": [int(i) for i in counter_examples]} if counter_examples else {}
    rows = project.next(n, strategy=strategy, query=query or None, examples=keys or None,
                        evaluate=evaluate, seed=seed, who=who, **extra)
    return [it for it in _items(project, rows, "evaluate" if evaluate else "label") if it["label"] is None]


def item(project: Project, image_id: int) -> dict[str, Any]:
    """One photo with its newest label event and, where the photo is queued, its round and score."""
    it = {"image_id": int(image_id), "path": None, "score": None, "strategy": None, "round": None,
          "split": None, "purpose": "label"}
    row = project.store.queued_in(image_id)
    if row is not None:
        it.update(round=row[0], strategy=row[1], score=row[2], purpose=row[3])
    _add_evidence(project, [it])
    return _decorate(project, [it])[0]


# ---------------------------------------------------------------------- labels
def label_items(project: Project, items: list[tuple[int, int | None, bool, int | None]], *, who: str,
                source: str = "web") -> list[LabelEvent]:
    """Record ``(image_id, value, check, expected_event)`` items with the round / strategy that queued each.

    All items are written in one transaction, whichever rounds queued them: where ``check`` is
    true and someone else labelled the photo since ``expected_event``,
    :class:`raresift.store.labels.LabelConflict` is raised and nothing at all is written.
    Items are validated before anything is written.
    """
    rows = []
    expected: dict[int, int | None] = {}
    for image_id, value, check, exp in items:
        if project.store.image_row(image_id) is None:
            raise InputError(f"no image with database id {image_id} in this project")
        if value == "unsure":
            value = UNSURE
        if value not in (0, 1, UNSURE, None) or isinstance(value, bool):
            raise InputError(f"label must be 1, 0, \"unsure\" or null (withdraw), got {value!r}")
        queued = project.store.queued_in(image_id)
        rows.append((int(image_id), None if value is None else int(value),
                     queued[0] if queued else None, queued[1] if queued else None))
        if check:
            expected[int(image_id)] = exp
    return project.store.append_labels(rows, who=who, source=source, expected=expected or None)


def undo(project: Project, *, who: str, image_id: int | None = None, event_id: int | None = None,
         source: str = "web") -> LabelEvent:
    """Withdraw a label: the given photo's (if its newest event is still ``event_id``), else the newest by ``who``."""
    if image_id is None:
        found = project.store.newest_label_of(who)
        if found is None:
            raise InputError(f"{who} has no label left to undo")
        image_id, event_id = found
    return label_items(project, [(int(image_id), None, event_id is not None, event_id)], who=who, source=source)[0]


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
    for image_id, value in project.store.label_history():
        old = current.pop(image_id, None)
        if old == 1:
            pos -= 1
        if value is not None:
            current[image_id] = value
            pos += value == 1
        points.append((len(current), pos))  # an "unsure" answer spent a label too
    if len(points) > max_points:
        step = len(points) / max_points
        points = [points[int(i * step)] for i in range(max_points)] + [points[-1]]
    return points


def estimates(project: Project) -> dict[str, Any]:
    """Quick numbers for the page: round progress, hit rates per strategy, a prevalence estimate.

    The prevalence estimate uses only labels of photos picked at random (strategy ``random``),
    the only unbiased sample; the other strategies show their hit rate (share of positives).
    """
    per_strategy = {}
    for strategy, n, k in project.store.label_rates():
        lo, hi = wilson(k, n)
        per_strategy[strategy] = {"labels": n, "positives": k, "rate": k / n if n else None, "interval": [lo, hi]}
    rnd = per_strategy.get("random")
    prevalence = None
    if rnd and rnd["labels"]:
        prevalence = {"estimate": rnd["rate"], "interval": rnd["interval"], "labels": rnd["labels"]}
    return {"strategies": per_strategy, "prevalence": prevalence, "round": project.store.latest_round()}


def evaluation(project: Project, *, k: int = default("k")) -> dict[str, Any]:
    """precision@K on the test split against random sampling; see :func:`raresift.evaluate.evaluate`."""
    return project.evaluate(k=k)


def evaluation_state(project: Project) -> tuple:
    """What an evaluation report depends on: the newest label event, the rounds, the vectors and the
    cold start (a report is reused while these stay the same)."""
    store = project.store
    return (store.label_counts()["seq"], store.count_rounds(), store.vectors_generation(),
            store.concept, *(store.meta(store.concept_key(k)) for k in ("learn.query", "learn.examples", "learn.not_like")))


def export(project: Project, *, top: int, fmt: str) -> Path:
    """Write the top of the ranking into ``PROJECT/exports/`` and return the written path."""
    folder = project.store.paths.exports_dir
    folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = {"csv": ".csv", "jsonl": ".jsonl", "label-studio": ".json"}.get(fmt, "")
    return Path(project.export(top=top, fmt=fmt, out=folder / f"top{top}-{stamp}{suffix}"))
