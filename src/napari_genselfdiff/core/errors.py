"""Errors a user can act on. The CLI prints them as one line; the widgets as a notification."""


class GenSelfDiffError(Exception):
    """Base class: a problem with the user's input or environment, with a readable message."""


class DataError(GenSelfDiffError):
    """Unreadable, missing, empty or mismatched data (images, masks, slides)."""


class CheckpointError(GenSelfDiffError):
    """A checkpoint folder that is missing, incomplete or inconsistent."""


class GenSelfDiffWarning(UserWarning):
    """A warning of this package a user should see (the widgets show it as a notification)."""
