"""Training images/s and inference megapixels/s of our U-Net against a straightforward float32
implementation of the reference architecture (the baseline, below), same sizes, same run.

    python benchmarks/speed.py [--preset small] [--patch 128] [--batch 4] [--repeats 5]

Our model differs from the baseline only in how it computes: fused scaled-dot-product attention
in the bottleneck (the baseline materialises the full attention matrix), ``channels_last`` and
inference mode for prediction, and on CUDA bf16/fp16 autocast and optionally torch.compile. The
baseline loads the SAME weights (its module names mirror ours), so both compute the same
function; the script checks that before timing. Ratios (ours / baseline) are measured in one run.
"""
from __future__ import annotations

import argparse
import json
import resource

import torch
import torch.nn.functional as F

from common import machine, time_per_call  # also puts src/ on the path
from napari_genselfdiff.core import unet as U
from napari_genselfdiff.core.inference import autocast_for


class NaiveFullAttention(U.FullAttention):
    """The textbook attention: softmax(q k^T / sqrt(d)) v with the (HW x HW) matrix in memory."""

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, -1, h * w).unbind(1)
        attn = torch.einsum("bhdi,bhdj->bhij", q, k) * q.shape[2] ** -0.5
        out = torch.einsum("bhij,bhdj->bhdi", attn.softmax(dim=-1), v)
        return x + self.out(out.reshape(b, -1, h, w))


def baseline_from(model: U.UNet) -> U.UNet:
    """The same network with the naive attention, float32, no layout tricks."""
    base = U.UNet(model.config)
    if isinstance(base.mid_attn, U.FullAttention):
        cfg = model.config
        base.mid_attn = NaiveFullAttention(cfg.base * cfg.mults[-1], cfg.heads, cfg.head_dim, cfg.groups)
    base.load_state_dict(model.state_dict())
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--infer-size", type=int, default=512, help="tile size for the inference measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(ours) (CUDA)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    ours = U.UNet(U.UNetConfig.from_preset(a.preset, out_channels=2)).to(dev)
    base = baseline_from(ours).to(dev)
    x = torch.randn(2, 3, 64, 64, device=dev)
    with torch.no_grad():
        diff = (ours(x) - base(x)).abs().max().item()
    assert diff < 1e-3, f"baseline and ours disagree by {diff}"

    xb = torch.randn(a.batch, 3, a.patch, a.patch, device=dev)
    yb = torch.randint(0, 2, (a.batch, a.patch, a.patch), device=dev)

    def train_step(model, amp):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast_for(dev, amp):
                loss = F.cross_entropy(model(xb).float(), yb)
            loss.backward()
            opt.step()
        return step

    xi = torch.randn(1, 3, a.infer_size, a.infer_size, device=dev)

    def infer(model, amp, channels_last):
        m = model.to(memory_format=torch.channels_last) if channels_last else model
        inp = xi.to(memory_format=torch.channels_last) if channels_last else xi

        def run():
            ctx = torch.inference_mode() if channels_last else torch.no_grad()
            with ctx, autocast_for(dev, amp):
                m(inp)
        return run

    rows = {}
    rows["train_baseline"] = a.batch / time_per_call(train_step(base, False), a.repeats, sync)
    rows["train_ours"] = a.batch / time_per_call(train_step(ours, True), a.repeats, sync)
    mp = a.infer_size**2 / 1e6
    rows["infer_baseline"] = mp / time_per_call(infer(base, False, False), a.repeats, sync)
    rows["infer_ours"] = mp / time_per_call(infer(ours, True, True), a.repeats, sync)
    if a.compile:
        compiled = torch.compile(ours)
        rows["infer_ours_compiled"] = mp / time_per_call(infer(compiled, True, True), a.repeats, sync)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result = {"machine": machine(), "device": str(dev), "preset": a.preset, "patch": a.patch, "batch": a.batch,
              "infer_size": a.infer_size, "max_abs_diff": diff, **{k: round(v, 3) for k, v in rows.items()},
              "train_ratio": round(rows["train_ours"] / rows["train_baseline"], 3),
              "infer_ratio": round(rows["infer_ours"] / rows["infer_baseline"], 3),
              "peak_memory_mib": round(peak, 1)}
    print(json.dumps(result, indent=2))
    print(f"\n| device | preset | train img/s baseline | ours | ratio | infer MP/s baseline | ours | ratio | peak MiB |\n"
          f"|---|---|---|---|---|---|---|---|---|\n| {dev} | {a.preset} | {rows['train_baseline']:.2f} | "
          f"{rows['train_ours']:.2f} | {result['train_ratio']:.2f} | {rows['infer_baseline']:.3f} | "
          f"{rows['infer_ours']:.3f} | {result['infer_ratio']:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
