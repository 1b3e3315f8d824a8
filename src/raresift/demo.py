"""A demo collection made offline from sample photos that ship inside installed packages.

scikit-image and scikit-learn ship a few dozen real photos (scenes, textures, a cat, a rocket, ...).
The demo cuts varied views of the scene and texture photos and pastes a small cat (from the
``chelsea`` photo) into about 1 in 20 of them: a rare, small object, like insects on flowers.
The answer key is written beside the photos, so a whole labelling session can be replayed.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = ["demo_session", "make_collection", "prepare_demo", "sample_photo_files"]

# Real photos (not drawings or charts) shipped by scikit-image / scikit-learn, used as scenes.
_SCENES = {
    "skimage": [
        "astronaut.png", "brick.png", "camera.png", "coffee.png", "coins.png", "grass.png", "gravel.png",
        "hubble_deep_field.jpg", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png",
        "retina.jpg", "rocket.jpg", "ihc.png", "cell.png",
    ],
    "sklearn": ["china.jpg", "flower.jpg"],
}
_OBJECT = ("skimage", "chelsea.png")
# Box of the cat's head and upper body in chelsea.png (451 x 300).
_OBJECT_BOX = (60, 10, 360, 300)


def _package_dir(package: str) -> Path:
    sub = {"skimage": "skimage.data", "sklearn": "sklearn.datasets"}[package]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the demo needs the {package} package, which ships its sample photos")
    base = Path(spec.origin).parent
    return base / "data" if sub == "skimage.data" else base / "datasets" / "images"


def sample_photo_files() -> tuple[list[Path], Path]:
    """(scene photos, object photo) shipped inside installed packages; only those present are listed."""
    scenes = [
        _package_dir(pkg) / name for pkg, names in _SCENES.items() for name in names if (_package_dir(pkg) / name).is_file()
    ]
    obj = _package_dir(_OBJECT[0]) / _OBJECT[1]
    if not scenes or not obj.is_file():
        raise RuntimeError("sample photos not found in the installed scikit-image / scikit-learn packages")
    return scenes, obj


def make_collection(folder: str | os.PathLike, *, n_images: int = 240, rare_share: float = 0.05, seed: int = 0) -> Path:
    """Write ``n_images`` JPEG photos into ``folder/photos`` and the answer key to ``folder/truth.csv``.

    Returns the path of the answer key (CSV ``path,label``, path relative to the photos folder).
    """
    rng = np.random.default_rng(seed)
    out = Path(folder)
    photos = out / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    scene_files, obj_file = sample_photo_files()
    scenes = [Image.open(p).convert("RGB") for p in scene_files]
    cat = Image.open(obj_file).convert("RGB").crop(_OBJECT_BOX)
    n_pos = max(2, int(round(rare_share * n_images)))
    positive = np.zeros(n_images, dtype=bool)
    positive[rng.choice(n_images, size=n_pos, replace=False)] = True
    rows = []
    for i in range(n_images):
        k = int(rng.integers(len(scenes)))
        scene = scenes[k]
        view = _random_view(scene, rng)
        if positive[i]:
            view = _paste(view, cat, rng)
        name = f"{Path(scene_files[k]).stem}/{i:04d}.jpg"
        (photos / name).parent.mkdir(exist_ok=True)
        view.save(photos / name, quality=88)
        rows.append((name, int(positive[i])))
    truth = out / "truth.csv"
    with open(truth, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return truth


def _random_view(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = im.size
    scale = rng.uniform(0.45, 1.0)
    cw, ch = max(32, int(w * scale)), max(32, int(h * scale * rng.uniform(0.8, 1.2)))
    ch = min(ch, h)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    view = im.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        view = ImageOps.mirror(view)
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.8, 1.2))
    view = ImageEnhance.Color(view).enhance(rng.uniform(0.7, 1.3))
    target = int(rng.integers(320, 560))
    return view.resize((target, max(32, int(target * view.height / view.width))), Image.Resampling.BILINEAR)


def _paste(view: Image.Image, obj: Image.Image, rng: np.random.Generator) -> Image.Image:
    view = view.copy()
    side = int(min(view.size) * rng.uniform(0.25, 0.45))
    o = obj.resize((side, int(side * obj.height / obj.width)), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        o = ImageOps.mirror(o)
    x = int(rng.integers(0, max(1, view.width - o.width)))
    y = int(rng.integers(0, max(1, view.height - o.height)))
    view.paste(o, (x, y))
    return view


def prepare_demo(folder: str | os.PathLike, *, n_images: int = 240,
                 on_start: Callable[[int], None] | None = None, progress: Callable[[int], None] | None = None,
                 ) -> tuple[Path, Path, bool]:
    """Build the sample collection (once), register and embed it into ``folder/project``.

    Returns ``(project folder, answer key, whether the photos were written now)``.
    """
    from .project import Project

    folder = Path(folder)
    truth = folder / "truth.csv"
    made = not truth.exists()
    if made:
        make_collection(folder, n_images=n_images)
    project_dir = folder / "project"
    with Project.create(project_dir, images=folder / "photos", exist_ok=True) as project:
        project.add_images()
        project.embed(on_start=on_start, progress=progress)
    return project_dir, truth, made


def demo_session(project_dir: Path, truth: Path) -> dict:
    """Labelling sessions replayed against the answer key from the text query 'cat' (seconds)."""
    from .simulate import simulate

    return simulate(project=project_dir, truth=truth, query="cat", budget=50, batch=10, repeats=3, k=None)
