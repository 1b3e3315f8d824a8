"""raresift: find the images of a rare class in a large unlabeled image collection.

The Python entry point is :class:`Project`::

    from raresift import Project
    project = Project.create("insects", images="photos/")      # Project("insects") opens one
    project.add_images()
    project.embed()
    batch = project.next(25, query="insect or spider")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
    EmbeddingError,
    InputError,
    LabelImportError,
    MissingExtraError,
    NotAProjectError,
    NotReadyError,
    ProjectError,
    ProjectExistsError,
    RaresiftError,
    SchemaTooNewError,
)
from .project import Project

__all__ = [
    "__version__",
    "Project",
    "RaresiftError",
    "ProjectError",
    "NotAProjectError",
    "ProjectExistsError",
    "SchemaTooNewError",
    "InputError",
    "LabelImportError",
    "EmbeddingError",
    "NotReadyError",
    "MissingExtraError",
]
