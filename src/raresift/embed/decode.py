"""Reading a photo file into the fixed-size RGB arrays a model takes: whole photo plus optional tiles.

Decoding is the CPU hot spot besides the model, so: JPEG files are decoded at a reduced scale in
the DCT domain (Pillow's ``draft``) whenever that still leaves enough pixels, resizing uses
Pillow's C code, and nothing here loops over pixels in Python.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Pillow's own limit (a warning above Image.MAX_IMAGE_PIXELS, an error above twice that) stays as the
# process has it; raresift checks its own limit (``max_pixels``) with a message that names it, and
# sets no global of Pillow's.

DEFAULT_MAX_PIXELS = 120_000_000
RESIZE_MODES = ("squeeze", "crop")


class DecodeError(Exception):
    """A file that cannot be turned into an image; the message is the reason shown to the user."""


@dataclass(frozen=True)
class Views:
    """How to cut a photo into model inputs."""

    size: int  # model input side in pixels
    tiles: int = 0  # N: an N x N grid of overlapping tiles besides the whole photo (0 = none)
    resize: str = "squeeze"  # 'squeeze' (whole photo, aspect ignored) or 'crop' (centre square)

    @property
    def count(self) -> int:
        return 1 + self.tiles * self.tiles

    @property
    def min_side(self) -> int:
        """Pixels the decoded photo needs on each side so that every view has ``size`` pixels."""
        if self.tiles <= 1:
            return self.size
        # Tiles cover 2/(N+1) of each side (50% overlap between neighbours).
        return (self.size * (self.tiles + 1) + 1) // 2


def open_rgb(path: str | os.PathLike | bytes, *, min_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open a file as an upright 8-bit RGB image, at least ``min_side`` pixels per side where the file has them.

    Raises :class:`DecodeError` with a one-line reason for anything that is not a readable image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(path)
            try:
                if im.format == "JPEG":
                    # DCT-domain downscaling: decodes 1/2, 1/4 or 1/8 of the pixels when that is enough.
                    im.draft("RGB", (min_side, min_side))
                w, h = im.size
                if w < 1 or h < 1:
                    raise DecodeError(f"image has no pixels ({w}x{h})")
                if w * h > max_pixels:
                    raise DecodeError(
                        f"image is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the limit of "
                        f"{max_pixels / 1e6:.0f} megapixels (a decompression bomb?)"
                    )
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)  # animated: the first frame stands for the file
                im.load()
                im = _shrink(im, min_side)
                rgb = _to_rgb(ImageOps.exif_transpose(im) or im)
            except BaseException:
                im.close()
                raise
            if rgb is not im:
                im.close()
            return rgb
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow refuses it before raresift's own check could run (over twice Image.MAX_IMAGE_PIXELS).
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "too many pixels"
        raise DecodeError(
            f"image is {size}, over the limit of {max_pixels / 1e6:.0f} megapixels (a decompression bomb?)"
        ) from None
    except FileNotFoundError:
        raise DecodeError("file not found (deleted, or a broken symbolic link)") from None
    except IsADirectoryError:
        raise DecodeError("is a folder, not an image file") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except Image.UnidentifiedImageError:
        size = _size_or_none(path)
        if size == 0:
            raise DecodeError("empty file (0 bytes)") from None
        raise DecodeError(f"not an image file in a format Pillow can read ({_sniff(path)})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, Image.DecompressionBombWarning) as exc:
        text = str(exc) or type(exc).__name__
        if "truncated" in text:
            text = f"truncated or corrupt image data ({text})"
        raise DecodeError(text.splitlines()[0]) from None


def image_size(path: str | os.PathLike | bytes) -> tuple[int, int]:
    """Width and height of an image file as it is shown (after its EXIF orientation), from its header
    only; raises :class:`DecodeError` for a file that is not a readable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
                try:
                    turned = im.getexif().get(0x0112) in (5, 6, 7, 8)  # orientations that swap the sides
                except (OSError, ValueError, SyntaxError):
                    turned = False
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DecodeError(f"cannot read the image size: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None
    return (h, w) if turned else (w, h)


MAX_UPSCALE = 8.0  # a crop is enlarged at most this much (a 20-pixel insect of a small photo still fills a screen)


def crop_jpeg(path: str | os.PathLike, box: tuple[float, float, float, float], *, size: int = 1024,
              max_pixels: int = DEFAULT_MAX_PIXELS, quality: int = 90) -> bytes:
    """A box (x, y, width, height in the shown photo's pixels, after EXIF orientation) of an image file as
    JPEG bytes: decoded from the file at its full resolution, then resampled (Lanczos) so that its longer
    side is ``size`` pixels: smaller where the original has more pixels, larger (at most
    :data:`MAX_UPSCALE` times) where it has fewer, so a screen shows it without a blurry browser upscale.
    Raises :class:`DecodeError` for an unreadable file, ValueError for a box outside the photo."""
    x, y, w, h = (float(v) for v in box)
    im = open_rgb(path, min_side=10**9, max_pixels=max_pixels)  # no draft, no shrink: every pixel
    try:
        W, H = im.size
        if w <= 0 or h <= 0 or x >= W or y >= H:
            raise ValueError(f"the box {x:g}, {y:g}, {w:g} x {h:g} is outside the photo ({W} x {H} pixels)")
        part = im.crop((int(max(0, x)), int(max(0, y)), int(min(W, x + w)), int(min(H, y + h))))
        scale = min(size / max(part.size), MAX_UPSCALE)
        if abs(scale - 1.0) > 1e-3:
            part = part.resize((max(1, round(part.width * scale)), max(1, round(part.height * scale))),
                               Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        part.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()
    finally:
        im.close()


def _shrink(im: Image.Image, min_side: int) -> Image.Image:
    """Reduce an image far larger than the views need by an integer factor (box filter, in C) before
    the orientation and colour conversions copy it: a 120-megapixel RGBA PNG otherwise peaks near 3 GB
    per decoding thread. Keeps at least twice ``min_side`` on the short side (resizing reduces so anyway)."""
    factor = min(im.size) // (2 * min_side)
    if factor < 2 or im.mode not in ("RGB", "RGBA", "L", "LA", "CMYK", "I", "F"):
        return im
    small = im.reduce(factor)
    im.close()
    return small


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float32)
        hi = float(a.max()) if a.size else 0.0
        if mode.startswith("I;16") or (mode == "I" and hi > 255):
            a = a / 257.0  # 16-bit range to 8-bit
        elif mode == "F":
            lo = float(a.min())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return im
    return im.convert("RGB")


def cut_views(im: Image.Image, views: Views) -> np.ndarray:
    """The model inputs of one photo: ``(views.count, size, size, 3)`` uint8, view 0 = whole photo."""
    s = views.size
    out = np.empty((views.count, s, s, 3), dtype=np.uint8)
    out[0] = np.asarray(_fit(im, s, views.resize))
    n = views.tiles
    if n:
        w, h = im.size
        tw, th = 2 * w / (n + 1), 2 * h / (n + 1)
        sx, sy = w / (n + 1), h / (n + 1)
        k = 1
        for i in range(n):
            for j in range(n):
                box = (j * sx, i * sy, j * sx + tw, i * sy + th)
                tile = im.resize((s, s), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)
                out[k] = np.asarray(tile)
                k += 1
    return out


def _fit(im: Image.Image, s: int, resize: str) -> Image.Image:
    w, h = im.size
    if resize == "crop":
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return im.resize((s, s), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)
    return im.resize((s, s), Image.Resampling.BILINEAR, reducing_gap=2.0)


def load_views(path: str | os.PathLike | bytes, views: Views, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a file and cut its views; raises :class:`DecodeError` for unreadable files."""
    im = open_rgb(path, min_side=views.min_side, max_pixels=max_pixels)
    try:
        return cut_views(im, views)
    except (OSError, ValueError, MemoryError) as exc:
        raise DecodeError(f"cannot resize image: {exc}") from None


def _size_or_none(path) -> int | None:
    if hasattr(path, "getbuffer"):  # bytes in memory (a pasted or uploaded photo)
        return path.getbuffer().nbytes
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _sniff(path) -> str:
    if hasattr(path, "getvalue"):
        head = path.getvalue()[:512]
    else:
        try:
            with open(path, "rb") as fh:
                head = fh.read(512)
        except OSError as exc:
            return f"cannot read: {exc.strerror}"
    lower = head.lstrip().lower()
    if lower.startswith((b"<!doctype html", b"<html")) or b"<html" in lower[:256]:
        return "looks like an HTML page"
    if lower.startswith(b"<?xml") or b"<svg" in lower[:256]:
        return "looks like XML/SVG, which is not supported"
    return f"unknown header {head[:8].hex()}"
