"""Shared fixtures: small real images made by the suite, projects embedded with the real model."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FLOWERS = SHARED / "datasets" / "flowers-daisy-dandelion"
CALTECH = SHARED / "datasets" / "caltech101" / "101_ObjectCategories"


def make_photo(rng: np.random.Generator, *, rare: bool, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A small synthetic 'photo': a smooth coloured background with blobs; the rare class adds a
    striped yellow-black beetle-like shape (what the rare class looks like is all that matters)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 200, size=3)
    grad = rng.uniform(-0.6, 0.6, size=(2, 3))
    arr = base + xx[..., None] * grad[0] + yy[..., None] * grad[1] + rng.normal(0, 12, size=(h, w, 3))
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(8, 30))
        colour = tuple(int(c) for c in rng.integers(0, 255, size=3))
        if rng.random() < 0.5:
            d.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            d.rectangle((x - r, y - r, x + r, y + r), fill=colour)
    if rare:
        cx, cy = int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 4, 3 * h // 4))
        rx, ry = w // 5, h // 7
        d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=(235, 200, 20))
        for k in range(-rx, rx, max(3, rx // 3)):
            d.line((cx + k, cy - ry, cx + k, cy + ry), fill=(10, 10, 10), width=max(2, rx // 8))
        d.ellipse((cx + rx - 4, cy - 6, cx + rx + 10, cy + 6), fill=(10, 10, 10))
    return im


def beetle_photo(rng: np.random.Generator, corner: int | str | None, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A textured background with a few blobs; with ``corner`` (0-3, or ``"random"``: drawn after the
    background), a striped yellow beetle in that quadrant: a small object whose place is known."""
    w, h = size
    arr = rng.uniform(60, 180, size=3) + rng.normal(0, 14, size=(h, w, 3))
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(8, 24))
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    if corner == "random":
        corner = int(rng.integers(0, 4))
    if corner is not None:
        cx = w // 4 if corner in (0, 2) else 3 * w // 4
        cy = h // 4 if corner in (0, 1) else 3 * h // 4
        rx, ry = 34, 22
        d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=(235, 200, 20))
        for k in range(-rx, rx, 9):
            d.line((cx + k, cy - ry, cx + k, cy + ry), fill=(10, 10, 10), width=4)
    return im


def make_collection(folder: Path, *, n: int = 40, n_rare: int = 6, seed: int = 0, fmt: str = "jpg") -> dict[str, int]:
    """Write ``n`` photos (``n_rare`` of the rare class) under ``folder`` in two subfolders.

    Returns the answer key: relative path -> 1/0.
    """
    rng = np.random.default_rng(seed)
    rare = set(rng.choice(n, size=n_rare, replace=False).tolist())
    truth = {}
    for i in range(n):
        sub = "a" if i % 2 else "b"
        rel = f"{sub}/img_{i:04d}.{fmt}"
        (folder / sub).mkdir(parents=True, exist_ok=True)
        make_photo(rng, rare=i in rare).save(folder / rel)
        truth[rel] = int(i in rare)
    return truth


def write_truth(path: Path, truth: dict[str, int]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for p, v in truth.items():
            w.writerow([p, v])
    return path


def _embedded(root: Path, images: Path, **embed_options) -> Path:
    """A project at ``root / "project"`` of the photos under ``images``, embedded with the real model."""
    from raresift import Project

    with Project.create(root / "project", images=images) as project:
        project.add_images()
        project.embed(batch_size=16, **embed_options)
    return root / "project"


def _private_copy(template: tuple[Path, Path, dict[str, int]], tmp_path: Path) -> tuple[Path, Path, dict[str, int]]:
    src, images, truth = template
    dst = tmp_path / "project"
    shutil.copytree(src, dst)
    return dst, images, truth


@pytest.fixture(scope="session")
def embedded_template(tmp_path_factory) -> tuple[Path, Path, dict[str, int]]:
    """A project of 40 generated photos (6 rare), embedded once per session with the real model."""
    root = tmp_path_factory.mktemp("embedded")
    truth = make_collection(root / "images", n=40, n_rare=6)
    return _embedded(root, root / "images"), root / "images", truth


@pytest.fixture
def embedded_project(embedded_template, tmp_path) -> tuple[Path, Path, dict[str, int]]:
    """A private copy of the embedded template: (project folder, images folder, answer key)."""
    return _private_copy(embedded_template, tmp_path)


@pytest.fixture(scope="session")
def embedded_views_template(embedded_template, tmp_path_factory) -> tuple[Path, Path, dict[str, int]]:
    """The photos of :func:`embedded_template` embedded with ``layout="views"`` (every view kept)."""
    _, images, truth = embedded_template
    return _embedded(tmp_path_factory.mktemp("embedded-views"), images, layout="views"), images, truth


@pytest.fixture
def embedded_views_project(embedded_views_template, tmp_path) -> tuple[Path, Path, dict[str, int]]:
    """A private copy of :func:`embedded_views_template`."""
    return _private_copy(embedded_views_template, tmp_path)


@pytest.fixture
def flowers() -> Path:
    if not FLOWERS.is_dir():
        pytest.skip("../shared/datasets/flowers-daisy-dandelion is not beside this checkout")
    return FLOWERS


def pytest_configure(config):
    # Keep exported model files in one cache per machine, like a user's.
    os.environ.setdefault("RARESIFT_CACHE_DIR", str(Path.home() / ".cache" / "raresift"))
