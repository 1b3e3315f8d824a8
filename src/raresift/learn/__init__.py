"""Learning: features, the head, query strategies, cold start, and the labelling loop.

``raresift.learn.loop`` works on a project (``next_batch``, ``pending``, ``scores``); the other
modules are pure functions on numpy arrays (``strategies``, ``coldstart``, ``head``, ``model``).
"""

from __future__ import annotations

from .head import RareHead
from .strategies import DEFAULT_STRATEGY, STRATEGIES, get_strategy

__all__ = ["DEFAULT_STRATEGY", "STRATEGIES", "RareHead", "get_strategy"]
