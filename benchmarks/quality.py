"""What self-supervised pretraining buys: the same network fine-tuned from scratch, from diffusion
pretraining and from nucleus-aware pretraining (core.train.pretext_nucleus), at several label fractions
and seeds, on GlaS (glands) and MoNuSeg (nuclei).

    python benchmarks/quality.py --budget smoke|cpu|gpu [--datasets glas monuseg] [--arms scratch diffusion nucleus]

Both pretexts get the same budget: the same steps, patch size, batch and unlabeled pool (a
nucleus-aware step costs more: the seconds of each pretraining are in the report). The paired
differences are each pretext minus scratch, same seed; the nucleus-aware sample grid (pseudo
masks, generated H&E, real tiles and their predicted masks) is written next to the table.

Splits are by image (benchmarks/common.split_by_image): label fractions subsample the training
split's images; pretraining uses the training images of both datasets WITHOUT labels plus the
unlabeled slides; test images are never seen. Results: a Markdown table and a PNG plot in
benchmarks/_work/quality/, to be copied into benchmarks/RESULTS.md.

Budgets (what each one is for):
  smoke  a few minutes on a 2-core CPU: proves the pipeline, numbers are not meaningful
  cpu    about 1.5 hours on a 2-core CPU: tiny preset, 3 seeds x 3 fractions, short schedules (800
         pretraining steps, about 12 min, can be shared with train_defaults.py via --pretrained;
         36 fine-tunings of 150 steps, about 2.5 min each; --datasets / --fractions / --seeds narrow it).
         The nucleus arm adds its own 800 steps (a step costs several diffusion steps: about an hour
         estimated from the smoke run, not measured at this budget) and 18 fine-tunings: about 2.5 hours
         in all with the three arms; --arms scratch diffusion keeps the old two
  gpu    one GPU in about 10 minutes (benchmarks/gpu_run.sh): small preset, patch 256, 3 seeds x 2 fractions
  paper  the paper's settings: paper preset, patch 256, batch 8, 3 seeds, long schedules (a GPU-day)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import (DATASETS, pretrained_enough, REPO, FinetuneConfig, PretrainConfig, Timer, data_dir, drain, evaluate, finetune,
                    load_dataset, machine, pretrain, unlabeled_pool)

from napari_genselfdiff.core.train.pretext_nucleus import NucleusPretrainConfig, nucleus_samples, pretrain_nucleus

ARMS = ("scratch", "diffusion", "nucleus", "backbone", "frozen", "frozen_t")
PRETEXT_ARMS = ("diffusion", "nucleus", "backbone", "frozen", "frozen_t")  # each compared with scratch
# backbone: the one network (unet preset "backbone", per-pixel LayerNorm) fine-tuned whole from the long
# pretraining (benchmarks/pretrain_backbone.py, --backbone); frozen: the same start, only the head trained
# (FinetuneConfig.freeze_backbone); frozen_t: the same, the network told it sees diffusion timestep
# --feature-t (UNetConfig.feature_t, after Baranchuk et al.: a denoiser's features at a small noise
# level). Compare them with a scratch arm of the same network: --preset backbone.

BUDGETS = {
    "smoke": dict(preset="tiny", patch=64, batch=4, pre_steps=30, ft_steps=30, fractions=(0.3, 1.0), seeds=(0,)),
    "cpu": dict(preset="tiny", patch=128, batch=8, pre_steps=800, ft_steps=150, fractions=(0.1, 0.3, 1.0), seeds=(0, 1, 2)),
    # one GPU, inside the 15 minutes benchmarks/gpu_run.sh is given (with the defaults' training before it)
    "gpu": dict(preset="small", patch=256, batch=16, pre_steps=3000, ft_steps=400, fractions=(0.1, 1.0),
                seeds=(0, 1, 2)),
    # the paper's schedules, for a GPU that is yours for a day
    "paper": dict(preset="paper", patch=256, batch=8, pre_steps=50_000, ft_steps=10_000, fractions=(0.1, 0.3, 1.0),
                  seeds=(0, 1, 2)),
}
KEYS = {"glands": ["dice", "iou", "hd95", "object_f1", "object_dice", "object_hausdorff"],
        "nuclei": ["dice", "iou", "hd95", "aji", "pq"]}
MAIN = {"glands": ["dice", "object_f1"], "nuclei": ["dice", "aji", "pq"]}  # the paired differences reported


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=list(BUDGETS), default="smoke")
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default=None)
    ap.add_argument("--pretrained", default=None, help="reuse this pretraining checkpoint (e.g. the defaults')")
    ap.add_argument("--fractions", type=float, nargs="+", default=None, help="override the budget's label fractions")
    ap.add_argument("--ft-steps", type=int, default=None, help="override the budget's fine-tuning steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="override the budget's seeds")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                    help="which arms to fine-tune (default all three: scratch, diffusion, nucleus)")
    ap.add_argument("--pre-steps", type=int, default=None,
                    help="override the budget's pretraining steps (a shorter pretraining in the work folder is "
                         "continued to this many)")
    ap.add_argument("--nucleus-steps", type=int, default=None,
                    help="the nucleus-aware pretext's steps (default: the same as --pre-steps; a step of it costs "
                         "several diffusion steps, so a fixed CPU budget may give it fewer)")
    ap.add_argument("--images", type=int, nargs="+", default=None,
                    help="the few-label protocol: this many labeled training images (e.g. 1 3 10) instead of fractions")
    ap.add_argument("--preset", default=None, help="override the budget's preset (the scratch arm's network)")
    ap.add_argument("--backbone", default=str(REPO / "benchmarks" / "_work" / "backbone" / "pretrained"),
                    help="the long backbone pretraining the backbone and frozen arms start from")
    ap.add_argument("--feature-t", type=int, default=100, help="the frozen_t arm's timestep")
    ap.add_argument("--frozen-lr", type=float, default=None, help="the frozen arm's learning rate (default 3x)")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: rewrite the table and plot from the work folder's rows.json")
    a = ap.parse_args()
    b = dict(BUDGETS[a.budget])
    if a.fractions:
        b["fractions"] = tuple(a.fractions)
    if a.ft_steps:
        b["ft_steps"] = a.ft_steps
    if a.seeds:
        b["seeds"] = tuple(a.seeds)
    if a.pre_steps:
        b["pre_steps"] = a.pre_steps
    b["nucleus_steps"] = a.nucleus_steps or b["pre_steps"]
    if a.preset:
        b["preset"] = a.preset
    if a.images:
        b["images"] = tuple(a.images)
    work = Path(a.work or REPO / "benchmarks" / "_work" / "quality" / a.budget)
    if a.report_only:
        saved = json.loads((work / "rows.json").read_text())
        rows, meta = (saved["rows"], saved["meta"]) if isinstance(saved, dict) else (saved, {})
        b.update(meta.get("budget", {}))
        write_report(work, normalised(rows), a.budget, b, meta.get("pretraining_s", float("nan")),
                     meta.get("machine", "machine and date of the run not recorded"))
        return
    root = data_dir()
    work.mkdir(parents=True, exist_ok=True)
    # the defaults' recipe: nuclei with a boundary class, weights averaged (EMA)
    splits = {n: load_dataset(DATASETS[n], root, boundary=DATASETS[n].task == "nuclei") for n in DATASETS}
    pre = Path(a.pretrained) if a.pretrained else work / "pretrained"
    if a.pretrained:
        b["pre_steps"] = json.loads((pre / "config.json").read_text())["training"]["steps"]
    sources = unlabeled_pool(root, {n: s[0] for n, s in splits.items()})
    pre_s = previous_seconds(work)  # seconds of pretrainings an earlier run in this folder did
    with Timer() as t_pre:
        if "diffusion" in a.arms and not pretrained_enough(pre, b["pre_steps"], b["preset"]):
            drain(pretrain(sources, pre, PretrainConfig(preset=b["preset"], steps=b["pre_steps"], patch=b["patch"],
                                                        batch=b["batch"], lr=1e-3 if b["preset"] == "tiny" else 1e-4,
                                                        warmup=20, checkpoint_every=200),
                           device=a.device, resume=pre.exists()))
    pre_s["diffusion"] = pre_s.get("diffusion", 0.0) + t_pre.s
    nucleus = work / "pretrained_nucleus"
    with Timer() as t_nuc:
        if "nucleus" in a.arms and not nucleus_enough(nucleus, b["nucleus_steps"]):
            drain(pretrain_nucleus(sources, nucleus, NucleusPretrainConfig(
                preset=b["preset"], steps=b["nucleus_steps"], patch=b["patch"], batch=b["batch"], warmup=20,
                lr=5e-4 if b["preset"] == "tiny" else 2e-4, checkpoint_every=200), device=a.device,  # GAN: 1e-3 oscillates
                resume=nucleus.exists()))
    pre_s["nucleus"] = pre_s.get("nucleus", 0.0) + t_nuc.s
    if "nucleus" in a.arms:
        sample_grid(nucleus, sources, b["patch"], work / "nucleus_samples.png", a.device)
    backbone = Path(a.backbone)
    if {"backbone", "frozen", "frozen_t"} & set(a.arms):
        if not (backbone / "config.json").is_file():
            raise SystemExit(f"{backbone}: no backbone pretraining (run benchmarks/pretrain_backbone.py)")
        b["backbone_steps"] = json.loads((backbone / "config.json").read_text())["training"]["steps"]
    inits = {"scratch": None, "diffusion": pre, "nucleus": nucleus, "backbone": backbone, "frozen": backbone,
             "frozen_t": backbone}
    rows = normalised(previous_rows(work, b))  # an interrupted benchmark resumes: runs already scored are kept
    done = {(r["dataset"], r["arm"], r["fraction"], r["seed"]) for r in rows}
    levels = b["images"] if b.get("images") else b["fractions"]
    # label levels outermost, datasets inside: an interrupted run has every dataset at the lower levels
    for level, name in [(lv, n) for lv in levels for n in a.datasets]:
        ds = DATASETS[name]
        train, val, test, inst = splits[name]
        frac = level / len(train) if b.get("images") else level
        for seed in b["seeds"]:
            for arm in [arm for arm in ARMS if arm in a.arms]:
                init = inits[arm]
                if (name, arm, frac, seed) in done:
                    continue
                out = work / f"{name}_{arm}_f{frac}_s{seed}"
                lr = 1e-3 if b["preset"] in ("tiny", "backbone") else 1e-4
                if arm in ("frozen", "frozen_t"):
                    lr = a.frozen_lr or 3 * lr
                cfg = FinetuneConfig(task=ds.task, preset=b["preset"], steps=b["ft_steps"], patch=b["patch"],
                                     batch=b["batch"], lr=lr, warmup=20,
                                     seed=seed, label_fraction=frac, checkpoint_every=0, val_every=0, mpp=ds.mpp,
                                     boundary=ds.task == "nuclei", ema=0.99,
                                     freeze_backbone=arm in ("frozen", "frozen_t"),
                                     feature_t=a.feature_t if arm == "frozen_t" else 0)
                with Timer() as t:
                    drain(finetune(train, out, cfg, init=init, device=a.device, overwrite=True))
                m = evaluate(out, test, inst)  # nuclei AJI / PQ over the images with true instances
                rows.append({"dataset": name, "arm": arm, "fraction": frac, "seed": seed, "seconds": t.s,
                             "n_train_images": max(1, int(round(frac * len(train)))), **m})
                print(json.dumps(rows[-1]), flush=True)
                save_rows(work, rows, b, pre_s)  # after every run: an interrupted benchmark keeps its rows
    write_report(work, rows, a.budget, b, pre_s, machine())


def nucleus_enough(path: Path, steps: int) -> bool:
    """True when ``path`` holds a nucleus-aware pretraining of at least ``steps`` steps."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    saved = json.loads(cfg.read_text())
    if saved.get("pretext") != "nucleus":
        raise SystemExit(f"{path} holds no nucleus-aware pretraining: move it away or pass another --work folder")
    return saved["training"]["steps"] >= steps


