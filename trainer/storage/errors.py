"""The storage layer's exceptions: every backend raises these, so callers catch one family."""

from __future__ import annotations


class StorageError(OSError):
    """An IO failure at a URL; the message names the URL and the problem, never a credential."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object, file or bucket does not exist (also catchable as FileNotFoundError)."""


class EndpointUnavailableError(StorageError):
    """A storage endpoint stopped answering: callers stop the step instead of failing object by object."""
