"""The one table of raresift's settings: name, default and help.

The command line (``argparse`` defaults and help texts), the web page's defaults, the notebook
labeller, :func:`raresift.simulate.simulate` and the learning loop all read their defaults here,
so a default is changed in one place. ``tests/test_settings.py`` checks that the README states
the same defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InputError

__all__ = ["POOLS", "SETTINGS", "Setting", "check_pool", "default", "help_text"]


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    # project
    Setting("test_fraction", 0.4, "share of photos held out as the test set (as in the reference write-up)"),
    Setting("seed", 0, "seed of the test split draw"),
    # embedding
    Setting("model", "efficientnet-lite2", "embedding model (260 px, ranks best)"),
    Setting("tiles", 3, "N x N grid of overlapping tiles besides the whole photo (measured best for small objects)"),
    Setting("resize", "crop", "whole-photo view: centre crop or squeeze"),
    Setting("layout", "compact", "how tiled photos' vectors are kept: compact (the whole photo, the tiles' mean "
            "and max, which tile each max value came from, each view's top ImageNet classes: 12,240 bytes a photo at "
            "1280-d with 3 x 3 tiles; the same features and evidence) or views (every view and logit: 45,600 bytes)"),
    Setting("embed_batch", 32, "photos per model call and per saved batch"),
    # learning loop
    Setting("batch", 25, "photos per labelling round (next, the label page, the notebook, simulate)"),
    Setting("grid_page", 16, "photos on one page of the grid (a page size, not a round size)"),
    Setting("evaluate_n", 50, "photos `next --evaluate` queues"),
    Setting("strategy", "default", "strategy of a round: 70% top, 20% uncertain, 10% random, no near-duplicates"),
    Setting("k", 50, "K of precision@K"),
    Setting("head_c", 10.0, "inverse regularisation strength of the head (logistic regression)"),
    Setting("unlabeled_weight", 0.05, "weight of one unlabelled photo as a weak negative, relative to a label"),
    Setting("max_unlabeled", 2000, "unlabelled photos drawn as weak negatives per fit"),
    Setting("prior_weight", 0.5, "weight of the cold-start prior at 0 labels; fades as 50 / (50 + labels)"),
    Setting("pool", "auto", "photos a round scores: full (all), knn (the k nearest neighbours of the labelled "
            "photos plus a random sample: SEALS), auto (knn from pool_auto_min embedded view vectors on: a photo counts "
            "as its views)"),
    Setting("knn_k", 100, "neighbours of each labelled photo in a knn pool"),
    Setting("knn_random", 1000, "random unlabelled photos added to a knn pool (what the neighbours miss)"),
    Setting("pool_auto_min", 2_000_000, "embedded view vectors (photos x views: whole photo + tiles) from which "
            "--pool auto scores a knn pool (measured: a full scan round is 1.1-1.3 s at 10^6 one-view photos, so "
            "about 3 s here)"),
    Setting("index_sq8_max_gb", 2.0, "largest 8-bit index kind='auto' builds (photos x dim bytes); above it the "
            "index stores 64-byte product-quantised codes (ivf-pq) and re-ranks their neighbours exactly"),
    Setting("pq_refine", 4, "an ivf-pq search fetches this many times the asked neighbours, then ranks them by "
            "the exact vectors"),
    # simulate
    Setting("budget", 200, "labels per simulated session"),
    Setting("repeats", 10, "simulated sessions, each on its own split"),
    # web
    Setting("port", 8765, "port of the labelling web app"),
)}


def default(name: str) -> Any:
    """The default of setting ``name``."""
    return SETTINGS[name].default


def help_text(name: str) -> str:
    """The help of setting ``name`` with its default, for ``--help``."""
    s = SETTINGS[name]
    return f"{s.help} (default {s.default})".replace("%", "%%")


POOLS = ("auto", "full", "knn")  # the values of the setting "pool" (`next --pool`, `simulate --pool`)


def check_pool(pool: str) -> None:
    """One line for a pool that is not one of :data:`POOLS`."""
    if pool not in POOLS:
        raise InputError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
