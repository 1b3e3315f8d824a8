"""``Project``: the Python entry point of raresift.

::

    from raresift import Project

    with Project.create("insects", images="photos/") as project:   # or Project("insects") to open one
        project.add_images()
        project.embed()
        batch = project.next(25, query="insect or spider")           # photos to label, a recorded round
        project.label([(b["path"], 1) for b in batch[:3]])
        report = project.evaluate(k=50)                               # precision@50 on the test split
        project.export(top=500, fmt="jsonl", out="top.jsonl")

A project is a folder with one SQLite file and the vector files (see :mod:`raresift.store.paths`).
``Project`` holds a :class:`raresift.store.Store` (the database and the files) and calls the use
cases: registering and embedding photos, the learning loop, evaluation, export, similar photos.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .settings import default
from .store.labels import DEFAULT_CONCEPT, UNSURE, LabelEvent, default_who, read_csv
from .store.store import AddReport, Store

__all__ = ["AddReport", "DEFAULT_SEED", "DEFAULT_TEST_FRACTION", "Project"]

DEFAULT_TEST_FRACTION = default("test_fraction")
DEFAULT_SEED = default("seed")

Progress = Callable[[int], None]


class Project:
    """A raresift project folder: ``Project(path)`` opens one, :meth:`create` makes one.

    The object holds one SQLite connection; use it as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike | Store, *, concept: str = DEFAULT_CONCEPT):
        self.store = path if isinstance(path, Store) else Store.open(path, concept=concept)
        self.path = self.store.root
        self.db = self.store.db  # the SQLite connection, for reading (all writes go through the store)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, *, concept: str = DEFAULT_CONCEPT) -> Project:
        """Open an existing project folder (the same as ``Project(path)``); ``concept`` names the rare class
        whose labels, rounds and model this object works with (photos, splits and vectors are shared)."""
        return cls(path, concept=concept)

    @property
    def concept(self) -> str:
        """The concept (rare class) this object labels and ranks; ``"default"`` unless opened with another."""
        return self.store.concept

    def concepts(self) -> list[dict[str, Any]]:
        """Every concept of the project with its counts (what `raresift concepts --json` prints)."""
        return self.store.concepts()

    def review(self) -> list[dict[str, Any]]:
        """The photos answered "unsure" for this concept, newest first (never trained on): image_id, path,
        split, who, at."""
        return self.store.unsure()

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        images: str | os.PathLike | None = None,
        test_fraction: float = DEFAULT_TEST_FRACTION,
        seed: int = DEFAULT_SEED,
        exist_ok: bool = False,
    ) -> Project:
        """Create a project folder (or, with ``exist_ok``, open the one that is there).

        ``images`` is the folder whose photos the project registers (see :meth:`add_images`).
        A random ``test_fraction`` of the photos is held out as the test split, drawn with ``seed``.
        """
        if not 0.0 <= test_fraction < 1.0:
            raise InputError(f"--test-fraction must be in [0, 1), got {test_fraction}")
        root = None
        if images is not None:
            root = Path(images)
            if not root.exists():
                raise InputError(f"images folder {root} does not exist")
            if not root.is_dir():
                raise InputError(f"images folder {root} is not a folder")
            if not os.access(root, os.R_OK | os.X_OK):
                raise InputError(f"images folder {root} is not readable")
            root = root.resolve()
        return cls(Store.create(path, images=root, test_fraction=test_fraction, seed=seed, exist_ok=exist_ok))

    def close(self) -> None:
        """Close the database connection."""
        self.store.close()

    def __enter__(self) -> Project:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Project({str(self.path)!r})"

    # ------------------------------------------------------------------ settings
    def meta(self, key: str, default: str | None = None) -> str | None:
        """A project setting stored in the database (strings), or ``default``."""
        return self.store.meta(key, default)

    @property
    def images_root(self) -> Path | None:
        """The folder the photos were registered from (None for a project of external vectors)."""
        return self.store.images_root

    @property
    def test_fraction(self) -> float:
        return self.store.test_fraction

    @property
    def seed(self) -> int:
        return self.store.seed

    # ------------------------------------------------------------------ photos and vectors
    def add_images(self, *, progress: Progress | None = None) -> AddReport:
        """Register the image files of the images folder that are not registered yet.

        Files that cannot be read (broken links, unreadable) are registered with an error, so
        they are reported and never retried silently. Returns counts of what was added.
        """
        return self.store.add_images(progress=progress)

    def import_embeddings(self, embeddings: str | os.PathLike, ids: str | os.PathLike | None = None) -> int:
        """Register images from vectors computed elsewhere: an ``.npy`` matrix whose row i belongs to line i
        of ``ids``; a Parquet file with ``id`` and ``embedding`` (or ``vector``) columns; or a folder of
        such shards (``NAME.npy`` + ``NAME.txt``, or ``NAME.parquet``), taken in name order. Streamed,
        never the whole matrix in memory (:mod:`raresift.embed.external`). The ids may be paths or URIs.
        Returns the number of images registered.
        """
        from .embed.external import import_embeddings
        from .learn.loop import prepare_scoring

        n = import_embeddings(self.store, embeddings, ids)
        prepare_scoring(self.store)
        return n

    def embed(self, **options: Any):
        """Embed every registered image that is not embedded yet; see :func:`raresift.embed.run.embed_project`."""
        from .embed.run import embed_project
        from .learn.loop import prepare_scoring

        report = embed_project(self.store, **options)
        if report.remaining == 0:
            prepare_scoring(self.store)
        return report

    def tune(self, **options: Any):
        """Fine-tune the last block of the built-in model on this concept's pool labels and write the tuned model
        to ``models/``; see :func:`raresift.learn.tune.tune_project`. The vectors do not change until
        :meth:`embed` runs with ``model=report.model, reembed=True`` (``raresift tune`` does both)."""
        from .learn.tune import tune_project

        return tune_project(self.store, **options)

    def compact(self, **options: Any):
        """Keep the tiled photos' vectors compact; see :func:`raresift.embed.run.compact_project`. Then writes
        what rounds at scale read (as after `embed`)."""
        from .embed.run import compact_project
        from .index import auto_kind
        from .learn.loop import prepare_scoring

        report = compact_project(self.store, **options)
        info = self.store.embedding_info()
        # The index kind of a compact project (an index built for the views layout is replaced at knn scale).
        prepare_scoring(self.store, index_kind=auto_kind(self.store.count_status("embedded"), info["dim"],
                                                         compact=True))
        return report

    def embedding_info(self) -> dict[str, Any] | None:
        """The embedding settings of the project (model, dim, views, tiles, ...), or None before `embed`."""
        return self.store.embedding_info()

    def vectors(self) -> np.ndarray:
        """All feature vectors as a read-only memory map of shape (images, views, dim), row = id - 1; in the
        compact layout (``embedding_info()["layout"]``) ``(images, 3, dim)``: whole photo, tile mean, tile max
        (:func:`raresift.learn.features.compact_views`).

        Rows of images that are not embedded hold zeros; see :meth:`embedded_mask`.
        """
        return self.store.vectors()

    def imagenet_logits(self) -> np.ndarray | None:
        """ImageNet logits, (images, views, 1000) memory map, or None where the model has none; in the compact
        layout ``(images,)`` records of each view's 32 top classes (fields ``c``, ``lp``: views x 32) and each
        class's best log-probability over the views (``best``: 1000), see
        :func:`raresift.learn.features.compact_logits`."""
        return self.store.logits()

    logits = imagenet_logits  # the name before 0.2

    def embedded_mask(self) -> np.ndarray:
        """Boolean array over rows (id - 1): True where the image is embedded."""
        return self.store.embedded_mask()

    def embeddings(self) -> tuple[list[str], np.ndarray]:
        """``(ids, matrix)``: the id of every embedded image and its whole-photo vector (row i = ids[i]).

        Where every registered image is embedded, ``matrix`` is a read-only view of the memory map
        (no copy); otherwise the embedded rows are gathered into a new array.
        """
        vec = self.vectors()
        rows = np.flatnonzero(self.embedded_mask()[: vec.shape[0]])
        paths = self.store.paths_of(rows + 1)
        ids = [paths[int(r) + 1] for r in rows]
        if len(rows) == vec.shape[0]:
            return ids, vec[:, 0, :]
        return ids, np.asarray(vec[rows, 0, :])

    # ------------------------------------------------------------------ images
    def image_ids(self) -> list[str]:
        """Ids (paths) of all registered images, in registration order (row = position)."""
        return self.store.image_ids()

    def image_id(self, path: str) -> int:
        """The database id of the image with id (path) ``path``."""
        return self.store.image_id(path)

    def file_path(self, image_id: int) -> Path | None:
        """The file of a registered image on disk, or None for an external id (URI, vectors only)."""
        return self.store.file_path(image_id)

    def splits(self) -> np.ndarray:
        """Array over rows (id - 1) of split names ('pool' / 'test'), a ``<U4`` string array."""
        return self.store.splits()

    # ------------------------------------------------------------------ labels
    def label(
        self,
        items: Iterable[tuple[str | int, int | None]],
        *,
        who: str | None = None,
        source: str = "python",
        round_id: int | None = None,
        strategy: str | None = None,
        expected: dict[int, int | None] | None = None,
    ) -> list[LabelEvent]:
        """Record labels: ``(image, value)`` pairs, image as id (path) or database id, value 1, 0, ``"unsure"``
        (or 2: stored and listed by :meth:`review`, never trained on) or None (withdraw).

        All pairs are committed in one transaction before this returns. Nothing is overwritten:
        each label is a new event with who / when / round / strategy.
        """
        pairs = []
        for image, value in items:
            image_id = image if isinstance(image, int) else self.image_id(image)
            if isinstance(value, str) and value.strip().lower() in ("unsure", "?"):
                value = UNSURE
            if value is not None and (isinstance(value, bool) or value not in (0, 1, UNSURE)):
                raise InputError(f"label must be 1, 0 or 'unsure', got {value!r}")
            pairs.append((image_id, None if value is None else int(value)))
        return self.store.append_labels(pairs, who=who or default_who(), source=source, round_id=round_id,
                                        strategy=strategy, expected=expected)

    def labels(self) -> dict[str, int]:
        """Current labels of the concept: image id (path) -> 1, 0 or 2 (unsure)."""
        return self.store.labels_by_path()

    def label_array(self) -> np.ndarray:
        """Array over rows (id - 1): 1, 0, -2 (unsure), or -1 where the image has no label."""
        return self.store.label_array()

    def import_labels(self, csv_path: str | os.PathLike, *, who: str | None = None) -> int:
        """Import a CSV with header ``path,label`` (label 1, 0 or unsure; path = image id), all or nothing.

        An optional ``concept`` column puts each row's label in that concept (empty: this object's); one
        transaction for all. A bad line raises :class:`LabelImportError` naming the line; nothing is
        imported then. Returns the number of labels read.
        """
        chosen = read_csv(csv_path, self.store.id_lookup(), concept=self.concept)
        items = [(i, v, None, None, name) for name, values in chosen.items() for i, v in values.items()]
        self.store.append_labels(items, who=who or default_who(), source="csv")
        return len(items)

    # ------------------------------------------------------------------ the learning loop
    def next(self, n: int = default("batch"), *, examples: Iterable[str | int | os.PathLike] | None = None,
             not_like: Iterable[str | os.PathLike] | None = None, **options: Any) -> list[dict[str, Any]]:
        """Retrain on all labels and choose the next ``n`` photos to label (a recorded round); options as
        :func:`raresift.learn.loop.next_batch` (``strategy``, ``query``, ``evaluate``, ``seed``, ``who``, ``pool``,
        ``engine``, ``ray_address``).

        ``examples``: photos that show the class: ids (paths) of the project's photos, or image files from
        anywhere (copied into the project and embedded with its model, see :meth:`add_example`).
        ``not_like``: image files of what the class is not (negatives that train every round).
        """
        from .learn.loop import next_batch

        ex = None if examples is None else [self._example_key(e) for e in examples]
        neg = None if not_like is None else [self._example_key(e, outside_only=True) for e in not_like]
        return next_batch(self.store, n, examples=ex, not_like=neg, **options)

    def add_example(self, image: str | os.PathLike | bytes, *, box: tuple[float, float, float, float] | None = None
                    ) -> str:
        """Add an example photo from outside the collection (a file, or the image's bytes; ``box`` = x, y,
        width, height keeps only that part): it is copied into ``PROJECT/examples/``, embedded with the
        project's model and settings, and never counted as a photo of the collection. Returns its key
        (``file:HASH``), which ``next(examples=...)`` takes."""
        from .embed.examples import add_example

        return add_example(self.store, image, box=box)

    def add_example_crop(self, image_id: int, box: tuple[float, float, float, float]) -> str:
        """Add a part of a photo of the project (``box`` = x, y, width, height in its original pixels) as an example."""
        path = self.file_path(int(image_id))
        if path is None or not path.is_file():
            raise InputError(f"photo {image_id} has no file to crop")
        return self.add_example(path, box=box)

    def _example_key(self, e: str | int | os.PathLike, *, outside_only: bool = False) -> str | int:
        if isinstance(e, int) and not outside_only:
            return e
        text = os.fspath(e) if not isinstance(e, int) else str(e)
        if text.startswith("file:"):
            return text
        if not outside_only and text in self.store.ids_by_path():
            return text
        if Path(text).is_file():
            return self.add_example(text)
        raise InputError(f"example {text!r} is neither a photo of this project nor an image file")

    def pending(self, *, purpose: str | None = None) -> list[dict[str, Any]]:
        """Photos queued by earlier rounds that have no label yet, in order."""
        from .learn.loop import pending

        return pending(self.store, purpose=purpose)

    def scores(self) -> np.ndarray:
        """The current model's probability of the rare class per row (nan where not embedded)."""
        from .learn.loop import scores

        return scores(self.store)

    def evidence(self, image_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Where in each photo the current model's score comes from: ``{image_id: {"region", "tiles"}}``.

        ``region`` is the box (x, y, width, height in the original file's pixels) of the tile that adds
        most to the score; ``tiles`` lists every tile's box with its ``score``, its share of the head's
        log-odds (see :mod:`raresift.learn.evidence`). None and [] before the labels hold both classes,
        for projects embedded without tiles and for photos whose file cannot be read."""
        from .learn.evidence import evidence
        from .learn.loop import current_model

        return evidence(self.store, current_model(self.store).head, [int(i) for i in image_ids])

    def evaluate(self, *, k: int = default("k"), top: int | None = None) -> dict[str, Any]:
        """precision@K on the test split with intervals, the random baseline, lift, recall estimates
        (the dict `raresift evaluate --json` prints; see :func:`raresift.evaluate.evaluate`)."""
        from .evaluate import evaluate

        return evaluate(self.store, k=k, top=top)

    def export(self, *, top: int, fmt: str = "csv", out: str | os.PathLike, **options: Any) -> Path:
        """Write the labelled positives and the top ``top`` unlabelled photos (see :func:`raresift.export.export`)."""
        from .export import export

        return export(self.store, top=top, fmt=fmt, out=out, **options)

    def similar(self, examples: Iterable[str | int], *, n: int = 20, unlabelled: bool = False
                ) -> list[dict[str, Any]]:
        """The ``n`` photos most like the example photos (ids or paths): path, image_id, similarity."""
        from .index import similar

        return similar(self.store, list(examples), n=n, unlabelled=unlabelled)

    # ------------------------------------------------------------------ reports
    def status(self) -> dict[str, Any]:
        """Counts that describe the project; the CLI's `status --json` prints exactly this."""
        return self.store.status()

    def errors(self) -> list[dict[str, Any]]:
        """Files that could not be registered or read, with the stage and the reason."""
        return self.store.errors()
