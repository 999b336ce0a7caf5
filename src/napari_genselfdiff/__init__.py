"""napari-genselfdiff: GenSelfDiff-HIS (diffusion self-supervised pretraining + few-label
segmentation) for glands and nuclei in H&E slides, as a library, a CLI and a napari plugin.

Importing the package imports neither Qt nor napari: the core (``core/``, ``slide/``,
``formats/``) is plain numpy + torch.
"""

__version__ = "0.1.0"
