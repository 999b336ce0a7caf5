"""Cost of the U-Net presets (and of variants of them) in one run: parameters, training images/s
and inference megapixels/s, so that a change of preset is decided on measured ratios.

    python benchmarks/presets.py [--patch 128] [--batch 8] [--infer-size 512] [--repeats 3]

Variants: every preset as shipped, plus ``tiny-3level`` (the tiny preset as it was before
2026-11-22: mults (1, 2, 2), so its bottleneck's full attention runs at 1/4 resolution instead of
1/8). Each is timed with random weights, float32, one process, same inputs; ratios are taken
against the shipped ``tiny``. A ``-seg`` suffix times the segmentation network the preset gives
(``segmentation_config``: BatchNorm for tiny, the per-pixel LayerNorm for backbone), channels_last,
its inference through ``fused_for_inference`` as the predictor runs it:

    python benchmarks/presets.py --presets tiny-seg backbone-seg

``--precision bf16`` times both under bf16 autocast (training: fp32 master weights, as
``finetune`` trains; inference: the predictor's autocast), as they run on a CPU with native bf16.
``s2d-seg`` is the space-to-depth preset (issue 32 item 6, no layer at full resolution).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from common import machine, time_per_call  # also puts src/ on the path
from napari_genselfdiff.core import precision as P
from napari_genselfdiff.core.nets import unet as U

VARIANTS = {"tiny": {}, "tiny-3level": {"mults": (1, 2, 2)}}


def measure(cfg: U.UNetConfig, patch: int, batch: int, infer_size: int, repeats: int, seg: bool = False,
            precision: str = "fp32") -> dict:
    torch.manual_seed(0)
    model = U.UNet(cfg)
    layout = torch.channels_last if seg else torch.contiguous_format
    model = model.to(memory_format=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    xb = torch.randn(batch, 3, patch, patch).to(memory_format=layout)
    yb = torch.randint(0, cfg.out_channels, (batch, patch, patch))

    def step():
        opt.zero_grad(set_to_none=True)
        with P.autocast("cpu", precision):
            out = model(xb)
        F.cross_entropy(out.float(), yb).backward()
        opt.step()

    xi = torch.randn(1, 3, infer_size, infer_size).to(memory_format=layout)
    model.train()
    train = batch / time_per_call(step, repeats)
    model.eval()
    net = U.fused_for_inference(model).to(memory_format=layout) if seg else model

    def infer():
        with torch.inference_mode(), P.autocast("cpu", precision):
            net(xi)

    return {"params": U.count_parameters(model), "train_img_s": train, "norm": cfg.norm, "mults": cfg.mults,
            "infer_mp_s": infer_size**2 / 1e6 / time_per_call(infer, repeats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--infer-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", nargs="+", default=["tiny", "tiny-3level", "small"])
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    a = ap.parse_args()
    rows = {}
    for name in a.presets:
        seg = name.endswith("-seg")
        preset = name.removesuffix("-seg")
        preset = preset if preset in U.PRESETS else preset.split("-")[0]  # a variant: tiny-3level
        cfg = U.UNetConfig.from_preset(preset, out_channels=2, **VARIANTS.get(name, {}))
        if seg:
            cfg = U.segmentation_config(cfg, 2)
        rows[name] = measure(cfg, a.patch, a.batch, a.infer_size, a.repeats, seg, a.precision)
        print(json.dumps({name: rows[name]}), flush=True)
    ref = rows.get("tiny") or rows.get("tiny-seg") or next(iter(rows.values()))
    print(f"\n{machine()}; {a.precision}; patch {a.patch}, batch {a.batch}, inference on one {a.infer_size}x{a.infer_size} tile\n")
    print("| variant | mults | norm | parameters | train img/s | vs ref | infer MP/s | vs ref |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        mults = VARIANTS.get(name, {}).get("mults") or r["mults"]
        norm = r["norm"]
        print(f"| {name} | {tuple(mults)} | {norm} | {r['params']:,} | {r['train_img_s']:.2f} | "
              f"{r['train_img_s'] / ref['train_img_s']:.2f} | {r['infer_mp_s']:.3f} | "
              f"{r['infer_mp_s'] / ref['infer_mp_s']:.2f} |")


if __name__ == "__main__":
    main()
