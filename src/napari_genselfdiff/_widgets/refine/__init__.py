"""The "Annotate and refine" dock widget: the annotate-and-refine loop on a project folder (see
:mod:`napari_genselfdiff.project`), one box per step:

* :mod:`.project_box` -- create / open a project, set its model, its status;
* :mod:`.annotate` -- *Edit region* (the region in view as an editable full-resolution Labels
  layer, prefilled) and *Accept region* (stored atomically in the project);
* :mod:`.suggest` -- *Suggest next region* (ranked by the model's uncertainty) and Skip;
* :mod:`.refining` -- *Refine model* on every accepted region, Dice before -> after, the new
  model handed to the Predict widget;
* :mod:`.geojson_box` -- QuPath GeoJSON import (Labels / Shapes) and export.

:mod:`.context` holds what they share; :mod:`.widget` stacks and wires them.
"""
from .annotate import ACCEPTED, EDIT_KEY, MAX_EDIT
from .geojson_box import PROJECT_LABELS
from .suggest import SUGGESTION_LAYER, Suggestions
from .widget import RefineWidget

__all__ = ["ACCEPTED", "EDIT_KEY", "MAX_EDIT", "PROJECT_LABELS", "SUGGESTION_LAYER", "RefineWidget", "Suggestions"]
