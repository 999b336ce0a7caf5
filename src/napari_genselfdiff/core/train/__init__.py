"""The training generators, which yield ``Progress`` events and save on cancel: pretraining and
fine-tuning (``training``), the network a fine-tuning starts from, pretrained weights transferred
and the backbone optionally frozen (``segmenter``), the nucleus-aware pretraining on the same loop
(``pretext_nucleus``), the same generators on several processes under ``torchrun`` (``ddp``), the
segmentation losses (``losses``) and the fixed validation crops fine-tuning scores itself on
(``validation``)."""
