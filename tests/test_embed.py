"""The embedding pipeline with the real EfficientNet-Lite0 model: vectors, logits, tiles, resume, errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from raresift import InputError, Project
from raresift.embed.decode import DecodeError, Views, cut_views, load_views, open_rgb

from conftest import make_collection, make_photo


def _cos(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_embeddings_and_logits_of_the_real_model(embedded_project):
    path, _images, truth = embedded_project
    with Project.open(path) as project:
        ids, matrix = project.embeddings()
        assert sorted(ids) == sorted(truth)
        assert matrix.shape == (40, 1280) and matrix.dtype == np.float16
        assert np.isfinite(matrix).all() and (np.abs(matrix).sum(axis=1) > 0).all()
        logits = project.logits()
        # Default: whole photo + 3 x 3 tiles, kept compact: each view's 32 most likely ImageNet classes and
        # each class's best log-probability over the views.
        assert project.embedding_info()["views"] == 10 and project.embedding_info()["layout"] == "compact"
        assert logits.shape == (40,) and logits["lp"].shape == (40, 10, 32) and logits["best"].shape == (40, 1000)
        assert float(np.max(logits["lp"])) <= 0.0
        assert project.vectors().shape == (40, 3, 1280)
        p = np.exp(np.asarray(logits["lp"], np.float64)).sum(axis=2)  # the mass of the top classes of a view
        assert (p <= 1.01).all() and np.median(p) > 0.5
        top = np.asarray(logits["lp"], np.float32).max(axis=(1, 2))  # a photo's likeliest class, in any view
        np.testing.assert_allclose(np.asarray(logits["best"], np.float32).max(axis=1), top, atol=1e-3)
        # Rare photos look alike: their mean cosine is higher than rare-vs-common.
        rare = [i for i, p in enumerate(ids) if truth[p]]
        common = [i for i, p in enumerate(ids) if not truth[p]]
        m = np.asarray(matrix, np.float32)
        m /= np.linalg.norm(m, axis=1, keepdims=True)
        within = (m[rare] @ m[rare].T)[np.triu_indices(len(rare), 1)].mean()
        across = (m[rare] @ m[common].T).mean()
        assert within > across + 0.05


def test_known_photo_is_classified_by_the_imagenet_head(tmp_path):
    from raresift.demo import sample_photo_files

    _scenes, cat = sample_photo_files()  # scikit-image's 'chelsea', a tabby cat
    images = tmp_path / "images"
    images.mkdir()
    Image.open(cat).convert("RGB").save(images / "cat.jpg")
    with Project.create(tmp_path / "p", images=images) as project:
        project.add_images()
        project.embed()
        kept = project.logits()[0]  # compact layout: the whole photo's (view 0) 32 most likely classes
        top5 = kept["c"][0][np.argsort(np.asarray(kept["lp"][0], np.float32))[-5:]]
    assert set(top5.tolist()) & {281, 282, 283, 284, 285, 287}  # tabby, tiger cat, Persian, ..., lynx


def test_resume_embeds_each_photo_once_and_matches_a_single_run(tmp_path):
    images = tmp_path / "images"
    make_collection(images, n=12, n_rare=2)
    with Project.create(tmp_path / "a", images=images) as a:
        a.add_images()
        first = a.embed(batch_size=4, limit=5)
        assert (first.embedded, first.remaining) == (5, 7)
        assert a.status()["embedded"] == 5
        second = a.embed(batch_size=4)
        assert (second.embedded, second.remaining) == (7, 0)
        third = a.embed(batch_size=4)
        assert third.embedded == 0
        va = np.asarray(a.vectors(), np.float32)
    with Project.create(tmp_path / "b", images=images) as b:
        b.add_images()
        b.embed(batch_size=12)
        vb = np.asarray(b.vectors(), np.float32)
    assert min(_cos(x, y) for x, y in zip(va[:, 0], vb[:, 0])) > 0.999


def test_tiles_store_one_view_per_tile_and_settings_cannot_be_mixed(tmp_path):
    images = tmp_path / "images"
    make_collection(images, n=4, n_rare=1)
    with Project.create(tmp_path / "p", images=images) as project:
        project.add_images()
        project.embed(tiles=2, layout="views")
        assert project.vectors().shape == (4, 5, 1280)
        assert project.logits().shape == (4, 5, 1000)
        assert project.embedding_info()["tiles"] == 2
        with pytest.raises(InputError, match="--reembed"):
            project.embed(tiles=0)
        project.embed(tiles=0, reembed=True)
        assert project.vectors().shape == (4, 1, 1280)
        assert project.status()["embedded"] == 4


def test_unreadable_files_are_recorded_and_skipped(tmp_path):
    images = tmp_path / "images"
    make_collection(images, n=3, n_rare=1)
    (images / "empty.jpg").write_bytes(b"")
    (images / "page.png").write_text("<!DOCTYPE html><html><body>not a photo</body></html>")
    with Project.create(tmp_path / "p", images=images) as project:
        project.add_images()
        report = project.embed()
        assert (report.embedded, report.errors) == (3, 2)
        reasons = {e["path"]: e["reason"] for e in project.errors()}
        assert "empty file" in reasons["empty.jpg"]
        assert "HTML" in reasons["page.png"]
        s = project.status()
        assert (s["embedded"], s["errors"], s["pending"]) == (3, 2, 0)


def test_decoding_odd_modes_gives_rgb(tmp_path):
    views = Views(size=64)
    cases = {
        "cmyk.jpg": Image.new("CMYK", (50, 40), (0, 255, 0, 0)),
        "grey16.png": Image.fromarray(np.full((30, 20), 60000, np.uint16)),
        "palette.png": Image.new("P", (20, 20), 3),
        "rgba.png": Image.new("RGBA", (20, 20), (255, 0, 0, 0)),
        "tiny.bmp": Image.new("RGB", (1, 1), (9, 9, 9)),
        "long.png": Image.new("RGB", (4000, 12), (0, 0, 200)),
    }
    for name, im in cases.items():
        kwargs = {"transparency": 3} if name == "palette.png" else {}
        im.save(tmp_path / name, **kwargs)
        arr = load_views(tmp_path / name, views)
        assert arr.shape == (1, 64, 64, 3) and arr.dtype == np.uint8, name
    # 16-bit grey 60000/65535 maps to ~233, not clipped to 255 or wrapped.
    assert 225 < load_views(tmp_path / "grey16.png", views)[0].mean() < 240
    # fully transparent red becomes the white background.
    assert load_views(tmp_path / "rgba.png", views)[0].min() == 255


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (60, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 30, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "rot.jpg", exif=exif)
    upright = open_rgb(tmp_path / "rot.jpg", min_side=100)
    assert upright.size == (20, 60)
    arr = np.asarray(upright, np.float32)
    assert arr[:30].mean() > 200 and arr[30:].mean() < 50  # white half now on top


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    im = Image.new("1", (12000, 12000))
    im.save(tmp_path / "bomb.png", optimize=True)
    with pytest.raises(DecodeError, match="megapixels"):
        open_rgb(tmp_path / "bomb.png", min_side=224, max_pixels=100_000_000)


def test_tiles_cover_the_photo_with_overlap():
    im = Image.fromarray(np.tile(np.arange(300, dtype=np.uint8)[None, :300 // 1 % 256], (200, 1)).astype(np.uint8))
    im = im.convert("RGB")
    out = cut_views(im, Views(size=32, tiles=3))
    assert out.shape == (10, 32, 32, 3)
    # Tile columns move left to right: mean brightness grows across the first row of tiles.
    row = [out[1 + j].mean() for j in range(3)]
    assert row[0] < row[1] < row[2]


def test_crop_and_squeeze_differ_on_a_wide_photo(tmp_path):
    im = Image.new("RGB", (300, 100), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 60, 100))  # white strip at the left edge
    squeeze = cut_views(im, Views(size=50, resize="squeeze"))[0]
    crop = cut_views(im, Views(size=50, resize="crop"))[0]
    assert squeeze[:, :5].mean() > 200  # the edge object survives a squeeze
    assert crop.mean() < 5  # ... and is cut off by a centre crop


def test_user_onnx_model_reads_its_input_size(tmp_path):
    torch = pytest.importorskip("torch")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

        def forward(self, x):
            return self.conv(x)  # (N, 8, h, w): raresift mean-pools the map

    model_path = tmp_path / "tiny.onnx"
    torch.onnx.export(Tiny().eval(), (torch.zeros(1, 3, 96, 96),), str(model_path), input_names=["pixels"],
                      dynamic_axes={"pixels": {0: "n"}}, opset_version=17, dynamo=False)
    images = tmp_path / "images"
    make_collection(images, n=3, n_rare=1)
    with Project.create(tmp_path / "p", images=images) as project:
        project.add_images()
        report = project.embed(model=str(model_path))
        assert report.embedded == 3
        assert project.vectors().shape == (3, 3, 8)  # 10 views (3 x 3 tiles) kept compact: whole, mean, max
        assert project.embedding_info()["views"] == 10
        assert project.logits() is None


def test_retry_errors_embeds_a_file_fixed_since(tmp_path):
    images = tmp_path / "images"
    make_collection(images, n=2, n_rare=1)
    (images / "late.jpg").write_bytes(b"")  # still being copied, say
    with Project.create(tmp_path / "p", images=images) as project:
        project.add_images()
        assert project.embed(tiles=0).errors == 1
        make_photo(np.random.default_rng(3), rare=False).save(images / "late.jpg")
        assert project.embed(tiles=0).embedded == 0  # errors are not retried silently
        report = project.embed(tiles=0, retry_errors=True)
        assert (report.embedded, report.errors) == (1, 0)
        s = project.status()
        assert (s["embedded"], s["errors"]) == (3, 0)


def test_atomic_file_replaces_on_success_and_leaves_the_target_on_error(tmp_path):
    import os

    from raresift.embed.runtime import atomic_file

    target = tmp_path / "models" / "m.onnx"
    with atomic_file(target) as tmp:
        assert os.path.dirname(tmp) == str(target.parent) and tmp.endswith(".onnx")
        with open(tmp, "wb") as fh:
            fh.write(b"first")
    assert target.read_bytes() == b"first"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not the private mode mkstemp gives
    with pytest.raises(RuntimeError, match="half written"):
        with atomic_file(target) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"sec")
            raise RuntimeError("half written")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.onnx"]  # no temporary file left behind
