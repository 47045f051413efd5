"""Benchmark CLI start-up and generation: `flowercli --help`, a cold `flowercli generate`, warm ms/image.

    python bench/generate_speed.py --checkpoint RUN_OR_PT [--repeats 5] [--json]
    python bench/generate_speed.py --data-dir DATA_DIR      # trains a 1-step checkpoint first

Figures (medians of --repeats, each in a fresh process unless said otherwise):
  help_s          wall time of `flowercli --help` (must not import torch)
  generate_cold_s wall time of `flowercli generate "<prompt>" -n 16` in a new process: imports,
                  checkpoint, text encoder, 16 images, 17 PNG files (the OS file cache is warm;
                  a first run after boot is slower)
  import_*_s      wall time of a new Python process importing only torch / torch + transformers'
                  AutoModel, to show where the cold start goes
  warm, in one process after a warm-up call, for each thread count in --threads:
    embed_prompt_ms  one prompt through the text encoder
    ms_per_image_64  the EMA generator on a batch of 64 (noise + forward + uint8), per image
    ms_per_image_16  the same for a batch of 16

The machine may be shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "this flower has yellow petals with a dark centre"
BIN = Path(sys.executable).parent / "flowercli"


def wall(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    return time.perf_counter() - t


def median_wall(cmd: list[str], repeats: int, env: dict[str, str] | None = None) -> tuple[float, list[float]]:
    times = [wall(cmd, env) for _ in range(repeats)]
    return statistics.median(times), times


def make_checkpoint(data_dir: Path, runs: Path) -> Path:
    subprocess.run([str(BIN), "train", "--data-dir", str(data_dir), "--runs-dir", str(runs), "--run", "bench",
                    "--max-steps", "1", "-q"], check=True)
    return runs / "bench"


def warm_figures(checkpoint: Path, threads: int, repeats: int) -> dict[str, float]:
    """Run in this process: encoder and generator loaded once, then timed calls."""
    import numpy as np
    import torch

    from flowercli.generate import load_generator

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = load_generator(checkpoint, "cpu")
        gen.embed([PROMPT])
        dim = gen.G.cfg.text_dim
        rng = np.random.default_rng(0)
        out = {}
        v64 = rng.standard_normal((64, dim)).astype(np.float32)
        v16 = rng.standard_normal((16, dim)).astype(np.float32)
        for name, fn, per in (
            ("embed_prompt_ms", lambda: gen.embed([PROMPT]), 1),
            ("ms_per_image_64", lambda: gen.images_from_vectors(v64, list(range(64))), 64),
            ("ms_per_image_16", lambda: gen.images_from_vectors(v16, list(range(16))), 16),
        ):
            fn()
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            out[name] = round(statistics.median(times) * 1e3 / per, 2)
        return out
    finally:
        torch.set_num_threads(old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="a checkpoint file or run folder")
    ap.add_argument("--data-dir", type=Path,
                    help="make a 1-step checkpoint from this data dir when --checkpoint is not given")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="0,1", help="thread counts for the warm figures (0 = torch's default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="flowercli-genbench-") as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            if args.data_dir is None:
                sys.exit("give --checkpoint, or --data-dir to train a 1-step checkpoint")
            checkpoint = make_checkpoint(args.data_dir, tmp / "runs")
        load0 = os.getloadavg()[0]
        r: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": len(os.sched_getaffinity(0)),
                   "checkpoint": str(checkpoint), "repeats": args.repeats}
        py = sys.executable
        r["help_s"], r["help_all"] = median_wall([str(BIN), "--help"], args.repeats)
        r["import_torch_s"], _ = median_wall([py, "-c", "import torch"], args.repeats)
        r["import_torch_transformers_s"], _ = median_wall(
            [py, "-c", "import torch; from transformers import AutoModel, AutoTokenizer; AutoModel.from_config"],
            args.repeats)
        gen_cmd = [str(BIN), "generate", PROMPT, "-n", "16", "--checkpoint", str(checkpoint),
                   "--out", str(tmp / "out"), "-q"]
        r["generate_cold_s"], r["generate_cold_all"] = median_wall(gen_cmd, args.repeats)
        import torch

        for t in [int(x) for x in args.threads.split(",")]:
            n = t or torch.get_num_threads()
            r[f"warm_threads_{n}"] = warm_figures(checkpoint, n, args.repeats)
        r["loadavg_start"], r["loadavg_end"] = round(load0, 2), round(os.getloadavg()[0], 2)
        for k in ("help_all", "generate_cold_all"):
            r[k] = [round(x, 2) for x in r[k]]
        for k in ("help_s", "import_torch_s", "import_torch_transformers_s", "generate_cold_s"):
            r[k] = round(r[k], 2)
    if args.json:
        print(json.dumps(r))
        return
    print(f"{r['date']}  {r['cpus']} CPUs  load average {r['loadavg_start']} -> {r['loadavg_end']}  "
          f"medians of {r['repeats']}")
    print(f"flowercli --help                         {r['help_s']:6.2f} s   {r['help_all']}")
    print(f"new process: import torch                {r['import_torch_s']:6.2f} s")
    print(f"new process: import torch + transformers {r['import_torch_transformers_s']:6.2f} s")
    print(f"flowercli generate '...' -n 16 (cold)    {r['generate_cold_s']:6.2f} s   {r['generate_cold_all']}")
    for k, v in r.items():
        if k.startswith("warm_threads_"):
            print(f"warm, {k.removeprefix('warm_threads_')} thread(s): embed one prompt {v['embed_prompt_ms']:.1f} ms, "
                  f"{v['ms_per_image_64']:.1f} ms/image at batch 64, {v['ms_per_image_16']:.1f} ms/image at batch 16")


if __name__ == "__main__":
    main()
