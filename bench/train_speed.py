"""Benchmark full training steps (D and G updates, EMA) of the default model: images per second.

    python bench/train_speed.py [--batch-size 64] [--repeats 5] [--steps 2] [--warmup 1]
                                [--variants optimised,unoptimised,...] [--threads N] [--json]
                                [--compile] [--no-flops] [--no-rss] [--no-parts]

Every variant runs `flowercli.train.run_step`, the function the training loop calls, on
synthetic tensors shaped like the real data (64x64 uint8 images held in memory, 384-d MiniLM
vectors, 10 captions per image, 82 training classes), so no dataset is needed. Variants differ
only in how the step is executed (`StepOptions`, the Adam implementation, thread count), never
in what it computes beyond float rounding:

  optimised    what `flowercli train` uses on this machine (the TrainConfig defaults, resolved)
  unoptimised  fp32, contiguous memory format, eager, three D forwards per D step (real,
               mismatched, fake; they share one spectral-norm power iteration, as the single
               forward does), for-loop Adam, torch's default thread count
  plus one-lever variants (see `variants()`) to show what each lever is worth on its own;
  `--variants all` lists them all, `--compile` adds torch.compile (its first step is the
  compile time).

The machine may be shared, so variants are interleaved: each repeat times `--steps` steps of
every variant in turn, after `--warmup` untimed steps each; the table gives the median over
repeats (and the min, the least disturbed figure), the ratio of medians to `unoptimised`, and
the process CPU time per step (all threads): on a busy machine wall time depends on what the
other processes leave, CPU time much less.

FLOPs per step are counted with torch.utils.flop_counter.FlopCounterMode on one step (matmuls
and convolutions, forward and backward; elementwise work is not counted). Achieved FLOP/s is that
count over the median step time, compared with the CPU's fp32 peak:
    cores x clock x FLOP/cycle/core,  FLOP/cycle/core = 2 FMA units x 8 fp32 lanes (AVX2) x 2
(both AVX2 FMA ports of Zen 2/3 and Intel Haswell and later; 64 with AVX-512 on two ports).
The clock is /proc/cpuinfo's "cpu MHz" (the nominal clock under a hypervisor); override with
--peak-gflops. Two more yardsticks: a 2048^3 fp32 matmul timed between repeats (what this CPU
delivers right now, with the same threads and load), and FLOPs per CPU-second of the process
against one core's peak (how well the cycles the process did get were used). The peak RSS of a
training process is measured in a fresh child process that builds the full-size in-memory data
(8,189 images) and runs a few optimised steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from flowercli.device import StepOptions, resolve_adam, resolve_precision, resolve_threads
from flowercli.runconfig import make_config
from flowercli.train import build_nets, run_step
from flowercli.traindata import TrainData

TEXT_DIM, N_CLASSES, CAPTIONS = 384, 82, 10


@dataclass(frozen=True)
class Variant:
    channels_last: bool
    precision: str  # fp32 | bf16
    one_d_forward: bool
    adam: str  # forloop | foreach | fused
    threads: int = 0  # 0 = leave torch's default
    compile: bool = False


def optimised_variant(device: torch.device) -> Variant:
    """What `flowercli train` resolves its defaults to on this machine."""
    cfg = make_config("modern")
    dtype = resolve_precision(cfg.precision, device)
    return Variant(channels_last=cfg.channels_last, precision="bf16" if dtype is not None else "fp32",
                   one_d_forward=cfg.model.spectral_norm, adam=resolve_adam(cfg.adam, device),
                   threads=resolve_threads(cfg.threads))


def variants(device: torch.device) -> dict[str, Variant]:
    opt = optimised_variant(device)
    base = Variant(channels_last=False, precision="fp32", one_d_forward=False, adam="forloop")
    return {
        "optimised": opt,
        "unoptimised": base,
        "unoptimised/1 thread": replace(base, threads=1),
        "unoptimised+channels_last": replace(base, channels_last=True),
        "unoptimised+one D forward": replace(base, one_d_forward=True),
        "unoptimised+fused Adam": replace(base, adam="fused"),
        "unoptimised+foreach Adam": replace(base, adam="foreach"),
        "optimised/contiguous": replace(opt, channels_last=False),
        "optimised/3 D forwards": replace(opt, one_d_forward=False),
        "optimised/for-loop Adam": replace(opt, adam="forloop"),
        "optimised/bf16": replace(opt, precision="bf16"),
        "optimised/fp32": replace(opt, precision="fp32"),
        "optimised/1 thread": replace(opt, threads=1),
        "optimised/2 threads": replace(opt, threads=2),
        "optimised/compiled": replace(opt, compile=True),
    }


def synthetic_data(n: int, image_size: int = 64, seed: int = 0) -> TrainData:
    g = torch.Generator().manual_seed(seed)
    return TrainData(
        images=torch.randint(0, 256, (n, 3, image_size, image_size), generator=g, dtype=torch.uint8),
        vectors=torch.randn(n, CAPTIONS, TEXT_DIM, generator=g),
        n_captions=torch.full((n,), CAPTIONS),
        labels=torch.randint(0, N_CLASSES, (n,), generator=g),
        classes=list(range(1, N_CLASSES + 1)), text_mean=torch.zeros(TEXT_DIM), text_std=torch.ones(TEXT_DIM),
        sample_vectors=torch.zeros(8, TEXT_DIM), sample_captions=[""] * 8, encoder={}, split="classes")


class Runner:
    """One variant's networks and optimisers; `steps(k)` runs k more steps of run_step."""

    def __init__(self, v: Variant, data: TrainData, batch_size: int, device: torch.device):
        self.v, self.data, self.device = v, data, device
        self.cfg = make_config("modern", text_dim=TEXT_DIM, n_classes=N_CLASSES, batch_size=batch_size,
                               channels_last=v.channels_last, precision=v.precision, adam=v.adam)
        torch.manual_seed(self.cfg.seed)
        self.nets = build_nets(self.cfg.model, self.cfg, device, v.channels_last, v.adam)
        self.opts = StepOptions(device, resolve_precision(v.precision, device), v.channels_last, v.one_d_forward)
        self.step = 0
        if v.compile:
            self.nets.G = torch.compile(self.nets.G, dynamic=False)
            self.nets.D = torch.compile(self.nets.D, dynamic=False)

    def steps(self, k: int) -> None:
        threads = torch.get_num_threads()
        if self.v.threads:
            torch.set_num_threads(self.v.threads)
        try:
            n, b = len(self.data.labels), self.cfg.batch_size
            for _ in range(k):
                start = (self.step * b) % (n - b + 1)
                idx = torch.arange(start, start + b)
                stats = run_step(self.nets, self.data, idx, self.step, self.cfg, self.opts)
                self.step += 1
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            assert torch.isfinite(stats["loss_d"]) and torch.isfinite(stats["loss_g"])
        finally:
            torch.set_num_threads(threads)


