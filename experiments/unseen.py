"""Where do images of unseen-class captions land? Mostly in training species: docs/EXPERIMENTS.md,
"Class accuracy: truncation, GAN-INT, a class head" and the sections after it.

`flowercli eval` asks the real-image classifier to pick one of all 102 classes for each image
generated from a caption of the 20 unseen test classes. This script repeats that on the same
images (the protocol's captions and seeds) and splits the answer:

- how many images the classifier puts in *any* unseen class (vs one of the 82 training classes);
- 20-way top-1: the classifier restricted to the 20 unseen classes (chance 5 %), i.e. does the
  image carry its species' look relative to the other unseen species at all;
- the training classes most often predicted, and the same figures for real unseen-class images.

    python experiments/unseen.py --checkpoint R/ship3/checkpoints/step-0007587.pt --data-dir D --n 1024

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import split_answer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--n", type=int, default=1024)
    args = p.parse_args()

    from flowercli.config import DataLayout, EvalConfig
    from flowercli.generate import load_generator
    from flowercli.metrics import evaluate as ev
    from flowercli.metrics.features import load_extractor
    from flowercli.report import Reporter

    gen = load_generator(Path(args.checkpoint), "cpu")
    cfg, rep = EvalConfig(data_dir=Path(args.data_dir), n=args.n), Reporter()
    layout = DataLayout(Path(args.data_dir))
    emb = ev.load_embeddings(ev.resolve_embeddings(gen.meta, layout))
    mode, _, test_mask = ev.split_masks(emb, gen.meta.get("split"))
    extractor = load_extractor(None, layout.cache_dir, device="cpu", precision="fp32", allow_download=False,
                               reporter=rep)
    real, labels, _, clf, held_idx = ev.real_side(extractor, layout, emb, gen.image_size, cfg, rep)
    unseen = np.unique(labels[test_mask])
    rows = np.flatnonzero(test_mask)
    _, feats, plan_rows, _ = ev.generated_side(gen, extractor, emb, rows, cfg.n, cfg.seed,
                                               cfg.seed + ev.SEED_OFFSETS["main"], cfg.batch_size, "unseen", rep, {})
    held = np.zeros(len(labels), bool)
    held[held_idx] = True
    real_rows = held & test_mask
    print(json.dumps({"checkpoint": args.checkpoint, "split": mode, "unseen_classes": unseen.tolist(),
                      "generated": split_answer(clf, feats, labels[plan_rows], unseen),
                      "real_held_out": split_answer(clf, real[real_rows], labels[real_rows], unseen)}))


if __name__ == "__main__":
    main()
