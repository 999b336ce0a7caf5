"""Where a training run writes: the output folder's rules, shared by pretraining (both pretexts)
and fine-tuning. A run resumes only a checkpoint of ours, replaces only one of ours (``--force``),
never writes into its inputs or the bundled models, and says when ``--resume`` found nothing."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .. import checkpoint as ckpt
from ..atomic import refuse_inputs
from ..errors import CheckpointError


def start_note(start: int, resume: bool, out: Path) -> str:
    """The end of a run's first message: the step a resumed run starts at, or that ``--resume``
    found nothing saved yet (the run starts from step 0, as a script resuming in a loop expects)."""
    return f"; resumed at step {start}" if start else f"; nothing saved at {out} yet: a new run" if resume else ""


def prepare_out(out: Path, resume: bool, overwrite: bool, stage: str, inputs: Sequence = ()) -> dict | None:
    """The training state to resume from, or None for a fresh run; refuses to clobber work.

    Saving replaces the whole folder at ``out``, so an existing one is resumed only when it holds
    nothing but our files, and ``overwrite`` replaces only a checkpoint of ours
    (:func:`..checkpoint.is_our_checkpoint`): a user's folder, or a checkpoint they added their
    own files to, is never replaced; nor an input (``inputs``: images, starting model) or a bundled model."""
    refuse_inputs(out, [*inputs, ckpt.bundled_models_dir()], CheckpointError)
    out = ckpt.resolve(out)
    if not os.path.lexists(out):
        return None
    if (resume or overwrite) and out.is_dir():
        foreign = ckpt.foreign_files(out)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise CheckpointError(f"{out}: holds {foreign[0]!r}{more}, which is not part of a genselfdiff "
                                  "checkpoint; saving would replace the whole folder, so it is never "
                                  "written: choose another output folder (or move those files out)")
    if resume:
        state = ckpt.load_training_state(out)
        if state is None:
            raise CheckpointError(f"{out}: has no training state to resume from")
        if state.get("run", {}).get("stage") != stage:
            raise CheckpointError(f"{out}: is a {state.get('run', {}).get('stage')} run, cannot resume it as {stage}")
        return state
    if overwrite:
        if not ckpt.is_our_checkpoint(out):
            raise CheckpointError(f"{out}: exists and is not a checkpoint written by genselfdiff; it is never "
                                  "replaced (--force replaces only a checkpoint of ours): choose another "
                                  "output folder")
        return None
    raise CheckpointError(f"{out}: already exists; resume it (--resume), replace it (--force, only a "
                          "checkpoint of ours) or choose another output folder")
