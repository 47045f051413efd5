"""What `generate --truncation PSI` trades: one run evaluated at several PSI with `flowercli eval`'s
own functions, so FID, recall and within-prompt diversity move side by side.

    python bench/truncation_sweep.py --run NAME --runs-dir R --data-dir D            # PSI 1.0, 0.8, 0.6
    python bench/truncation_sweep.py --checkpoint model.safetensors --data-dir D --psi 1.0,0.7,0.5 -n 1024

Every PSI uses the default protocol of docs/EVALUATION.md (same captions, same seeds; pass -n to
shorten it), the run's condition setting, and the real-image cache eval keeps under D, so only the
generated side changes. Prints one JSON line per PSI (FID, precision, recall, density, coverage,
within-prompt diversity in features and pixels, class top-1 on the evaluated split, colour
agreement, seconds) and writes each full report to --out/psi<PSI>/report.json, with
`protocol.truncation` saying which PSI made it. PSI 1.0 is `flowercli eval` itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def summary(psi: float, report: dict, seconds: float) -> dict:
    div = report.get("diversity") or {}
    within = div.get("within_prompt") or {}
    split = report["protocol"]["split"]
    return {"psi": psi, "n": report["protocol"]["n"], "fid": report["fid"]["value"],
            "fid_ceiling": report["fid"]["ceiling"]["value"],
            **{k: div.get(k) for k in ("precision", "recall", "density", "coverage")},
            "within_prompt_features": (within.get("features") or {}).get("mean"),
            "within_prompt_pixels": (within.get("pixels") or {}).get("mean"),
            "class_top1": report["class_accuracy"][split]["top1"], "colour": report["colour"]["agreement"],
            "seconds": round(seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run name under --runs-dir (its newest checkpoint)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint or exported file (instead of --run)")
    p.add_argument("--data-dir", type=Path, help="the data the run trained on [default: what the checkpoint records]")
    p.add_argument("--psi", default="1.0,0.8,0.6", help="comma-separated PSI values [default: 1.0,0.8,0.6]")
    p.add_argument("-n", type=int, default=None, help="generated images for FID and recall [default: the protocol's]")
    p.add_argument("--split", default="test", choices=("test", "train"))
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("out/truncation-sweep"))
    args = p.parse_args()

    from flowercli.config import EvalConfig
    from flowercli.generate import check_truncation, load_generator
    from flowercli.metrics.evaluate import evaluate

    if not args.run and not args.checkpoint:
        p.error("say which model: --run NAME or --checkpoint PATH")
    try:
        psis = [check_truncation(float(x)) for x in args.psi.split(",")]
        # A run folder stands for its newest checkpoint.
        gen = load_generator(args.checkpoint or Path(args.runs_dir) / args.run, args.device)
    except Exception as e:  # a bad --psi or model: one line, as the CLI would say it
        p.error(str(e))
    for psi in psis:
        gen.truncation = psi
        out = args.out / f"psi{psi}"
        cfg = EvalConfig(data_dir=args.data_dir, out_dir=out, split=args.split, device=args.device,
                         **({"n": args.n} if args.n else {}))
        t0 = time.perf_counter()
        report = evaluate(cfg, gen)
        print(json.dumps(summary(psi, report, time.perf_counter() - t0)), flush=True)


if __name__ == "__main__":
    main()
