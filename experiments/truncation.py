"""Does the truncation trick raise class accuracy? No: docs/EXPERIMENTS.md,
"Class accuracy: truncation, GAN-INT, a class head".

Evaluates one checkpoint with its noise z scaled by psi; at psi 1 it is the eval harness of the later
class-accuracy experiments (`-n 1024 --n-other 512`).

BigGAN's truncation trick (z drawn closer to 0) trades variety for fidelity and often raises
class recognisability. `flowercli generate`/`eval` use psi = 1 (z ~ N(0, I)); this script runs the
default `flowercli eval` protocol (except `-n`, `--n-other`) with z * psi for each psi, so the
question is answered by measurement before any option is added:

    python experiments/truncation.py --checkpoint R/ship3/checkpoints/step-0007587.pt --data-dir D \
        --n 1024 --n-other 512 --psi 1.0,0.6,0.3

With `--scale condition` psi scales only the noise of a conditioning-augmentation generator's
sampled condition (z unscaled): between the caption's mean condition (psi 0) and the sampled one
(psi 1). docs/EXPERIMENTS.md, "The packaged generator with the mean condition, and in between".

Prints one line per psi (FID, class accuracy, colour agreement, diversity, seconds) and writes
each report under --out/psi<psi>/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import evaluate_each


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", default="out/truncation")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--n-other", type=int, default=512)
    p.add_argument("--psi", default="1.0,0.6,0.3")
    p.add_argument("--scale", choices=("z", "condition"), default="z",
                   help="what psi scales: the noise z (the condition stays the caption's mean), or only the "
                        "sampled condition's noise (z unscaled; needs a conditioning-augmentation generator)")
    args = p.parse_args()

    from flowercli.generate import LoadedGenerator, load_generator

    class Truncated(LoadedGenerator):
        psi: float = 1.0

        def noise(self, seeds):
            z, eps = super().noise(seeds)
            if args.scale == "condition":
                return z, None if eps is None else eps * self.psi
            return z * self.psi, eps

    loaded = load_generator(Path(args.checkpoint), "cpu", sample_condition=True if args.scale == "condition" else None)
    gen = Truncated(**{f: getattr(loaded, f) for f in ("G", "meta", "checkpoint", "device", "sample_condition")})
    evaluate_each(gen, [float(x) for x in args.psi.split(",")], lambda psi: setattr(gen, "psi", psi), "psi", args,
                  {"scale": args.scale})

if __name__ == "__main__":
    main()
