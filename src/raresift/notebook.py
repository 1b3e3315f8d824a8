"""Label photos in Jupyter or Colab: ``Labeler(project)``, an ipywidgets labeller with the web page's keys.

::

    from raresift.notebook import Labeler
    labeler = Labeler("insects")      # a project folder or an open Project
    labeler                           # shows the photo, buttons and a key box

Click into the key box and type ``1``/``y`` (shows the class), ``0``/``n`` (does not), ``?`` (unsure),
Backspace or ``u`` (undo the last label), ``s`` (skip), ``t`` (train and queue the next round),
``h`` (show or hide the box of the tile the score comes from), ``z`` (zoom to that box, decoded
from the original file; ``z`` again shows the whole photo).
Every label is committed to the project's database at once, with who / when / round / strategy;
a photo that someone else labelled meanwhile is reported, never silently overwritten. The same
actions are methods (:meth:`Labeler.yes`, :meth:`Labeler.no`, :meth:`Labeler.undo`, ...), so a
script or a test can drive the labeller without a browser.
"""

from __future__ import annotations

import html
import io
import os
from typing import Any

from . import labelling
from .errors import MissingExtraError, RaresiftError
from .project import Project
from .settings import default
from .store.labels import LabelConflict

__all__ = ["Labeler", "KEYS"]

KEYS = {
    "1": "yes", "y": "yes",
    "0": "no", "n": "no",
    "?": "unsure",
    "u": "undo", "Backspace": "undo",
    "s": "skip",
    "t": "next_round",
    "h": "toggle_region",
    "z": "zoom",
}
_SENTINEL = "▸"  # the key box holds this; deleting it (Backspace) means undo


