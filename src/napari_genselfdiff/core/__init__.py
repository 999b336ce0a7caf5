"""torch + numpy: everything that computes, nothing that knows about slides, files of a project,
the command line or napari. The rooms: ``nets`` (the networks), ``pretext`` (the self-supervised
pretext tasks), ``train`` (the training generators), ``eval`` (post-processing and scoring); the
modules they all share (errors, atomic writes, names, progress events, device, precision,
allocator, checkpoints, data, resolution, inference) stay here at the top."""
