"""Train the bundled default models and write them, with model cards, to resources/models/.

    python benchmarks/train_defaults.py [--preset tiny] [--pretrain-steps 400] [--finetune-steps 500]

One diffusion pretraining on all unlabeled data (the GlaS and MoNuSeg training images without
their labels, plus the two unlabeled slides), then one fine-tuning per task on its training split,
scored on the held-out test split (split by image, see common.split_by_image). Weights are stored
as float16 safetensors to keep the package small.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common import (DATASETS, pretrained_enough, REPO, FinetuneConfig, PretrainConfig, Timer, by_area, data_dir, drain,
                    evaluate, finetune, load_dataset, machine, pretrain, unlabeled_pool)
from napari_genselfdiff.core.atomic import atomic_directory, normal_permissions  # noqa: E402  (after common puts src/ on the path)
from napari_genselfdiff.core.nets import receptive  # noqa: E402
from napari_genselfdiff.core.checkpoint import file_sha256, load_model  # noqa: E402
from napari_genselfdiff.core.data import AugmentConfig  # noqa: E402

CARD = """# Default {task} model ({dataset_title})

- **What it does**: {task} segmentation of H&E ({classes}); instances by {post}.
- **Architecture**: GenSelfDiff-HIS U-Net, preset `{preset}` ({params:,} parameters), weights in float16. {arch_pre}
  {invariant}, so tiling cannot change the answer. Effective receptive field
  (99.9 % of the gradient mass): {rf} px in each direction; default tile overlap {halo} px.
- **Resolution**: expects about **{mpp:.2f} microns per pixel** (an image at another pixel size is resampled to it; on a slide the predictor reads the closest pyramid level and resamples it, slide/rescale.py).
- **Pretraining**: {pretraining}
- **Fine-tuning**: {ft_steps} steps x {ft_batch} patches of {ft_patch}x{ft_patch}, loss `{loss}`, on the {dataset} training
  split ({n_train} images, each weighted by its area when sets are mixed; split by image, CoNSeP by tile, seed 2024),
  validated on {n_val} images; learning rate with linear warm-up
  and cosine decay, exponential moving average of the weights ({ema}), stain and colour augmentation{scale_aug}.
- **Test metrics** ({n_test} held-out {dataset} training-set images, never seen in training; measured by
  `benchmarks/train_defaults.py` on {machine}):

{metrics}

  Pixel metrics on the binary mask; HD95 and Hausdorff distances in pixels at the model's resolution.
- **Honest limits**: trained on a 2-core CPU in minutes, not the paper's GPU budget; treat it as a starting
  point to refine on your own slides (Annotate-and-refine), not as a diagnostic tool.
- **Data terms**: GlaS is for research use only (cite Sirinukunwattana et al., Medical Image Analysis 2017);
  MoNuSeg is CC BY-NC-SA 4.0 (Kumar et al., IEEE TMI 2017, 2019); CoNSeP: cite Graham et al., Medical Image
  Analysis 2019 (HoVer-Net). These weights inherit the **non-commercial** terms.
