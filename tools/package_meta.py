"""Release tool: write flowercli/pretrained/generator.json, what the packaged generator is and what it reached.

The packaged `generator.pt` (from `flowercli export`) already carries its config, encoder, data
and, when the run's eval report belonged to the exported checkpoint, that report. This script
writes the human-readable summary beside it, adding what the file cannot know: how long training
took and on which machine.

    flowercli export flowercli/pretrained/generator.pt --run base --runs-dir R
    python tools/package_meta.py flowercli/pretrained/generator.pt --run base \
        --cpu-seconds 7153 --wall-seconds 3618 --device "cpu (2-core ..., AMX)"

The eval figures come from the report inside the exported file (`flowercli eval --run NAME`
before exporting), or from --report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summary(state: dict, report: dict | None, run: str, cpu_s: float, wall_s: float, device: str) -> dict:
    cfg = state["config"]
    data = state.get("data", {}) or {}
    out = {
        "file": "generator.pt",
        "what": f"EMA generator of run {run}, {state.get('meta', {}).get('dtype', 'float16')}",
        "step": state["step"],
        "recipe": cfg.get("recipe", "modern"),
        "model": cfg["model"],
        "learning_rates": {"g": cfg["lr_g"], "d": cfg["lr_d"]},
        "encoder": state.get("encoder"),
        "data": {"dataset": "Oxford 102 flowers, offline mirror (64x64 images), SUBSTITUTE captions",
                 "split": data.get("split", cfg.get("split")),
                 "train_classes": cfg["model"]["n_classes"]},
        "training": {"device": device, "cpu_seconds": cpu_s, "wall_seconds": wall_s,
                     "steps": state["step"], "batch_size": cfg["batch_size"]},
    }
    if report:
        acc = report["class_accuracy"]
        out["eval"] = {
            "protocol": "flowercli eval defaults (docs/EVALUATION.md), unseen test classes",
            "fid": report["fid"]["value"],
            "fid_n_generated": report["fid"]["n_generated"],
            "fid_n_real": report["fid"]["n_real"],
            "fid_ceiling": report["fid"]["ceiling"]["value"],
            "class_top1_unseen": acc["test"]["top1"],
            "class_top5_unseen": acc["test"]["top5"],
            "class_top1_train_classes": acc["train"]["top1"] if "train" in acc else None,
            "colour_agreement": report["colour"]["agreement"],
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exported", type=Path)
    p.add_argument("--run", required=True)
    p.add_argument("--cpu-seconds", type=float, required=True)
    p.add_argument("--wall-seconds", type=float, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--report", type=Path, help="an eval report.json (default: the one inside the exported file)")
    p.add_argument("--out", type=Path, help="default: generator.json beside the exported file")
    args = p.parse_args()

    from flowercli.checkpoint import load_checkpoint

    state = load_checkpoint(args.exported)
    report = json.loads(args.report.read_text()) if args.report else state.get("meta", {}).get("eval")
    out = args.out or args.exported.with_name("generator.json")
    out.write_text(json.dumps(summary(state, report, args.run, args.cpu_seconds, args.wall_seconds, args.device),
                              indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