def sample_grid(ckpt: Path, sources, patch: int, path: Path, device: str) -> None:
    """The nucleus-aware pretext's visual check: 4 rows of pseudo mask, 3 generated stainings,
    a real unlabeled tile and the mask predicted for it."""
    import imageio.v3 as iio

    rng = np.random.default_rng(0)
    real = np.stack([sources[int(rng.integers(len(sources)))].sample(rng, patch) for _ in range(4)])
    iio.imwrite(path, nucleus_samples(ckpt, 4, size=patch, real=real, device=device))
    print(f"wrote {path}", flush=True)


def normalised(rows: list[dict]) -> list[dict]:
    """Rows of runs before the third arm called the diffusion arm 'pretrained'."""
    return [{**r, "arm": "diffusion"} if r["arm"] == "pretrained" else r for r in rows]


def previous_rows(work: Path, b: dict) -> list[dict]:
    """The rows of an earlier run in ``work`` with the same schedule (preset, patch, batch, steps),
    so an interrupted benchmark continues where it stopped; none when the schedule changed."""
    f = work / "rows.json"
    if not f.is_file():
        return []
    saved = json.loads(f.read_text())
    if not isinstance(saved, dict):
        return []
    old = saved["meta"].get("budget", {})
    same = all(old.get(k) == b.get(k) for k in ("preset", "patch", "batch", "pre_steps", "ft_steps", "backbone_steps"))
    if not same:
        print(f"{f}: another schedule ({ {k: old.get(k) for k in ('pre_steps', 'ft_steps')} }); starting over", flush=True)
        return []
    rows = list(saved["rows"])
    if old.get("nucleus_steps", old.get("pre_steps")) != b["nucleus_steps"]:  # the nucleus arm alone starts over
        rows = [r for r in rows if r["arm"] != "nucleus"]
    print(f"{f}: continuing after {len(rows)} finished runs", flush=True)
    return rows