class Labeler:
    """An ipywidgets labeller for a project.

    Parameters
    ----------
    project:
        A :class:`~raresift.project.Project` or the path of a project folder.
    who:
        Name recorded with the labels (default: the user name).
    batch:
        Photos per round when the queue runs empty.
    strategy:
        Strategy of the rounds this labeller starts (see ``raresift.learn.STRATEGIES``).
    query:
        Optional text query for a cold start (first round only).
    purpose:
        ``"label"`` (default) or ``"evaluate"`` (label the test photos queued for evaluation).
    max_side:
        Photos are shrunk to at most this many pixels per side before they are sent to the browser.
    concept:
        The concept (rare class) to label when ``project`` is a path (an open Project brings its own).
    """

    def __init__(
        self,
        project: Project | str | os.PathLike,
        *,
        who: str | None = None,
        batch: int = default("batch"),
        strategy: str = "default",
        query: str | None = None,
        purpose: str = "label",
        max_side: int = 640,
        concept: str = "default",
    ):
        try:
            import ipywidgets as w
        except ImportError:
            raise MissingExtraError("the notebook labeller", "notebook") from None

        self._own = not isinstance(project, Project)
        self.project = Project.open(project, concept=concept) if self._own else project
        self.who = who or labelling.default_who()
        self.batch = batch
        self.strategy = strategy
        self.query = query
        self.purpose = purpose
        self.max_side = max_side
        self.items: list[dict[str, Any]] = []
        self.history: list[tuple[dict[str, Any], int]] = []  # (item, event id) of labels given here
        self.message = ""
        self.show_region = True  # h: draw the region's box on the photo
        self.zoomed = False  # z: the photo shown is the region, cut from the original file
        self._zoomed_id: int | None = None

        self.image = w.Image(format="jpeg", layout=w.Layout(max_width="100%", max_height="520px"))
        self.caption = w.HTML()
        self.info = w.HTML()
        self.status = w.HTML()
        self.keys = w.Text(value=_SENTINEL, placeholder="click here, then type 1 0 u s t",
                           description="keys", continuous_update=True, layout=w.Layout(width="260px"))
        self.keys.observe(self._on_keys, names="value")
        buttons = []
        for text, action, style in (("Yes (1/y)", "yes", "success"), ("No (0/n)", "no", "danger"),
                                    ("Unsure (?)", "unsure", ""), ("Undo (⌫/u)", "undo", ""), ("Skip (s)", "skip", ""),
                                    ("Where (h)", "toggle_region", ""), ("Zoom (z)", "zoom", ""),
                                    ("Train & next round (t)", "next_round", "info")):
            b = w.Button(description=text, button_style=style, layout=w.Layout(width="auto"))
            b.on_click(lambda _b, a=action: self._act(a))
            buttons.append(b)
        self.buttons = buttons
        self.widget = w.VBox([
            w.HBox([self.keys, *buttons]),
            self.image,
            self.caption,
            w.HBox([self.info, self.status]),
        ])
        self._act("refresh")

    # ------------------------------------------------------------------ display
    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def close(self) -> None:
        """Close the widgets (and the project, if this labeller opened it)."""
        self.widget.close()
        if self._own:
            self.project.close()

    @property
    def current(self) -> dict[str, Any] | None:
        """The photo on screen (image_id, path, score, strategy, round, ...), or None when nothing is queued."""
        return self.items[0] if self.items else None

    # ------------------------------------------------------------------ actions
    def press(self, key: str) -> None:
        """Act on one key, as typed into the key box (unknown keys are ignored)."""
        action = KEYS.get(key)
        if action is not None:
            self._act(action)

    def yes(self) -> None:
        """Label the photo on screen as showing the class, and move on."""
        self.label(1)

    def no(self) -> None:
        """Label the photo on screen as not showing the class, and move on."""
        self.label(0)

    def unsure(self) -> None:
        """Answer "unsure" for the photo on screen (stored, listed by ``next --review``, never trained on)."""
        self.label("unsure")

    def label(self, value: int | str, *, force: bool = False) -> None:
        """Label the photo on screen 1, 0 or "unsure"; ``force`` replaces a label someone else gave meanwhile."""
        it = self.current
        if it is None:
            self.message = "nothing to label: press t to train and queue the next round"
            self._render()
            return
        expected = {} if force else {"expected": it["event"]}
        try:
            ev = labelling.label_items(
                self.project, [(it["image_id"], value, not force, expected.get("expected"))],
                who=self.who, source="notebook",
            )[0]
        except LabelConflict as exc:
            cur = exc.current
            what = "had its label withdrawn" if cur is None or cur.value is None else \
                f"was labelled {labelling.api_value(cur.value) if cur.value not in (0, 1) else 'yes' if cur.value else 'no'}"
            by = f" by {cur.who}" if cur is not None else ""
            self.message = (f"{it['path']} {what}{by} since it was shown; nothing was overwritten. "
                            f"Call labeler.label({value!r}, force=True) to replace it, or s to skip.")
            it["event"] = cur.id if cur is not None else None
            self._render()
            return
        self.history.append((it, ev.id))
        self.items.pop(0)
        self.message = f"saved: {it['path']} = {value if value == 'unsure' else 'yes' if value else 'no'}"
        self._fill()
        self._render()

    def undo(self) -> None:
        """Withdraw the last label given here (or, after a restart, this person's newest label)."""
        if self.history:
            it, event_id = self.history.pop()
            ev = labelling.undo(self.project, who=self.who, image_id=it["image_id"], event_id=event_id,
                              source="notebook")
        else:
            ev = labelling.undo(self.project, who=self.who, source="notebook")
        item = labelling.item(self.project, ev.image_id)
        self.items = [item] + [x for x in self.items if x["image_id"] != item["image_id"]]
        self.message = f"undone: {item['path']}"
        self._render()

    def skip(self) -> None:
        """Leave the photo on screen unlabelled and show the next one (it stays queued)."""
        if self.items:
            self.items.append(self.items.pop(0))
            self.message = "skipped"
        self._render()

    def next_round(self, *, strategy: str | None = None, n: int | None = None, query: str | None = None) -> None:
        """Train on the labels so far and queue the next round's photos first."""
        items = labelling.new_round(
            self.project, n=n or self.batch, strategy=strategy or self.strategy, query=query,
            evaluate=self.purpose == "evaluate", who=self.who,
        )
        ids = {x["image_id"] for x in items}
        self.items = items + [x for x in self.items if x["image_id"] not in ids]
        self.message = f"new round: {len(items)} photos"
        self._render()

    def add_example(self, image, *, box: tuple[float, float, float, float] | None = None,
                    strategy: str | None = None, n: int | None = None) -> None:
        """Search with a photo from outside the collection (a file path or the image's bytes; ``box`` =
        x, y, width, height keeps a part): it is added to the project's examples, and a round of photos
        like it is queued first."""
        key = self.project.add_example(image, box=box)
        items = labelling.new_round(self.project, n=n or self.batch, strategy=strategy or self.strategy,
                                    examples=[key], who=self.who)
        ids = {x["image_id"] for x in items}
        self.items = items + [x for x in self.items if x["image_id"] not in ids]
        self.message = f"queued {len(items)} photos like {key}"
        self._render()

    def toggle_region(self) -> None:
        """Show or hide the box of the tile the photo's score comes from (``h``)."""
        self.show_region = not self.show_region
        self._render()

    def zoom(self) -> None:
        """Show the region at the original file's resolution, or the whole photo again (``z``)."""
        it = self.current
        if it is None:
            return
        if not it.get("region") and not self.zoomed:
            self.message = "no region yet: the model needs labels of both kinds (and a project with tiles)"
        else:
            self.zoomed = not self.zoomed
            self._zoomed_id = it["image_id"] if self.zoomed else None
        self._render()

    def refresh(self) -> None:
        """Reload the queue from the project (labels given elsewhere drop out of it)."""
        self.items = []
        self._fill(first=True)
        self._render()

    # ------------------------------------------------------------------ internals
    def _act(self, action: str) -> None:
        # A widget callback has nowhere to raise to: errors go to the status line.
        try:
            getattr(self, action)()
        except (RaresiftError, LabelConflict) as exc:
            self.message = f"error: {exc}"
            self._render()

    def _fill(self, *, first: bool = False) -> None:
        if self.items:
            return
        self.items = labelling.queue(self.project, purpose=self.purpose)
        if not self.items and self.purpose == "label":
            query = self.query if first else None
            self.items = labelling.new_round(self.project, n=self.batch, strategy=self.strategy, query=query,
                                           who=self.who)

    def _on_keys(self, change: dict) -> None:
        value = change["new"]
        if value == _SENTINEL:
            return
        if value == "":
            keys = ["Backspace"]
        else:
            keys = list(value.replace(_SENTINEL, ""))
        self.keys.value = _SENTINEL
        for key in keys:
            self.press(key)

    def _photo_bytes(self, image_id: int, region: dict[str, int] | None = None, *, zoom: bool = False) -> bytes:
        """The photo as JPEG (upright, shrunk to ``max_side``), with the region's box drawn; with ``zoom``,
        only the region, decoded from the original file at its own resolution."""
        from PIL import Image, ImageDraw, ImageOps

        from .embed.decode import DecodeError, crop_jpeg

        path = self.project.file_path(image_id)
        if path is None or not path.is_file():
            return b""
        try:
            if zoom and region:
                return crop_jpeg(path, (region["x"], region["y"], region["width"], region["height"]),
                                 size=self.max_side)
            with Image.open(path) as raw:
                im = (ImageOps.exif_transpose(raw) or raw).convert("RGB")
                scale = min(1.0, self.max_side / max(im.size))
                im.thumbnail((self.max_side, self.max_side))
                if region:
                    x, y, w, h = (region[k] * scale for k in ("x", "y", "width", "height"))
                    ImageDraw.Draw(im).rectangle((x, y, x + w, y + h), outline=(56, 189, 248), width=3)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=85)
                return buf.getvalue()
        except (OSError, ValueError, DecodeError):
            return b""

    def _render(self) -> None:
        s = self.project.status()
        it = self.current
        if it is None:
            self.image.value = b""
            self.caption.value = "<i>nothing queued: press t to train and queue the next round</i>"
            self.info.value = ""
        else:
            if self._zoomed_id != it["image_id"]:
                self.zoomed, self._zoomed_id = False, None  # a new photo starts whole
            region = it.get("region")
            self.image.value = self._photo_bytes(it["image_id"], region if (self.show_region or self.zoomed) else None,
                                                 zoom=self.zoomed)
            self.caption.value = f"<code>{html.escape(it['path'])}</code>"
            score = "–" if it.get("score") is None else f"{it['score']:.3f}"
            self.info.value = (f"score <b>{score}</b> · picked by <b>{html.escape(str(it.get('strategy') or '–'))}</b>"
                               f" · round {it.get('round') or '–'} · {html.escape(str(it.get('split') or ''))}&nbsp;&nbsp;")
        self.status.value = (f"<b>{s['labels']}</b> labelled · <b>{s['positives']}</b> positives · "
                             f"<b>{len(self.items)}</b> queued · {html.escape(self.message)}")
