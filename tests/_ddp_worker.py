"""One training process of a torchrun DDP run, for ``tests/test_ddp.py`` (not a test itself).

``python -m torch.distributed.run --nproc-per-node 2 tests/_ddp_worker.py pretrain ...`` runs
``genselfdiff pretrain ...`` (``cli.main``) in each process and records in ``$DDP_DUMP`` what the
test compares across ranks: ``rank<r>.safetensors`` (the final weights, BatchNorm statistics and
Adam moments of that rank) and ``rank<r>.json`` (the exit code, the loss of every step, the size
and a hash of every batch drawn, and how many checkpoints this rank wrote).
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from napari_genselfdiff.cli import main
from napari_genselfdiff.core import checkpoint
from napari_genselfdiff.core.train import training

dump, rank = Path(os.environ["DDP_DUMP"]), int(os.environ["RANK"])
seen = {"losses": [], "batches": [], "wrote": 0}
trainers = []

_init, _step, _save = training._Trainer.__init__, training._Trainer.step, checkpoint.save_checkpoint


def _init_recorded(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    trainers.append(self)


def _step_recorded(self, *args, **kwargs):
    loss = _step(self, *args, **kwargs)
    seen["losses"].append(loss)
    return loss


def _save_recorded(*args, **kwargs):
    seen["wrote"] += 1
    return _save(*args, **kwargs)


def _sampler(real):
    def sample(*args, **kwargs):
        out = real(*args, **kwargs)
        imgs = out[0] if isinstance(out, tuple) else out
        seen["batches"].append([len(imgs), hashlib.sha1(np.ascontiguousarray(imgs).tobytes()).hexdigest()])
        return out
    return sample


training._Trainer.__init__, training._Trainer.step = _init_recorded, _step_recorded
checkpoint.save_checkpoint = _save_recorded
for name in ("sample_unlabeled_batch", "sample_labeled_batch"):
    setattr(training, name, _sampler(getattr(training, name)))

code = main(sys.argv[1:])
if trainers:
    t = trainers[-1]
    tensors = {k: v.detach().cpu().contiguous() for k, v in t.model.state_dict().items()}
    for i, p in enumerate(t.model.parameters()):
        for k, v in t.opt.state.get(p, {}).items():
            if k != "step":
                tensors[f"adam.{i}.{k}"] = v.detach().cpu().contiguous()
    save_file(tensors, str(dump / f"rank{rank}.safetensors"))
(dump / f"rank{rank}.json").write_text(json.dumps({"code": code, **seen}))
sys.exit(code)
