"""Training images/s and inference megapixels/s of our U-Net against a straightforward float32
implementation of the reference architecture (the baseline, below), same sizes, same run; and,
with ``--ceiling``, how close the bundled models come to the machine's limit.

    python benchmarks/speed.py [--preset small] [--patch 128] [--batch 4] [--repeats 5]
    python benchmarks/speed.py --ceiling [--json OUT] [--slide-size 2048]

``--ceiling`` measures, in one run: the machine's ceiling (a 3x3 convolution 64 -> 64 channels on
256x256, in GFLOP/s); each bundled model's FLOPs per megapixel (torch.utils.flop_counter) and its
forward pass as Mpx/s and as a fraction of the ceiling, plain and with the inference levers
(frozen BatchNorm folded into the convolutions, channels_last); one training step (batch 8,
128x128, AdamW) as img/s and fraction of the ceiling; end to end, ``predict_slide`` on a
synthetic full-tissue slide of ``--slide-size`` pixels, as Mpx/s of the slide's own pixels and as
a fraction of the raw forward pass over those pixels; the peak RSS; and, each in fresh processes
with glibc's allocator as it comes and as the product tunes it (core/device.tune_allocator,
alternating), a training step of 4 patches of 256 px and the bundled nuclei forward pass on one
512-px tile, with their page faults.

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
from pathlib import Path

import torch
import torch.nn.functional as F

from common import REPO, machine, time_per_call  # also puts src/ on the path
from napari_genselfdiff.core.nets import unet as U
from napari_genselfdiff.core.precision import autocast, cpu_bf16_native, resolve_precision


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


CEILING_VARIANTS = [(dtype, layout) for dtype in ("fp32", "bf16") for layout in ("nchw", "channels_last")]


def conv_ceilings(repeats: int = 10) -> dict:
    """GFLOP/s of a 3x3 convolution, 64 -> 64 channels, 256x256, batch 1 (the work a U-Net does),
    in each precision and layout the CPU offers ({fp32, bf16} x {NCHW, channels_last}), measured
    alternately in rounds so all see the same machine; ``best`` is the machine's ceiling."""
    import numpy as np

    flops = 2 * 64 * 64 * 9 * 256 * 256
    calls = {}
    for dtype, layout in CEILING_VARIANTS:
        dt = torch.bfloat16 if dtype == "bf16" else torch.float32
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval().to(dt).to(memory_format=fmt)
        x = torch.randn(1, 64, 256, 256, dtype=dt).contiguous(memory_format=fmt)
        calls[f"{dtype}_{layout}"] = (lambda c=conv, v=x: c(v))
    times = {k: [] for k in calls}
    with torch.inference_mode():
        for _ in range(3):
            for k, fn in calls.items():
                times[k].append(time_per_call(fn, max(1, repeats // 3)))
    out = {k: round(flops / float(np.min(ts)) / 1e9, 1) for k, ts in times.items()}
    best = max(out, key=out.get)
    return {"gflops": out, "best": best, "best_gflops": out[best]}



def forward_flops(model, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())


def ceiling_report(a) -> dict:
    """The bundled models against the machine's ceiling (see the module docstring)."""
    import tempfile
    import time

    import numpy as np

    from napari_genselfdiff.bundled import resolve_model as bundled_model_path
    from napari_genselfdiff.core.inference import TorchPredictor
    from napari_genselfdiff.core.nets.unet import UNet, fused_for_inference, segmentation_config, UNetConfig

    ceilings = conv_ceilings(a.repeats)
    ceiling = ceilings["best_gflops"]
    native, what = cpu_bf16_native()
    out = {"machine": machine(), "threads": torch.get_num_threads(), "ceiling_gflops": round(ceiling, 1),
           "ceiling": ceilings, "ceiling_fractions": {k: round(v / ceiling, 3) for k, v in ceilings["gflops"].items()},
           "cpu_bf16_native": native, "cpu_bf16": what,
           "auto_precision": resolve_precision("auto", "cpu").why, "models": {}}
    size = a.infer_size
    x = torch.randn(1, 3, size, size)
    for task in ("glands", "nuclei"):
        pred = TorchPredictor.from_checkpoint(bundled_model_path(task), device="cpu")
        model = pred.model.float().eval()
        flops = forward_flops(model, x)
        mpx = size * size / 1e6
        row = {"gflop_per_mpx": round(flops / 1e9 / mpx, 1)}
        variants = {"plain": model, "fused": fused_for_inference(model)}
        variants["fused_channels_last"] = fused_for_inference(model).to(memory_format=torch.channels_last)
        # what TorchPredictor runs with precision bf16 on the CPU: the fused copy cast to bf16
        variants["fused_channels_last_bf16"] = fused_for_inference(model).to(torch.bfloat16).to(
            memory_format=torch.channels_last)
        if a.compile:  # inductor on the CPU (needs a C++ compiler); a failure is reported, not fatal
            try:
                variants["compiled"] = torch.compile(fused_for_inference(model).to(memory_format=torch.channels_last))
                with torch.inference_mode():
                    variants["compiled"](x.to(memory_format=torch.channels_last))
            except Exception as e:  # noqa: BLE001 - any backend failure means "not available here"
                variants.pop("compiled", None)
                row["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        for name, m in variants.items():
            inp = x.to(torch.bfloat16) if name.endswith("bf16") else x
            inp = inp.to(memory_format=torch.channels_last) if "channels_last" in name or name == "compiled" else inp
            with torch.inference_mode():
                t = time_per_call(lambda: m(inp), a.repeats)
            row[f"infer_{name}_mpx_s"] = round(mpx / t, 3)
            row[f"infer_{name}_fraction"] = round(flops / t / 1e9 / ceiling, 3)
        out["models"][task] = row
    # training: the segmentation network of the bundled preset, batch 8 of 128x128, in the
    # layout the trainer uses (channels_last on the CPU, core/device.channels_last_for) and, in
    # the same run, in the default contiguous layout
    from napari_genselfdiff.core.device import channels_last_for
    from torch.utils.flop_counter import FlopCounterMode

    xb, yb = torch.randn(8, 3, 128, 128), torch.randint(0, 2, (8, 128, 128))
    nets = {}
    for layout in ("contiguous", "channels_last", "channels_last_bf16"):
        net = UNet(segmentation_config(UNetConfig.from_preset("tiny", in_channels=3, out_channels=3), 2))
        if layout != "contiguous":
            net = net.to(memory_format=channels_last_for("cpu"))
        nets[layout] = (net, torch.optim.AdamW(net.parameters(), lr=1e-4))

    def step(layout):
        net, opt = nets[layout]
        opt.zero_grad(set_to_none=True)
        # bf16: the trainer's autocast (core/precision.py), fp32 weights and loss
        with autocast("cpu", "bf16" if layout.endswith("bf16") else "fp32"):
            logits = net(xb)
        F.cross_entropy(logits.float(), yb).backward()
        opt.step()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(nets["contiguous"][0](xb), yb).backward()
    train_flops = float(counter.get_total_flops())
    times = {k: [] for k in nets}
    for _ in range(max(3, a.repeats // 2)):  # alternating, so both see the same machine state
        for k in nets:
            times[k].append(time_per_call(lambda: step(k), 1))
    t = float(np.median(times["channels_last"]))
    out["train_img_s"] = round(8 / t, 2)
    out["train_contiguous_img_s"] = round(8 / float(np.median(times["contiguous"])), 2)
    out["train_bf16_img_s"] = round(8 / float(np.median(times["channels_last_bf16"])), 2)
    out["train_channels_last_ratio"] = round(out["train_img_s"] / out["train_contiguous_img_s"], 3)
    out["train_bf16_ratio"] = round(out["train_bf16_img_s"] / out["train_img_s"], 3)
    out["train_fraction_of_ceiling"] = round(train_flops / t / 1e9 / ceiling, 3)
    out["train_bf16_fraction_of_ceiling"] = round(train_flops * out["train_bf16_img_s"] / 8 / 1e9 / ceiling, 3)
    # end to end on a synthetic full-tissue slide, against the raw forward pass over its pixels
    from napari_genselfdiff.slide.tiler import predict_slide
    from napari_genselfdiff.core.progress import drain
    pred = TorchPredictor.from_checkpoint(bundled_model_path("nuclei"), device="cpu")
    rng = np.random.default_rng(0)
    n = a.slide_size
    with tempfile.TemporaryDirectory() as tmp:
        img = (rng.integers(60, 200, (n, n, 3))).astype(np.uint8)
        img[..., 2] = 200  # pinkish, "tissue" everywhere
        path = Path(tmp) / "slide.tif"
        import tifffile
        tifffile.imwrite(path, img, tile=(512, 512))
        overlap, _ = pred.overlap_for(a.tile, None)
        t0 = time.perf_counter()
        drain(predict_slide(pred, str(path), Path(tmp) / "out.zarr", level=0, tile=a.tile, overlap=overlap,
                            batch=4, tissue=False, class_names=pred.class_names, postprocess="nuclei",
                            postprocess_options=pred.postprocess_options))
        t_e2e = time.perf_counter() - t0
    # the raw forward pass the predictor itself runs (folded BatchNorm, channels_last, its precision)
    nuc = out["models"]["nuclei"]
    raw_mpx_s = (nuc["infer_fused_channels_last_bf16_mpx_s"] if pred.input_dtype is not None
                 else nuc["infer_fused_channels_last_mpx_s"]) if getattr(pred, "channels_last", False) \
        else nuc["infer_fused_mpx_s"] if pred.network is not pred.model else nuc["infer_plain_mpx_s"]
    out["end_to_end_precision"] = pred.precision.why
    out["end_to_end_fraction_of_ceiling"] = round(nuc["gflop_per_mpx"] * n * n / 1e6 / t_e2e / ceiling, 3)
    out["end_to_end_mpx_s"] = round(n * n / 1e6 / t_e2e, 3)
    out["end_to_end_fraction_of_raw"] = round(out["end_to_end_mpx_s"] / raw_mpx_s, 3)
    out["end_to_end"] = {"slide": f"{n}x{n} synthetic, no tissue skipping", "tile": a.tile, "overlap": overlap,
                         "seconds": round(t_e2e, 1)}
    out["infer_fraction_of_ceiling"] = min(max(r["infer_fused_channels_last_fraction"],
                                               r["infer_fused_channels_last_bf16_fraction"])
                                           for r in out["models"].values())
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


ALLOCATOR_CHILD = """
import json, resource, sys, time, torch
import torch.nn.functional as F
from napari_genselfdiff.bundled import resolve_model
from napari_genselfdiff.core.device import tune_allocator
from napari_genselfdiff.core.inference import TorchPredictor
from napari_genselfdiff.core.nets.unet import UNet, UNetConfig, segmentation_config
tuned = tune_allocator()
net = UNet(segmentation_config(UNetConfig.from_preset("tiny", in_channels=3, out_channels=3), 2))
net = net.to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(net.parameters())
x, y = torch.randn(4, 3, 256, 256), torch.randint(0, 2, (4, 256, 256))
def step():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    opt.step()
pred = TorchPredictor.from_checkpoint(resolve_model("nuclei"), device="cpu")
tile = (torch.rand(1, 512, 512, 3) * 255).byte().numpy()
out = {"tuned": tuned}
for name, fn, n in (("train_step_s", step, 4), ("infer_tile_s", lambda: pred(tile), 6)):
    fn(); fn()
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(n):
        fn()
    out[name] = (time.perf_counter() - t0) / n
    out[name[:-2] + "_faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) // n
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")]
out["peak_rss_mb"] = int(hwm[0].split()[1]) / 1024 if hwm else float("nan")
print(json.dumps(out))
"""


def allocator_report(rounds: int = 2) -> dict:
    """The allocator lever in fresh processes (glibc's settings are per process and cannot be
    undone), alternating the two modes; medians over ``rounds`` processes each."""
    import os
    import subprocess
    import sys

    import numpy as np

    runs: dict[str, list[dict]] = {"default": [], "tuned": []}
    for _ in range(rounds):
        for mode in runs:
            env = {**os.environ, "GENSELFDIFF_MALLOC": "default" if mode == "default" else "",
                   "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
            done = subprocess.run([sys.executable, "-c", ALLOCATOR_CHILD], capture_output=True, text=True,
                                  env=env, check=True)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    out = {mode: {k: round(float(np.median([r[k] for r in rs])), 3) for k in rs[0] if k != "tuned"}
           for mode, rs in runs.items()}
    out["train_ratio"] = round(out["default"]["train_step_s"] / out["tuned"]["train_step_s"], 3)
    out["infer_ratio"] = round(out["default"]["infer_tile_s"] / out["tuned"]["infer_tile_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--infer-size", type=int, default=512, help="tile size for the inference measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(ours) (with --ceiling: inductor on this CPU)")
    ap.add_argument("--ceiling", action="store_true", help="the bundled models against the machine's ceiling")
    ap.add_argument("--json", default=None, help="--ceiling: also write the results to this JSON file")
    ap.add_argument("--slide-size", type=int, default=2048, help="--ceiling: end-to-end slide side in pixels")
    ap.add_argument("--tile", type=int, default=512, help="--ceiling: end-to-end tile size")
    a = ap.parse_args()
    if a.ceiling:
        result = ceiling_report(a)
        result["allocator"] = allocator_report()
        print(json.dumps(result, indent=2))
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=2))
        return
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
            with autocast(dev, resolve_precision("auto" if amp else "fp32", dev)):
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
            with ctx, autocast(dev, resolve_precision("auto" if amp else "fp32", dev)):
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