"""

PRE_DIFFUSION = """DDPM (T=1000, quadratic schedule, P2-weighted loss), {pre_steps} steps x {pre_batch} tiles of
  {patch}x{patch} on unlabeled tiles: GlaS + MoNuSeg training images without labels, plus the two unlabeled slides."""
PRE_BACKBONE = """the bundled backbone (`resources/models/pretrained`, {pre_steps} steps of
  `benchmarks/pretrain_backbone.py`: DDPM on the unlabeled training images of every data set and the two slides,
  issue #33), the same network, so every tensor but the head carries over."""
PRE_S2D_BACKBONE = """{pre_steps} steps of `benchmarks/pretrain_backbone.py --preset s2d-backbone` (DDPM, batch 8 x
  128 px, on the unlabeled training images of every data set and the two slides, issue #33; not bundled: the
  bundled backbone `resources/models/pretrained` is the full-resolution `backbone`, which does better with few
  labels), the same network, so every tensor but the head carries over."""
BACKBONES = ("backbone", "s2d-backbone")  # presets pretrained as the segmenter's own network
PRE_SCRATCH = """none. Started from the bundled backbone instead (`preset backbone`, the same 2,000-step
  recipe), the nuclei model was no better on validation (MoNuSeg AJI 0.636 -> 0.625, CoNSeP 0.514 -> 0.508;
  benchmarks/RESULTS.md, "Capacity per CPU-minute"), so it is fine-tuned from random weights. The backbone
  pays with few labels (the few-label protocol of issue #33), not at this model's 325 images."""


def nuclei_augment(a: argparse.Namespace) -> AugmentConfig:
    """The nuclei fine-tuning's augmentation: the defaults with the flags' scale and stain changes."""
    base = AugmentConfig()
    return dataclasses.replace(base, scale=a.scale_aug or base.scale,
                               stain_sigma=base.stain_sigma if a.stain_sigma is None else a.stain_sigma,
                               stain_p=base.stain_p if a.stain_p is None else a.stain_p)


def bundle(src: Path, dst: Path, card: str, metrics: dict, extra: dict | None = None) -> None:
    """Copy a checkpoint without its training state, weights in float16, plus the model card; the
    new folder replaces ``dst`` atomically. Local paths in the training record become repo-relative."""
    dst.parent.mkdir(parents=True, exist_ok=True)  # a trial run's --bundle-to may not exist yet
    with atomic_directory(dst) as tmp:
        weights = {k: (v.half() if v.is_floating_point() else v)
                   for k, v in load_file(str(src / "model.safetensors")).items()}
        save_file(weights, str(tmp / "model.safetensors"))
        normal_permissions(tmp / "model.safetensors")  # safetensors writes 0600
        cfg = json.loads((src / "config.json").read_text())
        cfg["weights_sha256"] = file_sha256(tmp / "model.safetensors")  # of the float16 copy
        cfg["test_metrics"] = metrics
        cfg.update(extra or {})
        cfg["training"].pop("train_images", None)
        info = cfg["training"].get("init_info") or {}
        if info.get("init"):
            p = Path(info["init"])
            info["init"] = str(p.relative_to(REPO)) if p.is_relative_to(REPO) else p.name
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (tmp / "MODEL_CARD.md").write_text(card)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--finetune-steps", type=int, default=500)
    ap.add_argument("--patch", type=int, default=128, help="pretraining and nuclei patch size")
    ap.add_argument("--gland-patch", type=int, default=192,
                    help="gland fine-tuning patch (192 px = 238 um at 1.24 um/px: a whole gland with context)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "_work" / "defaults"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", choices=["glands", "nuclei"], default=None, help="train only this task's model")
    ap.add_argument("--nuclei-data", nargs="+", choices=["monuseg", "consep"], default=["monuseg", "consep"],
                    help="the nuclei model's training sets (default both; images weighted by area)")
    ap.add_argument("--references", default=str(REPO / "benchmarks" / "_work" / "references" / "references.json"),
                    help="the reference arms' results (benchmarks/references.py) quoted in the model cards")
    ap.add_argument("--scratch", nargs="*", choices=["glands", "nuclei"], default=[],
                    help="fine-tune these tasks' models from random weights, without the pretraining")
    ap.add_argument("--pretrain-only", action="store_true", help="stop after the (resumable) pretraining")
    ap.add_argument("--fresh", action="store_true", help="restart fine-tunings instead of resuming them")
    ap.add_argument("--nuclei-steps", type=int, default=None, help="nuclei fine-tuning steps (default --finetune-steps)")
    ap.add_argument("--no-boundary", action="store_true", help="nuclei: two classes, no boundary class")
    ap.add_argument("--boundary-width", type=int, default=1,
                    help="nuclei: pixels of each nucleus's inner boundary class at the model's resolution")
    ap.add_argument("--distance", action="store_true",
                    help="nuclei: also learn each nucleus's distance map, whose peaks are the watershed's markers")
    ap.add_argument("--nuclei-loss", default=None,
                    help="nuclei fine-tuning loss, e.g. 'focal+ssl+dice' (the bundled model's; default: FinetuneConfig's)")
    ap.add_argument("--glands-contour", type=int, default=0,
                    help="glands: a contour class this many pixels deep at the model's resolution (0: none)")
    ap.add_argument("--glands-loss", default=None, help="glands fine-tuning loss (default focal+ssl)")
    ap.add_argument("--ema", type=float, default=0.99, help="EMA decay of the weights (0: off)")
    ap.add_argument("--val-every", type=int, default=200)
    ap.add_argument("--scale-aug", type=float, default=0.0,
                    help="nuclei: draw training patches at a random scale in [1/(1+s), 1+s] (0: off)")
    ap.add_argument("--stain-sigma", type=float, default=None,
                    help="nuclei: HED stain perturbation amplitude (default 0.05; 0.2 is a wide range, after Tellez et al.)")
    ap.add_argument("--stain-p", type=float, default=None, help="nuclei: share of patches perturbed (default 0.5)")
    ap.add_argument("--nuclei-mpp", type=float, default=None,
                    help="microns per pixel the nuclei model learns at (default 0.5; MoNuSeg is stored at 0.25)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="training arithmetic (core/precision.py: auto is bf16 where the CPU computes it natively)")
    ap.add_argument("--bundle-to", default=str(REPO / "resources" / "models"),
                    help="where the bundled models are written (a trial run: somewhere else)")
    a = ap.parse_args()
    root, work = data_dir(), Path(a.work)
    boundary = not a.no_boundary
    datasets = {n: DATASETS[n] for n in ["glas", *a.nuclei_data]}
    if a.nuclei_mpp:
        for n in a.nuclei_data:
            datasets[n] = dataclasses.replace(datasets[n], downsample=a.nuclei_mpp / datasets[n].mpp_native)
    contour = a.glands_contour > 0
    # each task's boundary class, (on, width in px): the targets and the fine-tuning both read it
    heads = {"nuclei": (boundary, a.boundary_width), "glands": (contour, max(1, a.glands_contour))}
    splits = {name: load_dataset(ds, root, boundary=heads[ds.task][0], boundary_width=heads[ds.task][1])
              for name, ds in datasets.items()}
    pre = work / "pretrained"
    tasks = {"glands": ["glas"], "nuclei": list(a.nuclei_data)}
    wanted = [t for t in tasks if not a.only or t == a.only]
    if any(t not in a.scratch for t in wanted) and not pretrained_enough(pre, a.pretrain_steps, a.preset):
        sources = unlabeled_pool(root, {n: s[0] for n, s in splits.items()})
        cfg = PretrainConfig(preset=a.preset, steps=a.pretrain_steps, patch=a.patch, batch=a.batch, lr=1e-3,
                             warmup=20, checkpoint_every=100, precision=a.precision)
        with Timer() as t:
            drain(pretrain(sources, pre, cfg, device=a.device, resume=pre.exists()),
                  lambda e: print(f"pretrain {e.step}/{e.total} loss {e.loss:.4f}", flush=True)
                  if e.step % 50 == 0 else None)
        print(f"pretraining: {t.s:.0f} s")
    if a.pretrain_only:
        return
    for task in wanted:
        names = tasks[task]
        ds = dataclasses.replace(datasets[names[0]], name=" + ".join(names))
        patch = a.gland_patch if ds.task == "glands" else a.patch
        # one model on every dataset of the task: the splits' union (by image / by tile within each),
        # images weighted by area; each test split also scored on its own
        train = [it for n in names for it in (by_area(splits[n][0], patch) if len(names) > 1 else splits[n][0])]
        val = [it for n in names for it in splits[n][1]]
        tests = {n: splits[n][2] for n in names}
        test = [it for n in names for it in splits[n][2]]
        inst = {k: v for n in names for k, v in splits[n][3].items()}
        name = "+".join(names)
        out = work / ds.task
        steps = a.nuclei_steps if ds.task == "nuclei" and a.nuclei_steps else a.finetune_steps
        cfg = FinetuneConfig(task=ds.task, preset=a.preset, steps=steps, patch=patch, batch=a.batch, lr=1e-3,
                             warmup=20, checkpoint_every=100, val_every=a.val_every, mpp=ds.mpp, ema=a.ema,
                             precision=a.precision,
                             boundary=heads[ds.task][0], boundary_width=heads[ds.task][1],
                             distance=a.distance and boundary and ds.task == "nuclei",
                             **({"loss": a.nuclei_loss} if a.nuclei_loss and ds.task == "nuclei" else {}),
                             **({"loss": a.glands_loss} if a.glands_loss and ds.task == "glands" else {}),
                             **({"augment": nuclei_augment(a)} if ds.task == "nuclei" else {}))
        with Timer() as t:
            resume = (out / "training_state.json").is_file() and not a.fresh  # an interrupted run continues
            init = None if task in a.scratch else pre
            drain(finetune(train, out, cfg, init=init, val_items=val, device=a.device, resume=resume, overwrite=True,
                           val_instances={it.name: inst[it.name] for it in val if it.name in inst}),
                  lambda e: print(f"{ds.task} {e.step}/{e.total} loss {e.loss:.4f} {e.metrics or ''}", flush=True)
                  if e.step % 50 == 0 and not e.activity else None)  # not each "validating k/n" of a step
        metrics = evaluate(out, test, inst)
        per_set = {n: evaluate(out, items, inst) for n, items in tests.items()} if len(tests) > 1 else {}
        for n, m in per_set.items():
            print(f"{ds.task}: test {n} {json.dumps(m)}")
        # test-time augmentation: its gain and cost on the same images (not shipped on by default)
        with Timer() as t1:
            evaluate(out, test, inst)
        with Timer() as t8:
            metrics_tta = evaluate(out, test, inst, tta=8)
        tta = {"views": 8, "metrics": metrics_tta, "cost": t8.s / t1.s}
        print(f"{ds.task}: TTA x8 {json.dumps(metrics_tta)} ({tta['cost']:.1f}x the time)")
        model, _ = load_model(out)
        field = receptive.measure(model, [it.image for it in val])  # the validation split, not the test split
        print(f"{ds.task}: effective receptive field {field['receptive_field']['radius']} -> halo {field['halo']} px")
        print(f"{ds.task}: fine-tuning {t.s:.0f} s; test {json.dumps(metrics)}")
        params = sum(v.numel() for v in load_file(str(out / "model.safetensors")).values())
        keys = ["dice", "iou", "hd95"] + (["object_f1", "object_dice", "object_hausdorff"] if ds.task == "glands"
                                         else ["aji", "pq"])
        sets = list(per_set)
        table = "\n".join([f"  | metric | value | with TTA x8 |{''.join(f' {n} |' for n in sets)}",
                           "  |---|---|---|" + "---|" * len(sets)]
                          + [f"  | {k} | {metrics[k]:.3f} | {metrics_tta[k]:.3f} |"
                             + "".join(f" {per_set[n][k]:.3f} |" for n in sets) for k in keys])
        table += (f"\n\n  Test-time augmentation (8 flipped / turned views, `--tta 8`) costs {tta['cost']:.1f}x the time; "
                  "it is off by default.")
        if ds.task == "nuclei":
            table += (f" AJI and PQ over the {int(metrics.get('n_images_with_instances', 0))} test images with true "
                      "instance labels (the others have binary masks only, whose components merge touching nuclei).")
        refs = Path(a.references)
        if refs.is_file():
            from references import table as ref_table
            saved = json.loads(refs.read_text())
            table += "\n\n  Reference arms on the same test split (benchmarks/references.py):\n\n" + "\n".join(
                "  " + line for line in ref_table({k: v for k, v in saved.items()
                                                if any(k.startswith(f"{n}/") for n in names)}).splitlines())
        tuned = json.loads((out / "config.json").read_text()).get("postprocess", {})
        post = ("interiors (gland class) as connected components with hole filling, each grown back over the "
                f"foreground by up to {tuned.get('grow')} px; the contour class keeps touching glands apart"
                if ds.task == "glands" and cfg.boundary
                else "connected components with hole filling" if ds.task == "glands"
                else f"marker-controlled watershed (markers: the maxima, at least {tuned['distance_h']} high, of the "
                     "learned distance map within the mask, flooding its negative)"
                if cfg.distance
                else f"marker-controlled watershed (markers: the h-maxima, height {tuned['split']}, of the mask's "
                     "distance transform weighted by interior minus boundary probability, flooding its negative)"
                if cfg.boundary and tuned.get("split")
                else "marker-controlled watershed (markers: nucleus interiors; flooding the boundary class)"
                if cfg.boundary else "marker-controlled watershed on the distance transform")
        post += f"; thresholds tuned on the validation split and stored in config.json: {tuned}"
        titles = {"glas": "GlaS", "monuseg": "MoNuSeg", "consep": "CoNSeP"}
        card = CARD.format(task=ds.task, dataset_title=" + ".join(titles[n] for n in names),
                           classes={"glands": f"background / gland / gland contour ({cfg.boundary_width} px deep)"
                                    if cfg.boundary else "background / gland",
                                    "nuclei": "background / nucleus / nucleus boundary, and a distance map"
                                    if cfg.distance else "background / nucleus / nucleus boundary" if cfg.boundary
                                    else "background / nucleus"}[ds.task],
                           post=post, preset=a.preset, params=params, mpp=ds.mpp,
                           arch_pre="Trained from random weights;" if init is None else
                           "Pretrained as the same network (per-pixel LayerNorm, no attention), so nothing changes "
                           "between pretext and segmentation;" if a.preset in BACKBONES else
                           "Pretrained with the paper's GroupNorm + attention network;",
                           pretraining=PRE_SCRATCH if init is None else PRE_BACKBONE.format(pre_steps=a.pretrain_steps)
                           if a.preset == "backbone" else PRE_S2D_BACKBONE.format(pre_steps=a.pretrain_steps)
                           if a.preset == "s2d-backbone" else PRE_DIFFUSION.format(
                               pre_steps=a.pretrain_steps, pre_batch=a.batch, patch=a.patch),
                           invariant="its normalisation is per pixel (LayerNorm over channels) and it has no attention"
                           if a.preset in BACKBONES else
                           "the segmentation network is its tile-invariant form (BatchNorm with frozen statistics, "
                           "no attention)",
                           ft_patch=patch, ft_steps=steps,
                           ft_batch=a.batch, loss=cfg.loss, dataset=name, n_train=len({it.name for it in train}), n_val=len(val),
                           n_test=len(test), machine=machine(), metrics=table,
                           scale_aug=(f", patches at a random scale (x{1 / (1 + cfg.augment.scale):.2f} to "
                                      f"x{1 + cfg.augment.scale:.2f})" if cfg.augment.scale else "")
                           + (f", HED stain perturbation +-{cfg.augment.stain_sigma} on {cfg.augment.stain_p:.0%} of the "
                              "patches" if (cfg.augment.stain_sigma, cfg.augment.stain_p) != (0.05, 0.5) else ""),
                           rf=field['receptive_field']['radius']['0.999'], halo=field['halo'],
                           ema=f"decay {a.ema}" if a.ema else "off")
        bundle(out, Path(a.bundle_to) / ds.task, card, metrics, {**field, "test_metrics_per_set": per_set})
        (work / f"{ds.task}_test_metrics.json").write_text(json.dumps({**metrics, "tta": tta, "per_set": per_set,
                                                                       "seconds": t.s}, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
