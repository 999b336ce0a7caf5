"""The long diffusion pretraining of the one network (unet preset ``backbone``: per-pixel LayerNorm,
no attention, the same network the segmenter fine-tunes), resumable over many sessions.

    nohup python benchmarks/pretrain_backbone.py [--hours 1.2] > benchmarks/_work/backbone/log.txt 2>&1 &
    python benchmarks/pretrain_backbone.py --bundle      # copy the checkpoint to resources/models/pretrained
    python benchmarks/pretrain_backbone.py --preset s2d-backbone   # the one network without a full-resolution level

Data: every unlabeled image in ../shared/data that is not in a benchmark's TEST split (GlaS,
MoNuSeg and CoNSeP training and validation images by image / tile, labels never read) plus the
slides. The test images stay unseen, so the few-label protocol (quality.py) scores on tissue the
pretext never saw either.

The learning rate is held (a schedule of --total steps, far beyond any one run: cosine decay over
100,000 steps is flat at the start), so a run can go on for as long as it keeps improving. Every
--eval-every steps the generator is closed (it saves a checkpoint), then:
- the denoising loss on fixed validation patches at fixed noise levels and fixed noise (the same
  numbers each time: comparable across runs and sessions) is appended to ``curve.jsonl``;
- a grid of DDIM samples is written (``samples_STEP.png``) to look at;
and the run resumes from its checkpoint. Killed at any point, the next start continues from the
last checkpoint (every --checkpoint-every steps).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from common import DATASETS, REPO, PretrainConfig, data_dir, load_dataset, machine, pretrain, unlabeled_pool

from napari_genselfdiff.core.data import to_model_input
from napari_genselfdiff.core.pretext.diffusion import Diffusion, ScheduleConfig

STEM_WORDS = {"conv": "a 7x7 stem at full resolution",
              "s2d": "a space-to-depth stem (no layer at full resolution; the output unfolded by depth-to-space)"}
EVAL_T = (50, 200, 500)  # noise levels of the held-out denoising loss (of the schedule's 1000)


def splits(root: Path) -> dict:
    return {n: load_dataset(DATASETS[n], root) for n in DATASETS}


@torch.no_grad()
def heldout_loss(ckpt: Path, patches: np.ndarray) -> dict:
    """Noise-prediction MSE on fixed patches, fixed noise, at each of EVAL_T."""
    from napari_genselfdiff.core.checkpoint import load_config, load_model

    model, _ = load_model(ckpt)
    model.eval()
    diffusion = Diffusion(ScheduleConfig.from_dict(load_config(ckpt)["schedule"]))
    x0 = torch.from_numpy(to_model_input(patches))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    out = {}
    for t in EVAL_T:
        tt = torch.full((x0.shape[0],), t, dtype=torch.long)
        eps = torch.cat([model(xb, tb) for xb, tb in zip(diffusion.q_sample(x0, tt, noise).split(8), tt.split(8))])
        out[f"mse_t{t}"] = float(((eps - noise) ** 2).mean())
    out["mse_mean"] = float(np.mean([out[f"mse_t{t}"] for t in EVAL_T]))
    return out


def balanced(pool: list) -> list:
    """Each group of sources (each dataset; the slides) drawn equally often: a batch draws sources
    uniformly, and CoNSeP's 432 patches would otherwise outweigh GlaS, MoNuSeg and the slides."""
    groups: dict[str, list] = {}
    for src in pool:
        groups.setdefault(src.name.split("/")[0] if "/" in src.name else "slides", []).append(src)
    most = max(len(g) for g in groups.values())
    out = []
    for g in groups.values():
        out += g * max(1, round(most / len(g)))
    print("pool: " + ", ".join(f"{k} {len(g)}" for k, g in groups.items()) + f" -> {len(out)} balanced", flush=True)
    return out


def fixed_patches(val_items: list, patch: int, n: int = 32) -> np.ndarray:
    rng = np.random.default_rng(12345)
    out = []
    for k in range(n):
        img = val_items[k % len(val_items)].image
        y = int(rng.integers(0, img.shape[0] - patch + 1))
        x = int(rng.integers(0, img.shape[1] - patch + 1))
        out.append(img[y:y + patch, x:x + patch])
    return np.stack(out)


