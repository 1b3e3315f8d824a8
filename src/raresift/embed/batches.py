"""One batch of photos through decoding and the model: shared by the local engine and the Ray actors."""

from __future__ import annotations

import os

import numpy as np

from .decode import DecodeError, Views, load_views

__all__ = ["MODEL_CHUNK", "decode_item", "model_chunk", "run_model"]

MODEL_CHUNK = 64  # most inputs per model call


def model_chunk(batch_size: int) -> int:
    """Inputs per model call for batches of ``batch_size`` photos: the same in every engine, so the
    local engine and the Ray actors group the same inputs into each call and compute the same vectors."""
    return max(batch_size, MODEL_CHUNK)


def run_model(embedder, stack: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the model over ``stack`` in chunks: with tiles a batch holds many views, and one huge call
    makes ONNX Runtime's memory arena grow by gigabytes for no gain in speed."""
    if len(stack) <= chunk:
        return embedder(stack)
    parts = [embedder(stack[i : i + chunk]) for i in range(0, len(stack), chunk)]
    feats = np.concatenate([f for f, _ in parts])
    logits = None if parts[0][1] is None else np.concatenate([lg for _, lg in parts])
    return feats, logits


def decode_item(root: bytes, raw: bytes, views: Views, max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    """``(views array, None)`` for a readable file under ``root``, else ``(None, reason)``; never raises."""
    try:
        return load_views(os.path.join(root, raw), views, max_pixels=max_pixels), None
    except DecodeError as exc:
        return None, str(exc)
    except Exception as exc:  # never let one odd file stop the run
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
