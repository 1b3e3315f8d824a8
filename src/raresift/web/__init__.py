"""Local labelling web app: ``create_app(project_path)`` (FastAPI), started by ``raresift serve``.

What the page and the notebook labeller share (queue, labels, undo, rounds, estimates) is the library
module :mod:`raresift.labelling`, which does not import the web framework.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":  # imported on first use: the notebook labeller needs no web framework
        from .app import create_app

        return create_app
    raise AttributeError(name)
