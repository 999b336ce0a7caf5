"""The networks: the time-conditioned U-Net, its presets and the BatchNorm-folded copy inference
runs (``unet``), how far a trained network looks and the halo a tiler needs (``receptive``), and
the segmentation network a fine-tuning starts from, pretrained weights transferred and the
backbone optionally frozen (``segmenter``)."""
