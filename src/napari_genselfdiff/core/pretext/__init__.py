"""The self-supervised pretext tasks, without their training loops: the diffusion pretext (noise
schedules, the P2-weighted loss, samplers: ``diffusion``) and tiles sampled from a diffusion
checkpoint as its sanity check (``sampling``); the nucleus-aware pretext's pseudo masks drawn from
nucleus statistics measured on unlabeled tiles (``pseudomask``) and its mask <-> H&E translation
networks and losses (``translation``). The generators that train them are in ``core.train``
(``training.pretrain``, ``pretext_nucleus``)."""
