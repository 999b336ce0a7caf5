"""Would a dedicated CPU inference engine pay? ONNX Runtime against torch (fp32, channels_last, the
fused network the predictor runs) on the bundled models, one 512-px tile per call as the CPU tiler
calls them, interleaved repetitions in one run; the logits must agree.

    pip install onnxruntime onnx     # not project dependencies: this trial only
    python benchmarks/engines.py [--repeats 6]

Run it on an idle machine: under contention (another job on the same cores) torch loses far more
than ONNX Runtime does and the ratio means nothing (session 19 saw 1.6-2.6x busy, 1.1x idle).
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch

from common import machine  # noqa: E402  (common puts src/ on the path)
from napari_genselfdiff.bundled import bundled_models  # noqa: E402
from napari_genselfdiff.core.inference import TorchPredictor  # noqa: E402


def session(network, threads: int):
    """An ONNX Runtime session of ``network`` (exported with any batch, height and width)."""
    import onnxruntime as ort

    buf = io.BytesIO()
    torch.onnx.export(network, (torch.randn(1, 3, 256, 256),), buf, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "y": {0: "b", 2: "h", 3: "w"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=6)
    a = ap.parse_args()
    try:
        import onnxruntime
    except ImportError:
        raise SystemExit("benchmarks/engines.py: needs onnxruntime and onnx (pip install onnxruntime onnx)") from None
    print(f"{machine()}; onnxruntime {onnxruntime.__version__}")
    print("| model | torch fp32 channels_last Mpx/s | ONNX Runtime fp32 Mpx/s | ratio | max logit difference |")
    print("|---|---|---|---|---|")
    for name in ("glands", "nuclei"):
        net = TorchPredictor.from_checkpoint(bundled_models()[name], device="cpu", precision="fp32").network
        sess = session(net, torch.get_num_threads())
        x = torch.randn(1, 3, 512, 512)
        xc = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            ref = net(xc).float().numpy()
        diff = float(np.abs(ref - sess.run(None, {"x": x.numpy()})[0]).max())
        times = {"torch": [], "ort": []}
        for r in range(a.repeats + 1):  # interleaved; the first round warms up
            t0 = time.perf_counter()
            with torch.inference_mode():
                net(xc)
            t1 = time.perf_counter()
            sess.run(None, {"x": x.numpy()})
            t2 = time.perf_counter()
            if r:
                times["torch"].append(t1 - t0)
                times["ort"].append(t2 - t1)
        mt, mo = (float(np.median(times[k])) for k in ("torch", "ort"))
        print(f"| {name} | {0.262144 / mt:.3f} | {0.262144 / mo:.3f} | {mt / mo:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
