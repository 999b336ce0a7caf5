"""The one task -> QuPath table: class name, object type and colour of each instance task.

Glands are few and large: QuPath *annotations* (editable). Nuclei are many and small: QuPath
*detections* (light-weight, not editable one by one). Any other name is an annotation of its own
class, drawn cyan.
"""
from __future__ import annotations

CLASS_NAMES = {"glands": "Gland", "nuclei": "Nucleus"}
COLOURS = {"glands": (0, 200, 0), "nuclei": (255, 220, 0)}  # nuclei: yellow reads on haematoxylin, blue did not
OBJECT_TYPES = {"glands": "annotation", "nuclei": "detection"}

#: The object types QuPath knows (GeoJSON ``objectType``).
OBJECT_KINDS = ("annotation", "detection")
DEFAULT_COLOUR = (0, 220, 255)
DEFAULT_OBJECT_TYPE = "annotation"


def class_name(task: str | None, fallback: str = "Object") -> str:
    """QuPath class of a task ('glands' -> 'Gland'); other names are their own class."""
    return CLASS_NAMES.get(task or "", task or fallback)


def object_type(task: str | None) -> str:
    """'annotation' or 'detection' for a task (annotation when unknown)."""
    return OBJECT_TYPES.get(task or "", DEFAULT_OBJECT_TYPE)


def colour(task: str | None) -> tuple[int, int, int]:
    """RGB display colour of a task (cyan when unknown)."""
    return COLOURS.get(task or "", DEFAULT_COLOUR)


def colour_of_class(name: str) -> tuple[int, int, int]:
    """RGB colour of a QuPath class name ('Nucleus' -> the nuclei colour; cyan when unknown)."""
    for task, cls in CLASS_NAMES.items():
        if cls.lower() == name.lower():
            return COLOURS[task]
    return DEFAULT_COLOUR
