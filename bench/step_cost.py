"""CPU cost of one training step for several recipes / model options, interleaved, relative to `modern`.

    python bench/step_cost.py [--repeats 3] [--steps 2] [--batch-size 64] [--json]
                              [--config NAME=recipe[,key=value...]] ...

Used to give every configuration of an equal-budget comparison the same CPU time: a recipe whose
step costs 1.3x gets 1/1.3 of the steps. Each repeat times `--steps` steps of every configuration
in turn (after one warm-up step each) on synthetic data shaped like the real data (as
bench/train_speed.py), so load on the machine hits all of them alike; the ratio of medians is the
figure to use, the absolute ms/step only holds for the load at the time.
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import time

import torch

from flowercli.device import StepOptions, resolve_adam, resolve_precision
from flowercli.runconfig import make_config
from flowercli.train import build_nets, run_step

from train_speed import CAPTIONS, N_CLASSES, TEXT_DIM, synthetic_data  # noqa: F401  (same data shapes)

DEFAULT_CONFIGS = {
    "modern": "modern",
    "reference": "reference",
    "modern+aux": "modern,d_head=aux",
    "modern+ma_gp": "modern,ma_gp=2.0",
    "modern+gan_int": "modern,gan_int=1.0",
    "modern-32ch": "modern,g_channels=32,d_channels=32",
    "modern-48ch": "modern,g_channels=48,d_channels=48",
}


def parse(spec: str) -> tuple[str, dict]:
    """"modern,ma_gp=2.0,diffaug=" -> ("modern", {"ma_gp": 2.0, "diffaug": ""})."""
    recipe, *pairs = spec.split(",")
    kw = {}
    for p in pairs:
        k, v = p.split("=", 1)
        try:
            kw[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            kw[k] = v  # a bare string such as a DiffAugment policy
    return recipe, kw


class Config:
    def __init__(self, spec: str, data, batch_size: int):
        recipe, kw = parse(spec)
        dev = torch.device("cpu")
        self.cfg = make_config(recipe, **{"text_dim": TEXT_DIM, "n_classes": N_CLASSES, "batch_size": batch_size, **kw})
        torch.manual_seed(0)
        self.nets = build_nets(self.cfg.model, self.cfg, dev, self.cfg.channels_last, resolve_adam(self.cfg.adam, dev))
        self.opts = StepOptions(dev, resolve_precision(self.cfg.precision, dev), self.cfg.channels_last,
                                self.cfg.model.spectral_norm)
        self.data, self.step = data, 0

    def run(self, k: int) -> float:
        t = time.perf_counter()
        b = self.cfg.batch_size
        for _ in range(k):
            start = (self.step * b) % (len(self.data.labels) - b + 1)
            run_step(self.nets, self.data, torch.arange(start, start + b), self.step, self.cfg, self.opts)
            self.step += 1
        return (time.perf_counter() - t) / k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--config", action="append", default=[], help="NAME=recipe[,key=value...]; default: a standard set")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    specs = dict(c.split("=", 1) for c in a.config) if a.config else DEFAULT_CONFIGS
    data = synthetic_data(512)
    runs = {name: Config(spec, data, a.batch_size) for name, spec in specs.items()}
    for r in runs.values():
        r.run(1)  # warm-up: first-call allocations and oneDNN primitive creation
    times = {name: [] for name in runs}
    for _ in range(a.repeats):
        for name, r in runs.items():
            times[name].append(r.run(a.steps))
    base = statistics.median(times[next(iter(runs))])
    rows = {name: {"spec": specs[name], "ms_per_step": round(1e3 * statistics.median(t), 1),
                   "relative": round(statistics.median(t) / base, 3)} for name, t in times.items()}
    if a.json:
        print(json.dumps({"threads": torch.get_num_threads(), "batch_size": a.batch_size, "configs": rows}))
    else:
        print(f"{'config':<16} {'ms/step':>9} {'relative':>9}  spec   (threads {torch.get_num_threads()})")
        for name, r in rows.items():
            print(f"{name:<16} {r['ms_per_step']:>9} {r['relative']:>9}  {r['spec']}")


if __name__ == "__main__":
    main()