def write_samples(ckpt: Path, path: Path, n: int = 8, size: int = 128) -> None:
    import imageio.v3 as iio

    from napari_genselfdiff.core.pretext.sampling import generate_tiles, tile_grid

    tiles = generate_tiles(ckpt, n, size=size, steps=50, sampler="ddim", seed=0, device="cpu")
    iio.imwrite(path, tile_grid(tiles, cols=n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="backbone", choices=["backbone", "s2d-backbone"],
                    help="the one network to pretrain (s2d-backbone: no level at full resolution)")
    ap.add_argument("--work", default=None, help="default benchmarks/_work/<preset>")
    ap.add_argument("--hours", type=float, default=1.0, help="stop (with a checkpoint) after this long")
    ap.add_argument("--total", type=int, default=100_000, help="length of the (near-flat) learning-rate schedule")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--checkpoint-every", type=int, default=250)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--bundle", action="store_true", help="copy the checkpoint to resources/models/pretrained")
    a = ap.parse_args()
    work = Path(a.work or REPO / "benchmarks" / "_work" / a.preset)
    ckpt = work / "pretrained"
    if a.bundle:
        bundle(ckpt, work)
        return
    root = data_dir()
    sp = splits(root)
    pool = balanced(unlabeled_pool(root, {n: s[0] + s[1] for n, s in sp.items()}))  # training + validation
    val = [it for n, s in sp.items() for it in s[1]]
    patches = fixed_patches(val, a.patch)
    work.mkdir(parents=True, exist_ok=True)
    cfg = PretrainConfig(preset=a.preset, steps=a.total, patch=a.patch, batch=a.batch, lr=a.lr, warmup=100,
                         checkpoint_every=a.checkpoint_every)
    deadline = time.time() + a.hours * 3600
    print(f"{machine()}; {len(pool)} unlabeled sources; until {time.ctime(deadline)}", flush=True)
    while time.time() < deadline:
        start = time.time()
        before = steps_of(ckpt)
        target = (before // a.eval_every + 1) * a.eval_every
        gen = pretrain(pool, ckpt, cfg, device=a.device, resume=ckpt.exists())
        try:
            for e in gen:
                if e.step % 50 == 0 or e.step == before:
                    print(f"step {e.step} loss {e.loss if e.loss is not None else float('nan'):.4f} "
                          f"{e.images_per_s or 0:.1f} img/s {e.message or ''}", flush=True)
                if e.step >= target or time.time() > deadline:
                    break
        finally:
            gen.close()  # saves the checkpoint reached
        saved = steps_of(ckpt)
        if saved == before:
            break
        row = {"step": saved, "seconds": round(time.time() - start, 1), "time": time.strftime("%Y-%m-%d %H:%M"),
               **heldout_loss(ckpt, patches)}
        with open(work / "curve.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        write_samples(ckpt, work / f"samples_{saved:06d}.png")


def steps_of(ckpt: Path) -> int:
    f = ckpt / "config.json"
    return json.loads(f.read_text())["training"]["steps"] if f.is_file() else 0


def bundle(ckpt: Path, work: Path) -> None:
    dest = REPO / "resources" / "models" / "pretrained"
    tmp = dest.with_name(".pretrained.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(ckpt / name, tmp / name)
    cfg = json.loads((ckpt / "config.json").read_text())
    f = work / "curve.jsonl"
    curve = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []
    (tmp / "MODEL_CARD.md").write_text(card(cfg, curve))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    print(f"bundled {dest} (step {cfg['training']['steps']})")


def card(cfg: dict, curve: list[dict]) -> str:
    t = cfg["training"]
    rows = "\n".join(f"| {r['step']} | {r['mse_mean']:.4f} | " + " | ".join(f"{r[f'mse_t{k}']:.4f}" for k in EVAL_T) + " |"
                     for r in curve)
    return f"""# Pretrained backbone (diffusion pretext)

**What it is for**: the starting point of fine-tuning (`genselfdiff finetune --init pretrained`, the
Fine-tune widget's default). It predicts noise, not masks: it is not a segmentation model and is not
offered for prediction.

- **Network**: the `{cfg['model'].get('preset')}` preset (core/nets/unet.py): base {cfg['model']['base']}, levels {cfg['model']['mults']},
  {STEM_WORDS[cfg['model'].get('stem', 'conv')]}, a per-pixel LayerNorm, no attention: the same network the segmenter is, so every
  tensor but the head transfers unchanged and tiling cannot change a fine-tuned model's answer.
- **Pretext**: DDPM noise prediction ({cfg['schedule']}), {t['steps']} steps of batch {t['batch']},
  patch {cfg['patch_size']} px, lr {t['lr']} (held), on unlabeled sources drawn group by group (each dataset and the slides equally often): the GlaS
  (1.24 um/px), MoNuSeg and CoNSeP (0.5 um/px) training and validation images of the benchmarks'
  splits (never their labels, never their test images) and the two slides in ../shared/data.
- **Data terms**: GlaS (Warwick, research use), MoNuSeg (CC BY-NC-SA 4.0), CoNSeP (research use):
  pixels only, no labels; see ../shared/data/README.md.
- **Trained**: {t['time']}, on {t.get('device', 'cpu')}; benchmarks/pretrain_backbone.py, resumed over several runs.

Held-out denoising loss (noise MSE on 32 fixed validation patches, fixed noise; lower is better):

| step | mean | {' | '.join(f't={k}' for k in EVAL_T)} |
|---|---|{'---|' * len(EVAL_T)}
{rows}

What it buys with few labels: benchmarks/RESULTS.md, "Few labels".
"""


if __name__ == "__main__":
    main()
