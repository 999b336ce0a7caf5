"""Annotate-and-refine projects: a folder a pathologist can close, reopen and continue.

The loop: predict on a slide, correct a region by hand, *accept* it (it is stored as training
data and written back into the slide's label store), *refine* the model on every accepted
correction, see the before/after score, repeat on the region the model is least sure about
(:meth:`Project.suggest_regions`). The napari widget and the CLI both drive this package;
nothing here imports Qt or napari.

``store``: the :class:`Project` folder (layout and durability rules in its docstring);
``suggest``: uncertainty sampling of the next region; ``refine``: fine-tuning on the accepted
regions with a before/after score; ``files``: the names, JSON-lines files and region checks
the three share, and ``ProjectFolder``, what ``suggest`` and ``refine`` use of a project (they
take one and do not import ``store``).
"""
from .files import count_objects, read_jsonl
from .store import Project

__all__ = ["Project", "count_objects", "read_jsonl"]
