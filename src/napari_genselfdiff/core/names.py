"""The one slugifier: user-visible names (layers, slides, images) -> safe file and id names."""
from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, fallback: str = "item") -> str:
    """``text`` with every run of characters other than ASCII letters, digits, '.', '_' and '-'
    replaced by one '_', leading and trailing '.'/'_' stripped; ``fallback`` when nothing is left.
    The result is a safe file name on every platform (no separators, never hidden, never empty)."""
    return _UNSAFE.sub("_", str(text)).strip("._") or fallback


def is_safe_name(text: object, max_length: int = 200) -> bool:
    """Whether ``text`` is already a :func:`safe_name` (so it can name a file or folder of ours
    as it is: no separators, no '..', never hidden, never empty) of at most ``max_length``."""
    return isinstance(text, str) and 0 < len(text) <= max_length and safe_name(text) == text
