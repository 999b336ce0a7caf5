"""From class probabilities to objects, and scoring them: instances of one image and the options
each task takes (``postprocess``), those options tuned on the validation images (``tuning``), the
segmentation metrics (``metrics``), a model scored on labeled images (``evaluation``) and the check
that a glands result looks like glandular tissue (``glandular``)."""
