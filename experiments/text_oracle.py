"""How much of an unseen species' look can its caption vector give at all? Little (2-4 % top-1, 102-way):
docs/EXPERIMENTS.md, "What the captions carry for unseen species; a class-free discriminator; width; cutout".

No generator is involved. A ridge regression is fitted from caption vectors to the Inception
features of the real images they describe, on the class split's training classes only (every
caption of every training image). It then predicts features for the protocol's unseen-class captions (the
same 1,024 captions `flowercli eval` uses), and the protocol's real-image classifier reads them.
If a linear map from the caption alone rarely lands in the right unseen species, a generator
conditioned on the same vectors has little to work from; if it often does, the generator is the gap.

The predicted features are conditional means, so they sit nearer the centre of feature space than
any real image: read the figure as "what the caption vectors carry, linearly", not as a bound.

    python experiments/text_oracle.py --data-dir D [--embeddings D/embeddings/minilm.h5] [--lam 10]
                                [--text vectors|words]

Prints one JSON object: top-1 (102-way, as the protocol), the share placed in any unseen class,
top-1 among the 20 unseen classes only, for the unseen captions and for training-class captions
(in-sample: the map saw them), with real held-out images for reference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import indicators, split_answer, vocabulary


def ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) minimising |xW + b - y|^2 + lam |W|^2, with x and y centred so b is not shrunk."""
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y - my))
    return w, my - mx @ w


def words(captions: list[list[str]], fit_on: list[str], min_count: int = 20) -> np.ndarray:
    """(N, 10, V) binary indicators of the vocabulary's words and word pairs in each caption."""
    index = {t: i for i, t in enumerate(vocabulary(fit_on, min_count))}
    return indicators([c for caps in captions for c in caps], index).reshape(len(captions), len(captions[0]), -1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--embeddings", help="default: the only/newest file under <data>/embeddings")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--lam", type=float, default=10.0, help="ridge penalty")
    p.add_argument("--text", choices=("vectors", "words"), default="vectors",
                   help="the embeddings file's caption vectors, or binary word and word-pair indicators "
                        "(vocabulary: those seen >= 20 times in training-class captions)")
    args = p.parse_args()

    from flowercli.config import DataLayout, EvalConfig
    from flowercli.metrics import evaluate as ev
    from flowercli.metrics.features import load_extractor
    from flowercli.report import Reporter
    from flowercli.traindata import find_embeddings

    layout = DataLayout(Path(args.data_dir))
    path = Path(args.embeddings) if args.embeddings else find_embeddings(layout)
    cfg, rep = EvalConfig(data_dir=layout.root, n=args.n), Reporter()
    emb = ev.load_embeddings(path)
    mode, train_mask, test_mask = ev.split_masks(emb, "classes")
    extractor = load_extractor(None, layout.cache_dir, device="cpu", precision="fp32", allow_download=False,
                               reporter=rep)
    real, labels, _, clf, held_idx = ev.real_side(extractor, layout, emb, 64, cfg, rep)
    unseen = np.unique(labels[test_mask])
    vectors = np.asarray(emb.vectors, np.float32)
    n_caps = np.asarray(emb.n_captions)

    rows = np.flatnonzero(train_mask)
    if args.text == "words":
        vectors = words(emb.captions, [c for r in rows for c in emb.captions[r][:n_caps[r]]])
    x = np.concatenate([vectors[r, :n_caps[r]] for r in rows]).astype(np.float64)
    y = np.repeat(real[rows], n_caps[rows], axis=0).astype(np.float64)
    w, b = ridge(x, y, args.lam)

    out = {"embeddings": str(path), "text": args.text, "dim": int(x.shape[1]), "lam": args.lam, "split": mode,
           "n_fit_captions": int(len(x))}
    for name, mask, seed_n in (("unseen_captions", test_mask, args.n), ("training_class_captions", train_mask, 512)):
        plan_rows, plan_caps = ev.caption_plan(emb, np.flatnonzero(mask), seed_n, cfg.seed)
        pred = vectors[plan_rows, plan_caps].astype(np.float64) @ w + b
        out[name] = split_answer(clf, pred, labels[plan_rows], unseen)
    held = np.zeros(len(labels), bool)
    held[held_idx] = True
    out["real_held_out_unseen_images"] = split_answer(clf, real[held & test_mask], labels[held & test_mask], unseen)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
