"""The networks: the time-conditioned U-Net, its presets (``backbone``: the one network from pretext
to segmentation) and the folded copy inference runs (``unet``), and how far a trained network looks
and the halo a tiler needs (``receptive``)."""
