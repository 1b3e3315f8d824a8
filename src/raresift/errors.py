"""Exceptions raised by raresift.

Every error the library raises on purpose derives from :class:`RaresiftError`; the CLI turns
those into a one-line message and a non-zero exit code, the web API into one JSON error shape.

::

    RaresiftError
     +-- ProjectError
     |    +-- NotAProjectError        the folder holds no raresift project
     |    +-- ProjectExistsError      `init` on a folder that already holds another project
     |    +-- SchemaTooNewError       the project was written by a newer raresift
     +-- InputError                   bad user input (folder, CSV, .npy, option value)
     |    +-- LabelImportError        a labels CSV with a bad line (nothing imported)
     +-- EmbeddingError               the model cannot be loaded or does not fit the project
     +-- NotReadyError                a step needs an earlier one (e.g. `next` before `embed`)
     +-- MissingExtraError            an optional part is not installed; the message names the extra
"""

from __future__ import annotations

__all__ = [
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


class RaresiftError(Exception):
    """Base class of every error raresift raises on purpose."""


class ProjectError(RaresiftError):
    """Something is wrong with the project folder itself."""


class NotAProjectError(ProjectError):
    """The folder is not a raresift project."""


class ProjectExistsError(ProjectError):
    """A project already exists where a new one was asked for."""


class SchemaTooNewError(ProjectError):
    """The project's database was written by a newer version of raresift."""


class InputError(RaresiftError):
    """The user gave input that cannot be used; the message says what was expected."""


class LabelImportError(InputError):
    """A labels file has a bad line; nothing from it was imported."""


class EmbeddingError(RaresiftError):
    """The embedding model cannot be loaded or does not match the project."""


class NotReadyError(RaresiftError):
    """An operation needs a step that has not been done yet."""


class MissingExtraError(RaresiftError):
    """An optional dependency is not installed; the message names the extra, e.g. ``raresift[notebook]``."""

    def __init__(self, what: str, extra: str):
        super().__init__(f"{what} needs the optional extra: pip install 'raresift[{extra}]'")
        self.extra = extra
