"""The notebook labeller, driven through its methods and its key box (no kernel needed)."""

from __future__ import annotations

import pytest

from raresift import Project
from raresift.notebook import KEYS, Labeler

pytest.importorskip("ipywidgets")


def type_keys(labeler: Labeler, text: str) -> None:
    """What typing into the key box does: the box holds a marker, typed characters follow it."""
    labeler.keys.value = labeler.keys.value + text


def test_keys_1_0_1_backspace_leave_two_labels_one_positive(embedded_project):
    project, _, _ = embedded_project
    with Project.open(project) as p:
        lab = Labeler(p, who="ann")
        first = lab.current
        assert first is not None and lab.image.value[:3] == b"\xff\xd8\xff"  # the photo is shown
        type_keys(lab, "1")
        type_keys(lab, "0")
        type_keys(lab, "1")
        third = lab.history[-1][0]
        lab.keys.value = ""  # Backspace deletes the marker: undo
        s = p.status()
        assert (s["labels"], s["positives"]) == (2, 1)
        assert lab.current["image_id"] == third["image_id"]  # the undone photo is back on screen
        assert lab.keys.value == "▸"  # the box is reset after every key
        rows = p.db.execute("SELECT value, who, source, round_id, strategy FROM labels ORDER BY id").fetchall()
        assert [r[0] for r in rows] == [1, 0, 1, None]
        assert all(r[1] == "ann" and r[2] == "notebook" for r in rows)
        assert rows[0][3] is not None and rows[0][4]  # round and strategy recorded
        assert "2</b> labelled" in lab.status.value
        lab.close()


def test_methods_skip_and_same_keys_as_the_page(embedded_project):
    project, _, _ = embedded_project
    lab = Labeler(project, who="ann", batch=5)
    assert {k: KEYS[k] for k in ("1", "y", "0", "n", "u", "Backspace", "s")} == {
        "1": "yes", "y": "yes", "0": "no", "n": "no", "u": "undo", "Backspace": "undo", "s": "skip"}
    first = lab.current["image_id"]
    lab.skip()
    assert lab.current["image_id"] != first
    lab.press("y")
    lab.press("x")  # unknown keys do nothing
    with Project.open(project) as p:
        assert p.status()["labels"] == 1
        assert first not in {r[0] for r in p.db.execute("SELECT image_id FROM current_labels")}
    lab.close()


def test_label_given_elsewhere_is_reported_not_overwritten(embedded_project):
    project, _, _ = embedded_project
    lab = Labeler(project, who="ann")
    shown = lab.current
    with Project.open(project) as other:
        other.label([(shown["image_id"], 1)], who="bob")
    lab.no()
    assert "bob" in lab.message and "nothing was overwritten" in lab.message
    with Project.open(project) as p:
        assert p.db.execute("SELECT value, who FROM current_labels WHERE image_id = ?",
                            (shown["image_id"],)).fetchone()[:] == (1, "bob")
    lab.label(0, force=True)  # the person decides to replace it
    with Project.open(project) as p:
        row = p.db.execute("SELECT value, who, conflict FROM labels WHERE image_id = ? ORDER BY id DESC LIMIT 1",
                           (shown["image_id"],)).fetchone()
        assert tuple(row) == (0, "ann", 1)
    lab.close()


def test_h_and_z_show_the_region_and_zoom_to_it(embedded_project):
    """With a model, the photo carries the region's box (h hides it) and z shows the region decoded from the
    original file at its own resolution; the next photo starts whole."""
    import io

    from PIL import Image

    project, _, truth = embedded_project
    with Project.open(project) as p:
        p.label([(path, v) for path, v in truth.items()][:24])
        p.label([(path, 1) for path, v in truth.items() if v])
        p.next(6, seed=0)  # a round with a head: the queue's photos have regions
        lab = Labeler(p, who="ann")
        it = lab.current
        assert it["region"] and len(it["tiles"]) == 9
        boxed = lab.image.value
        lab.press("h")
        assert lab.show_region is False and lab.image.value != boxed  # the box is no longer drawn
        lab.press("z")
        with Image.open(io.BytesIO(lab.image.value)) as crop:  # 80 x 60, enlarged from the original to 640 wide
            assert crop.size == (8 * it["region"]["width"], 8 * it["region"]["height"])
        lab.press("z")
        with Image.open(io.BytesIO(lab.image.value)) as whole:
            assert whole.size == (160, 120)
        lab.press("z")
        lab.press("n")  # the next photo starts whole
        assert lab.zoomed is False
        with Image.open(io.BytesIO(lab.image.value)) as whole:
            assert whole.size == (160, 120)
        lab.close()
