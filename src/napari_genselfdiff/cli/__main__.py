"""``python -m napari_genselfdiff.cli``: the same as the ``genselfdiff`` command."""
import sys

from . import main

sys.exit(main())
