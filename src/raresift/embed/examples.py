"""Example photos from outside the collection: a picture of the rare class from anywhere (a phone, the
web, a crop of another photo) starts the search like a photo of the project would.

The file is copied into ``PROJECT/examples/`` under its content hash (never registered as a photo of
the collection, so it never appears in `status`, an export or an evaluation) and embedded with the
project's model and settings, tiles included; its vectors lie beside it (``HASH.npy``, shape
``(views, dim)``, read back by :meth:`raresift.store.Store.example_vectors`). An example is named by its
key ``file:HASH``.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from ..errors import InputError, NotReadyError
from ..store.store import EXAMPLE_PREFIX as KEY_PREFIX
from ..store.store import Store
from .batches import model_chunk, run_model
from .decode import DEFAULT_MAX_PIXELS, DecodeError, Views, cut_views, open_rgb
from .models import load_model

__all__ = ["add_example"]


def add_example(store: Store, source: str | os.PathLike | bytes, *, box: tuple[float, float, float, float] | None = None
                ) -> str:
    """Copy an image (a file path, or its bytes) into the project, embed it, return its key ``file:HASH``.

    ``box`` = (x, y, width, height) in the image's pixels keeps only that part (a crop: a small object).
    Embedding again the same content is free (the key is the content's hash).
    """
    info = store.embedding_info()
    if info is None:
        raise NotReadyError(f"{store.root} has no embeddings yet; run `raresift embed {store.root}` first")
    if info["model"].startswith("external:"):
        raise InputError("this project's vectors come from your own model, which raresift cannot run on a new "
                         "photo; give the ids of photos of the project as examples instead")
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), "pasted"
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"example {path} is neither a photo of this project nor an image file")
        data, name = path.read_bytes(), path.name
    views = None
    try:
        from PIL import Image

        im = open_rgb(io.BytesIO(data), min_side=1 << 30, max_pixels=DEFAULT_MAX_PIXELS)
    except DecodeError as exc:
        raise InputError(f"example {name} is not a readable image ({exc})") from None
    if box is not None:
        x, y, w, h = (float(v) for v in box)
        if w < 4 or h < 4 or x < 0 or y < 0 or x + w > im.width + 1 or y + h > im.height + 1:
            raise InputError(f"box {box} is not inside the {im.width}x{im.height} image (x, y, width, height)")
        im = im.crop((int(x), int(y), int(round(x + w)), int(round(y + h))))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        data, suffix = buf.getvalue(), ".png"
    else:
        suffix = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}.get(
            Image.open(io.BytesIO(data)).format or "", ".img")
    digest = hashlib.sha256(data).hexdigest()
    folder = store.paths.examples_dir
    folder.mkdir(parents=True, exist_ok=True)
    vec_file = folder / f"{digest}.npy"
    if vec_file.is_file():
        return KEY_PREFIX + digest
    copy = folder / f"{digest}{suffix}"
    if not copy.is_file():
        tmp = copy.with_name(f".{copy.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, copy)
    embedder = load_model(info["model"])
    views = Views(size=embedder.size, tiles=info["tiles"], resize=info["resize"] or "crop")
    stack = cut_views(im, views)
    feats, _ = run_model(embedder, stack, model_chunk(1))
    if feats.shape[1] != info["dim"]:
        raise InputError(f"the model gives {feats.shape[1]}-d vectors, the project holds {info['dim']}-d ones")
    tmp = folder / f".{digest}.tmp.npy"
    np.save(tmp, feats.astype(np.float16).reshape(views.count, -1))
    os.replace(tmp, vec_file)
    return KEY_PREFIX + digest
