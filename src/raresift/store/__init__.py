"""Project storage: the SQLite database (all of raresift's SQL), the image registry, label events,
vector files, the caches derived from them, and every file name of the project folder.

:class:`Store` is what the layers above take; :class:`raresift.Project` wraps it for users.
"""

from .store import AddReport, Store

__all__ = ["AddReport", "Store"]
