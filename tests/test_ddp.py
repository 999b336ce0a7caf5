"""Training on several processes (core/train/ddp.py): two gloo processes on the CPU, started by torchrun
as a user would, must end with the same weights, BatchNorm statistics and optimizer state on
both ranks, a checkpoint written by rank 0 only that loads and holds those weights, and a global
batch split between the ranks (each drawing its own patches). Plus the refusals, in-process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from imageio.v3 import imwrite
from safetensors.torch import load_file

from napari_genselfdiff.cli import main
from napari_genselfdiff.core import checkpoint as ckpt
from napari_genselfdiff.core.train import ddp
from napari_genselfdiff.core.errors import DataError, GenSelfDiffError

WORKER = Path(__file__).with_name("_ddp_worker.py")
GENSELFDIFF = Path(sys.executable).with_name("genselfdiff")


def _images(folder: Path, n: int = 3, masks: bool = False) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    img_dir, mask_dir = folder / "images", folder / "masks"
    img_dir.mkdir(parents=True)
    mask_dir.mkdir()
    for i in range(n):
        imwrite(img_dir / f"t{i}.png", rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
        m = np.zeros((96, 96), np.uint8)
        m[10 + 10 * i:50 + 10 * i, 20:70] = 255
        imwrite(mask_dir / f"t{i}.png", m)
    return img_dir, mask_dir


def _torchrun(tmp_path: Path, *argv: str, worker: bool = True) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``torchrun --standalone --nproc-per-node 2`` of ``genselfdiff argv`` (through the recording
    worker, or the installed entry point with ``--no-python``); returns the run and each rank's record."""
    dump = tmp_path / "dump"
    dump.mkdir(exist_ok=True)
    for f in dump.iterdir():
        f.unlink()
    env = {k: v for k, v in os.environ.items() if k not in ddp.ENV}
    env.update(OMP_NUM_THREADS="1", DDP_DUMP=str(dump), PYTHONUNBUFFERED="1")
    target = [str(WORKER)] if worker else ["--no-python", str(GENSELFDIFF)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target, *argv]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    records = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(2)] if worker else []
    return run, records


def _same_on_both_ranks(tmp_path: Path) -> dict:
    r0, r1 = (load_file(str(tmp_path / "dump" / f"rank{r}.safetensors")) for r in range(2))
    assert r0.keys() == r1.keys() and any(k.startswith("adam.") for k in r0)
    for k in r0:
        torch.testing.assert_close(r1[k], r0[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    return r0


def _check_checkpoint(out: Path, rank0: dict, steps: int, batch: int) -> dict:
    model, cfg = ckpt.load_model(out)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, rank0[k], rtol=0, atol=0)
    training = cfg["training"]
    assert training["steps"] == steps and training["batch"] == batch
    assert training["processes"] == 2 and training["backend"] == "gloo"
    return cfg


def _check_records(records: list[dict], steps: int, per_rank: int) -> None:
    assert [r["code"] for r in records] == [0, 0]
    assert records[0]["wrote"] >= 1 and records[1]["wrote"] == 0  # only rank 0 writes
    losses = [r["losses"] for r in records]
    assert len(losses[0]) == steps and np.isfinite(losses[0]).all()
    assert losses[0] == losses[1]  # the loss is averaged over the ranks
    drawn = [[h for n, h in r["batches"] if n == per_rank] for r in records]
    assert len(drawn[0]) == len(drawn[1]) == steps
    assert not set(drawn[0]) & set(drawn[1])  # each rank draws its own patches


def test_pretrain_on_two_processes(tmp_path):
    img_dir, _ = _images(tmp_path / "data")
    run, records = _torchrun(tmp_path, "pretrain", "--images", str(img_dir), "--out", "pre", "--preset", "tiny",
                             "--steps", "2", "--patch", "64", "--batch", "4", "--device", "cpu",
                             "--checkpoint-every", "0")
    _check_records(records, steps=2, per_rank=2)
    _check_checkpoint(tmp_path / "pre", _same_on_both_ranks(tmp_path), steps=2, batch=4)
    assert run.stdout.count("pretrained model:") == 1  # printed by rank 0 only
    assert run.stderr.count("pretraining tiny U-Net") == 1 and "process 1 of 2 (gloo)" in run.stderr


def test_finetune_on_two_processes_then_resume(tmp_path):
    img_dir, mask_dir = _images(tmp_path / "data", n=4)
    args = ["finetune", "--images", str(img_dir), "--masks", str(mask_dir), "--out", "seg", "--scratch",
            "--preset", "tiny", "--patch", "64", "--batch", "2", "--device", "cpu", "--val-fraction", "0.25",
            "--val-every", "0", "--checkpoint-every", "0"]
    _, records = _torchrun(tmp_path, *args, "--steps", "2")
    _check_records(records, steps=2, per_rank=1)
    rank0 = _same_on_both_ranks(tmp_path)  # BatchNorm statistics included
    assert any(k.endswith("running_var") for k in rank0)
    cfg = _check_checkpoint(tmp_path / "seg", rank0, steps=2, batch=2)
    assert cfg["postprocess"]  # tuned on rank 0 while the other waited

    run, _ = _torchrun(tmp_path, *args, "--steps", "3", "--resume", worker=False)  # the real entry point
    assert run.stdout.count("segmentation model:") == 1 and "resumed" in run.stderr
    model, cfg = ckpt.load_model(tmp_path / "seg")
    assert cfg["training"]["steps"] == 3 and cfg["training"]["processes"] == 2
    assert any(not torch.equal(v, rank0[k]) for k, v in model.state_dict().items())  # it trained on


def test_a_batch_that_does_not_divide_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    img_dir, _ = _images(tmp_path / "data", n=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    code = main(["pretrain", "--images", str(img_dir), "--out", str(tmp_path / "pre"), "--preset", "tiny",
                 "--steps", "1", "--patch", "64", "--batch", "3", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "batch 3" in err[0] and "divisible by 2" in err[0] and "use 2 or 4" in err[0]
    assert not (tmp_path / "pre").exists() and not torch.distributed.is_initialized()


def test_torchrun_environment_is_read_and_checked(monkeypatch):
    for name in ddp.ENV:
        monkeypatch.delenv(name, raising=False)
    assert ddp.launched() is None and ddp.is_main_process() and ddp.join("auto", 3) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert ddp.launched() is None  # one process: the single-process path
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert ddp.launched() == (2, 4, 0) and not ddp.is_main_process()
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(GenSelfDiffError, match="RANK=4 is not below WORLD_SIZE=4"):
        ddp.launched()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(GenSelfDiffError, match="RANK='x'"):
        ddp.launched()
    with pytest.raises(DataError, match="use 8$"):
        ddp.local_batch(5, 8)
    with pytest.raises(GenSelfDiffError, match="give --device auto, cuda or cpu"):
        ddp.pick_device("cuda:1", 0)
    assert ddp.pick_device("cpu", 3)[0] == torch.device("cpu")
