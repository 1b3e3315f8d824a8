"""Learning: features, the head, query strategies, cold start, the session (one learner) and the loop.

``raresift.learn.loop`` works on a project's store (``next_batch``, ``pending``, ``scores``); the
other modules work on numpy arrays (``session``, ``strategies``, ``coldstart``, ``head``, ``features``).
The head imports scikit-learn (seconds, with SciPy); it is imported on first use, so a round reads
the database while scikit-learn loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .strategies import DEFAULT_STRATEGY, STRATEGIES, get_strategy

if TYPE_CHECKING:
    from .head import RareHead

__all__ = ["DEFAULT_STRATEGY", "STRATEGIES", "RareHead", "get_strategy"]


def __getattr__(name: str) -> Any:
    if name == "RareHead":
        from .head import RareHead

        return RareHead
    raise AttributeError(name)
