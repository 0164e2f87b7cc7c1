"""The errors actstore raises on purpose. Every one derives from :class:`ActstoreError` (a
ValueError), carries a whole one-line message, and is printed by the CLIs without a traceback
(``ACTSTORE_DEBUG=1`` shows it). This module is the bottom of the package: it imports nothing."""
from __future__ import annotations

__all__ = ["ActstoreError", "DatasetError", "PromptError", "ModelError", "StoreError",
           "ExtractError", "PeerError"]


class ActstoreError(ValueError):
    """Base class: a user-facing problem whose message says what is wrong and what to do."""


class DatasetError(ActstoreError):
    """A dataset problem: names the file, line and column where it can."""


class PromptError(ActstoreError):
    """Unknown prompt, or a prompt that does not apply to a dataset kind."""


class ModelError(ActstoreError):
    """A model that cannot be found or loaded, or whose layout is not understood."""


class StoreError(ActstoreError):
    """A store that cannot be created, opened, read or written as asked.

    ``replaceable``: the path holds what ``overwrite`` may delete (an activation store of
    another format version, an interrupted creation, an empty directory), so suggesting
    ``--overwrite`` is safe; for anything else it is not.
    """

    def __init__(self, message: str, replaceable: bool = False):
        super().__init__(message)
        self.replaceable = replaceable


class ExtractError(ActstoreError):
    """A user-facing extraction failure (message says what and what to do)."""


class PeerError(Exception):
    """Marker mixed into an error class: this rank stops because of an error another rank met
    and reports itself (e.g. the copy of rank 0's error the others raise). The distributed
    CLIs print it on rank 0 only (:func:`actstore.distributed.cli_call`)."""
