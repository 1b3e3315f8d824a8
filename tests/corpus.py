"""A corpus of odd-but-valid and broken image files, written by the test suite (issue 2, point 2).

``make_corpus(folder)`` writes every file and returns a :class:`Corpus` that says which ids
(relative paths, as the registry shows them) must end up embedded and which must end up as
recorded errors. The files are generated, never downloaded, and small on disk: the
decompression bomb is a real 40000 x 40000 PNG (1-bit greyscale, 1.6 gigapixels, 1.6 GB once
decoded by Pillow) that is about 200 KB on disk.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import make_photo

# A file name that is not valid UTF-8 (Latin-1 "café"); the registry shows it with a \xNN escape.
NON_UTF8_NAME = b"caf\xe9.jpg"
NON_UTF8_ID = NON_UTF8_NAME.decode("utf-8", errors="backslashreplace")

BOMB_SIDE = 40_000


@dataclass
class Corpus:
    """What was written: ids that must embed, ids that must be reported as errors, and why each exists."""

    root: Path
    valid: dict[str, str] = field(default_factory=dict)  # id -> what it exercises
    broken: dict[str, str] = field(default_factory=dict)  # id -> what is wrong with it

    @property
    def tried(self) -> int:
        return len(self.valid) + len(self.broken)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png_bomb(path: Path, side: int = BOMB_SIDE) -> None:
    """A valid 1-bit greyscale PNG of ``side`` x ``side`` black pixels, its data streamed through zlib.

    Every row is the filter byte 0 plus zeros, so zlib shrinks it about 1000-fold.
    """
    comp = zlib.compressobj(9)
    row = bytes((side + 7) // 8 + 1)
    rows_per_chunk = max(1, (8 << 20) // len(row))
    parts = []
    block = row * rows_per_chunk
    full, rest = divmod(side, rows_per_chunk)
    for _ in range(full):
        parts.append(comp.compress(block))
    parts.append(comp.compress(row * rest))
    parts.append(comp.flush())
    idat = b"".join(parts)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)))
        fh.write(_png_chunk(b"IDAT", idat))
        fh.write(_png_chunk(b"IEND", b""))


_BOMB_CACHE: dict[int, bytes] = {}


def _bomb_bytes(side: int) -> bytes:
    # Built once per test session (about a second), then copied.
    if side not in _BOMB_CACHE:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "bomb.png"
            write_png_bomb(p, side)
            _BOMB_CACHE[side] = p.read_bytes()
    return _BOMB_CACHE[side]


def make_corpus(folder: Path, *, seed: int = 7, bomb: bool = True) -> Corpus:
    """Write the odd-but-valid and the broken files under ``folder/odd`` and ``folder/broken``."""
    rng = np.random.default_rng(seed)
    corpus = Corpus(root=folder)
    odd, broken = folder / "odd", folder / "broken"
    odd.mkdir(parents=True, exist_ok=True)
    broken.mkdir(parents=True, exist_ok=True)

    def photo(size=(160, 120)) -> Image.Image:
        return make_photo(rng, rare=False, size=size)

    def valid(name: str, why: str) -> Path:
        corpus.valid[f"odd/{name}"] = why
        return odd / name

    photo().convert("CMYK").save(valid("cmyk.jpg", "CMYK JPEG"), quality=90)
    photo().convert("L").save(valid("grey.jpg", "greyscale JPEG"))
    pal = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0
    pal.save(valid("palette_transparent.png", "palette PNG with a transparent colour"), transparency=0)
    grey16 = (np.linspace(0, 65535, 120 * 160).reshape(120, 160)).astype(np.uint16)
    Image.fromarray(grey16).save(valid("grey16.png", "16-bit greyscale PNG"))
    rgba = photo().convert("RGBA")
    alpha = np.zeros((120, 160), np.uint8)
    alpha[20:100, 30:130] = 255
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(valid("rgba.png", "RGBA PNG with transparent edges"))
    photo().save(valid("photo.webp", "WebP"), quality=80)
    photo().save(valid("photo.tiff", "TIFF"))
    photo().save(valid("photo.bmp", "BMP"))
    photo().save(valid("upper.JPEG", "upper-case extension"))
    Image.new("RGB", (1, 1), (200, 30, 30)).save(valid("one_pixel.png", "1 x 1 pixel"))
    photo(size=(4000, 12)).save(valid("wide_4000x12.png", "4000 x 12 pixels"))
    frames = [photo(size=(80, 60)).convert("P", palette=Image.Palette.ADAPTIVE) for _ in range(3)]
    frames[0].save(valid("animated.gif", "animated GIF, 3 frames"), save_all=True, append_images=frames[1:],
                   duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show
    photo().save(valid("exif_rotated.jpg", "EXIF orientation 6"), exif=exif)
    dup = photo()
    dup.save(valid("duplicate_a.jpg", "duplicate content (a)"), quality=85)
    (odd / "duplicate_b.jpg").write_bytes((odd / "duplicate_a.jpg").read_bytes())
    corpus.valid["odd/duplicate_b.jpg"] = "duplicate content (b), same bytes as (a)"
    with open(os.path.join(os.fsencode(odd), NON_UTF8_NAME), "wb") as fh:
        buf = _encode(photo(), "JPEG")
        fh.write(buf)
    corpus.valid[f"odd/{NON_UTF8_ID}"] = "file name that is not UTF-8"

    def bad(name: str, why: str) -> Path:
        corpus.broken[f"broken/{name}"] = why
        return broken / name

    bad("empty.jpg", "0 bytes").write_bytes(b"")
    bad("random.jpg", "random bytes").write_bytes(rng.bytes(4096))
    bad("page.png", "an HTML page named .png").write_bytes(
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>gone</body></html>\n"
    )
    bad("cut.jpg", "a JPEG cut after 200 bytes").write_bytes(_encode(photo(), "JPEG")[:200])
    os.symlink(broken / "no-such-target.jpg", bad("dangling_link.jpg", "a broken symbolic link"))
    if bomb:
        bad("bomb.png", f"a {BOMB_SIDE} x {BOMB_SIDE} PNG decompression bomb").write_bytes(_bomb_bytes(BOMB_SIDE))
    return corpus


def _encode(im: Image.Image, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()
