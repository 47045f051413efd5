"""Does choosing the best of K images by the discriminator's score help? docs/EXPERIMENTS.md,
"Best of K by the discriminator".

For each requested image the generator draws K candidates (the image's own seed, then K - 1 more)
and keeps the one the run's discriminator scores highest for the caption: its real/fake logit with
the caption projection, without the class projection (a prompt has no class label). DALL-E chose
among samples with CLIP in the same way; here the judge is the run's own D, trained on the training
species only, so nothing of the evaluation's classifier leaks in. K = 1 is the plain generator.

Runs the `flowercli eval` protocol (`-n`, `--n-other` as given) once per K and prints one line each:

    python experiments/rerank.py --checkpoint R/names02/checkpoints/latest.pt --data-dir D --k 1,4 \
        --n 1024 --n-other 256 [--sample-condition]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from common import evaluate_each

SEED_STRIDE = 1_000_003  # candidate j of seed s draws from seed s + j * SEED_STRIDE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (it holds D; exported models do not)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", default="out/rerank")
    p.add_argument("--k", default="1,4")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--n-other", type=int, default=256)
    p.add_argument("--sample-condition", action="store_true")
    args = p.parse_args()

    from flowercli.checkpoint import load_checkpoint
    from flowercli.generate import LoadedGenerator, load_generator
    from flowercli.images import to_uint8
    from flowercli.models import Discriminator

    class BestOfK(LoadedGenerator):
        k: int = 1
        D: Discriminator | None = None

        @torch.inference_mode()
        def images_from_vectors(self, vectors, seeds, batch_size=64):
            if self.k == 1 or self.D is None:
                return super().images_from_vectors(vectors, seeds, batch_size)
            raw = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
            out = []
            for i in range(0, len(raw), batch_size):
                t = self.G.normalise_text(raw[i: i + batch_size])
                best, best_score = None, None
                for j in range(self.k):
                    z, eps = self.noise([s + j * SEED_STRIDE for s in seeds[i: i + batch_size]])
                    images = self.G(z, t, eps)[0]
                    score = self.D(images, t)[0]
                    if best is None:
                        best, best_score = images, score
                    else:
                        better = score > best_score
                        best = torch.where(better[:, None, None, None], images, best)
                        best_score = torch.maximum(score, best_score)
                out.append(to_uint8(best))
            return np.concatenate(out)

    loaded = load_generator(Path(args.checkpoint), "cpu", sample_condition=args.sample_condition or None)
    state = load_checkpoint(Path(args.checkpoint))
    D = Discriminator(loaded.G.cfg)
    D.load_state_dict(state["D"])
    D.eval()
    gen = BestOfK(**{f: getattr(loaded, f) for f in ("G", "meta", "checkpoint", "device", "sample_condition")})
    gen.D = D
    evaluate_each(gen, [int(x) for x in args.k.split(",")], lambda k: setattr(gen, "k", k), "k", args)

if __name__ == "__main__":
    main()
