"""Errors a user can act on. The CLI prints them as one line; the widgets as a notification."""


class GenSelfDiffError(Exception):
    """Base class: a problem with the user's input or environment, with a readable message."""


class DataError(GenSelfDiffError):
    """Unreadable, missing, empty or mismatched data (images, masks, slides)."""


class CheckpointError(GenSelfDiffError):
    """A checkpoint folder that is missing, incomplete or inconsistent."""


def describe_json_error(e: Exception) -> str:
    """Why a JSON text could not be read, in words (a RecursionError's own text names Python's
    recursion limit, not the file's problem)."""
    return "nested too deeply" if isinstance(e, RecursionError) else str(e)


class GenSelfDiffWarning(UserWarning):
    """A warning of this package a user should see (the widgets show it as a notification)."""