def cpu_peak_gflops() -> tuple[float, str]:
    """fp32 peak of this CPU and how it was derived."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    flags = next((line.split(":")[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fma = 2 if "fma" in flags else 1
    per_cycle = 2 * lanes * fma  # 2 FMA issue ports x lanes x (multiply + add); no FMA: 1 add + 1 mul port
    clock = (statistics.median(mhz) if mhz else 0.0) / 1e3
    peak = cores * clock * per_cycle
    how = (f"{cores} cores x {clock:.3f} GHz x {per_cycle} FLOP/cycle "
           f"(2 FMA ports x {lanes} fp32 lanes x 2) = {peak:.1f} GFLOP/s")
    return peak, how


def sgemm_gflops(n: int = 2048, repeats: int = 3) -> float:
    """A practical ceiling under the current load and thread count: MKL/oneDNN fp32 matmul, best of a few."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def count_flops(data: TrainData, batch_size: int, device: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    r = Runner(optimised_variant(device), data, batch_size, device)
    r.steps(1)
    counter = FlopCounterMode(display=False)
    with counter:
        r.steps(1)
    return counter.get_total_flops()


def part_costs(data: TrainData, batch_size: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Milliseconds of pieces of a step, each timed on its own (medians): what levers could gain."""
    from flowercli.device import adam_flags
    from flowercli.losses import diff_augment, ema_update
    from flowercli.rng import derived_seed, step_generator
    from flowercli.traindata import make_batch

    v = optimised_variant(device)
    r = Runner(v, data, batch_size, device)
    r.steps(1)
    mcfg, nets, opts = r.cfg.model, r.nets, r.opts
    idx = torch.arange(batch_size)
    x = torch.randn(3 * batch_size, 3, 64, 64, device=device)
    if v.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    sn = [m for m in nets.D.modules() if hasattr(m, "parametrizations")]

    def diffaug_fwd_bwd():
        g = step_generator(0, 0, 0, device)
        y = diff_augment(x.detach().requires_grad_(True), mcfg.diffaug, g)
        y.sum().backward()

    def power_iterations():
        # Training-mode access runs one power iteration and the division by sigma, as each D forward does.
        with torch.no_grad():
            for m in sn:
                _ = m.weight

    def batch_and_generators():
        g = step_generator(0, 0, 0, device)
        gc = step_generator(0, 0, 0, torch.device("cpu"))
        make_batch(data, idx, g, gc, mcfg, opts)

    # Adam over copies of G's and D's parameters with random gradients, one optimiser per implementation.
    params = [p.detach().clone().requires_grad_(True) for p in list(nets.G.parameters()) + list(nets.D.parameters())]
    for p in params:
        p.grad = torch.randn_like(p)
    adams = {impl: torch.optim.Adam(params, lr=1e-4, betas=(0.0, 0.9), **adam_flags(impl))
             for impl in ("forloop", "foreach", "fused")}

    def item_sync():
        float(torch.zeros((), device=device).add_(1).item())

    parts = {
        "DiffAugment fwd+bwd (3B images, D step)": diffaug_fwd_bwd,
        "spectral norm: power iterations, one D forward": power_iterations,
        "batch assembly + 2 step generators": batch_and_generators,
        "derived_seed (SeedSequence)": lambda: derived_seed(0, 1, 12345, 0),
        **{f"Adam step, G and D, {impl}": opt.step for impl, opt in adams.items()},
        "EMA update": lambda: ema_update(nets.G_ema, nets.G, 0.999),
        ".item() host sync": item_sync,
    }
    out = {}
    for name, fn in parts.items():
        fn()
        times = []
        for _ in range(max(repeats, 5)):
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) * 1e3
    return out


def rss_child(batch_size: int, steps: int) -> None:
    """Run in a fresh process: full-size data, optimised steps; print the peak RSS."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = synthetic_data(8189)
    r = Runner(optimised_variant(device), data, batch_size, device)
    r.steps(steps)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant per repeat")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variants", default="optimised,unoptimised", help="comma-separated names, or 'all'")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (and its compile time)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for the whole run (0: default)")
    ap.add_argument("--peak-gflops", type=float, default=0.0)
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--no-parts", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.batch_size, 3)
        return
    from flowercli.device import resolve_device

    device = resolve_device(args.device)
    all_variants = variants(device)
    names = list(all_variants) if args.variants == "all" else [n.strip() for n in args.variants.split(",")]
    if args.compile and "optimised/compiled" not in names:
        names.append("optimised/compiled")
    if not args.compile and args.variants == "all":
        names.remove("optimised/compiled")
    unknown = [n for n in names if n not in all_variants]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {list(all_variants)}")
    if "unoptimised" not in names:
        names.append("unoptimised")

    data = synthetic_data(max(4 * args.batch_size, 512))
    load0 = os.getloadavg()[0]
    runners, first_step = {}, {}
    for name in names:
        runners[name] = Runner(all_variants[name], data, args.batch_size, device)
        t = time.perf_counter()
        runners[name].steps(1)  # compiles, for the compiled variant
        first_step[name] = time.perf_counter() - t
        if args.warmup > 1:
            runners[name].steps(args.warmup - 1)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    gemm: list[float] = []
    for _ in range(args.repeats):
        if device.type == "cpu":
            gemm.append(sgemm_gflops())
        for name in names:
            t, c = time.perf_counter(), time.process_time()
            runners[name].steps(args.steps)
            times[name].append((time.perf_counter() - t) / args.steps)
            cpu[name].append((time.process_time() - c) / args.steps)
    load1 = os.getloadavg()[0]

    base = statistics.median(times["unoptimised"])
    rows = []
    for name in names:
        med = statistics.median(times[name])
        rows.append({"variant": name, **vars(all_variants[name]), "ms_per_step_median": round(med * 1e3, 1),
                     "ms_per_step_min": round(min(times[name]) * 1e3, 1),
                     "cpu_s_per_step_median": round(statistics.median(cpu[name]), 2),
                     "img_per_s_median": round(args.batch_size / med, 2),
                     "speedup_vs_unoptimised": round(base / med, 3), "first_step_s": round(first_step[name], 2),
                     "ms_per_step_all": [round(t * 1e3) for t in times[name]]})
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device_name(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "batch_size": args.batch_size, "repeats": args.repeats,
              "steps_per_repeat": args.steps, "loadavg_start": round(load0, 2), "loadavg_end": round(load1, 2),
              "rows": rows}
    if gemm:
        result["sgemm_gflops_median"] = round(statistics.median(gemm), 1)

    opt_med = statistics.median(times["optimised"]) if "optimised" in times else None
    if not args.no_flops and opt_med is not None:
        flops = count_flops(data, args.batch_size, device)
        result["gflop_per_step"] = round(flops / 1e9, 2)
        result["achieved_gflops"] = round(flops / opt_med / 1e9, 1)
        if device.type == "cpu":
            peak, how = (args.peak_gflops, "given with --peak-gflops") if args.peak_gflops else cpu_peak_gflops()
            result["peak_gflops"], result["peak_how"] = round(peak, 1), how
            result["percent_of_peak"] = round(100 * flops / opt_med / 1e9 / peak, 1)
            if gemm:
                result["percent_of_sgemm"] = round(100 * flops / opt_med / 1e9 / statistics.median(gemm), 1)
            # On a shared machine a process gets only part of the cores: FLOPs per CPU-second of
            # the process against one core's peak says how well the cycles it did get were used.
            result["core_peak_gflops"] = round(peak / len(os.sched_getaffinity(0)), 1)
        for row in rows:
            row["gflop_per_cpu_s"] = round(flops / 1e9 / row["cpu_s_per_step_median"], 1)
    if not args.no_parts:
        parts = part_costs(data, args.batch_size, device, args.repeats)
        result["parts_ms"] = {k: round(v, 3) for k, v in parts.items()}
    if not args.no_rss:
        cmd = [sys.executable, __file__, "--rss-child", "--batch-size", str(args.batch_size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        result["peak_rss_mb"] = round(json.loads(out.strip().splitlines()[-1])["peak_rss_mb"], 1)

    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)
    return f"{model}, {len(os.sched_getaffinity(0))} CPUs"


def print_table(r: dict) -> None:
    print(f"{r['date']}  {r['device']}  torch {r['torch']}  threads {r['threads']}  batch {r['batch_size']}  "
          f"{r['repeats']} repeats x {r['steps_per_repeat']} steps  "
          f"load average {r['loadavg_start']} -> {r['loadavg_end']}")
    print(f"{'variant':28s} {'ms/step med':>11s} {'min':>8s} {'img/s':>7s} {'vs unopt':>8s} {'CPU s/step':>10s} "
          f"{'1st step s':>10s}  all (ms)")
    for row in r["rows"]:
        print(f"{row['variant']:28s} {row['ms_per_step_median']:11.1f} {row['ms_per_step_min']:8.1f} "
              f"{row['img_per_s_median']:7.2f} {row['speedup_vs_unoptimised']:7.2f}x "
              f"{row['cpu_s_per_step_median']:10.2f} "
              f"{row['first_step_s']:10.1f}  {row['ms_per_step_all']}")
    if "gflop_per_step" in r:
        line = f"FLOPs/step {r['gflop_per_step']} G; optimised achieves {r['achieved_gflops']} GFLOP/s"
        if "peak_gflops" in r:
            line += f" = {r['percent_of_peak']} % of peak {r['peak_how']}"
        print(line)
        if "percent_of_sgemm" in r:
            print(f"  = {r['percent_of_sgemm']} % of a {r['sgemm_gflops_median']} GFLOP/s 2048^3 sgemm "
                  f"timed between repeats (same threads, same load)")
        if "core_peak_gflops" in r:
            print(f"  GFLOP per CPU-second of the process (one core's peak: {r['core_peak_gflops']}): "
                  + ", ".join(f"{row['variant']} {row['gflop_per_cpu_s']}" for row in r["rows"]))
    for k, v in r.get("parts_ms", {}).items():
        print(f"  part: {k:48s} {v:9.3f} ms")
    if "peak_rss_mb" in r:
        print(f"peak RSS of a training process (batch {r['batch_size']}, 8,189 images in memory): "
              f"{r['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