def previous_seconds(work: Path) -> dict:
    """Seconds each pretext's pretraining took in earlier runs in ``work`` (a float: diffusion only)."""
    f = work / "rows.json"
    saved = json.loads(f.read_text()) if f.is_file() else {}
    s = saved.get("meta", {}).get("pretraining_s", {}) if isinstance(saved, dict) else {}
    return {"diffusion": float(s)} if isinstance(s, (int, float)) else dict(s)


def save_rows(work: Path, rows: list[dict], b: dict, pre_s) -> None:
    meta = {"budget": {**b, "seeds": list(b["seeds"]), "fractions": list(b["fractions"]),
                       "images": list(b.get("images", []))}, "pretraining_s": pre_s,
            "machine": machine()}
    (work / "rows.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def write_report(work: Path, rows: list[dict], budget: str, b: dict, pre_s: float, where: str) -> None:
    md = report(rows, budget, b, pre_s, where)
    (work / "quality.md").write_text(md)
    plot(rows, work / "quality.png")
    print(md)


def report(rows: list[dict], budget: str, b: dict, pre_s, where: str) -> str:
    ft_min = sum(r["seconds"] for r in rows) / 60
    if not isinstance(pre_s, dict):  # rows of runs with diffusion pretraining only
        pre_s = {"diffusion": pre_s}
    spent = ", ".join(f"{k} {v:.0f} s" for k, v in pre_s.items())
    lines = [f"### Quality, budget `{budget}` ({where})", "",
             f"preset {b['preset']}, patch {b['patch']}, batch {b['batch']}, pretraining: diffusion {b['pre_steps']} steps, "
             f"nucleus-aware {b.get('nucleus_steps', b['pre_steps'])} steps ({spent}; 0 s: reused), fine-tuning {b['ft_steps']} steps x {len(rows)} runs ({ft_min:.0f} min), "
             + (f"backbone (benchmarks/pretrain_backbone.py) {b['backbone_steps']} steps; " if b.get("backbone_steps") else "")
             + f"seeds {list(b['seeds'])}; test split only. Mean ± spread (std over seeds; 0 with one seed).", ""]
    for name in sorted({r["dataset"] for r in rows}):
        task = DATASETS[name].task
        keys = KEYS[task]
        lines += [f"**{name}** ({task})", "", "| fraction | arm | " + " | ".join(keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for frac in sorted({r["fraction"] for r in rows if r["dataset"] == name}):
            for arm in ARMS:
                sel = [r for r in rows if r["dataset"] == name and r["fraction"] == frac and r["arm"] == arm]
                if not sel:
                    continue
                cells = []
                for k in keys:
                    v = np.array([r[k] for r in sel], dtype=float)
                    v = v[np.isfinite(v)]
                    cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if v.size else "n/a")
                lines.append(f"| {frac:.0%} ({sel[0]['n_train_images']} img) | {arm} | " + " | ".join(cells) + " |")
        lines += ["", "Each pretext minus scratch, paired by seed (mean, 95 % t-interval over seeds; positive = "
                  "pretraining helped; an interval that contains 0 shows no effect at this budget):", ""]
        for frac in sorted({r["fraction"] for r in rows if r["dataset"] == name}):
            for arm in PRETEXT_ARMS:
                ci = paired_ci(rows, name, frac, MAIN[task], arm)
                if not any(n for *_, n in ci.values()):
                    continue
                cells = [f"{k} {m:+.3f} [{lo:+.3f}, {hi:+.3f}] (n={n})" for k, (m, lo, hi, n) in ci.items()]
                lines.append(f"- {frac:.0%}, {arm}: " + "; ".join(cells))
        lines.append("")
    return "\n".join(lines)


def paired(rows: list[dict], name: str, frac: float, keys: list[str], arm: str = "diffusion") -> dict:
    """Mean over seeds of (``arm`` - scratch) for each key, pairing runs of the same seed."""
    return {k: v[0] for k, v in paired_ci(rows, name, frac, keys, arm).items()}


def paired_ci(rows: list[dict], name: str, frac: float, keys: list[str], arm: str = "diffusion",
              level: float = 0.95) -> dict:
    """(mean, low, high, n) of the paired differences ``arm`` - scratch (same seed) for each key:
    a Student-t confidence interval over seeds (nan bounds with fewer than 2 seeds)."""
    from scipy import stats

    by = {(r["arm"], r["seed"]): r for r in normalised(rows) if r["dataset"] == name and r["fraction"] == frac}
    seeds = sorted({s for (a, s) in by if (arm, s) in by and ("scratch", s) in by})
    out = {}
    for k in keys:
        d = np.array([by[arm, s][k] - by["scratch", s][k] for s in seeds], float)
        if d.size == 0:
            out[k] = (float("nan"),) * 3 + (0,)
            continue
        if d.size < 2:
            out[k] = (float(d.mean()), float("nan"), float("nan"), 1)
            continue
        half = stats.t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
        out[k] = (float(d.mean()), float(d.mean() - half), float(d.mean() + half), int(d.size))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        key = "object_f1" if DATASETS[name].task == "glands" else "aji"
        for arm, style, nudge in (("diffusion", "o-", 0.94), ("nucleus", "^-.", 1.0), ("backbone", "D-", 0.97),
                                  ("frozen", "v:", 1.03), ("frozen_t", "<:", 1.045),
                                  ("scratch", "s--", 1.06)):  # side by side
            fr = sorted({r["fraction"] for r in rows if r["dataset"] == name and r["arm"] == arm})
            if not fr:
                continue
            for k, lab, colour in (("dice", "Dice", "C0"), (key, key, "C3")):
                sel = [[r[k] for r in rows if r["dataset"] == name and r["arm"] == arm and r["fraction"] == f]
                       for f in fr]
                ax.errorbar([100 * f * nudge for f in fr], [np.mean(v) for v in sel], yerr=[np.std(v) for v in sel],
                            fmt=style, color=colour, capsize=3, label=f"{arm}: {lab}")
        ax.set_title(f"{name} ({DATASETS[name].task}), test split")
        ax.set_xlabel("labeled training images (%)")
        ax.set_xscale("log")
        ax.minorticks_off()  # the log axis's own minor labels clash with the fractions below
        images = {r["fraction"]: r["n_train_images"] for r in rows if r["dataset"] == name}  # this dataset's own
        ax.set_xticks([100 * f for f in sorted(images)])
        # room around the fractions: with one fraction alone the axis would zoom onto the arms' nudges
        ax.set_xlim(100 * min(images) * 0.8, 100 * max(images) * 1.25)
        ax.set_xticklabels([f"{100 * f:.3g}\n({images[f]} img)" for f in sorted(images)])
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
